"""Hand-derived checks of the pure preference losses in ``lit_align.losses``.

Expected values are computed with ``math`` from the papers' equations, never by calling torch
functions that mirror the implementation. Throughout, sp(z) = log(1 + e^z) = -log sigma(-z).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lit_align.losses import cpo_loss, dpo_loss, hinge_loss, ipo_loss, orpo_loss, robust_dpo_loss, simpo_loss

TOL = dict(rtol=1e-6, atol=1e-6)
PAIRED = [dpo_loss, robust_dpo_loss, hinge_loss, ipo_loss]


def t(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def sp(z: float) -> float:
    """Softplus log(1 + e^z), i.e. -log sigma(-z)."""
    return math.log1p(math.exp(z))


def log1mexp(x: float) -> float:
    """log(1 - e^x) for x < 0, via expm1 so it is exact near 0."""
    return math.log(-math.expm1(x))


def grads(fn, *inputs, **kwargs):
    """Sum of losses back-propagated; returns (grad wrt input 0, grad wrt input 1)."""
    a = inputs[0].clone().requires_grad_(True)
    b = inputs[1].clone().requires_grad_(True)
    fn(a, b, *inputs[2:], **kwargs).losses.sum().backward()
    return a.grad, b.grad


# Two pairs: row 0 has margin m = (-1+2) - (-3+2) = 2, row 1 has m = 0.
PC, PR, RC, RR = t(-1.0, -2.0), t(-3.0, -2.0), t(-2.0, -2.0), t(-2.0, -2.0)


# ----------------------------------------------------------------------------- DPO family
def test_dpo_hand_value():
    """DPO Eq. 7: loss = -log sigma(beta m), beta = 0.5.

    row 0: m = (-1+2) - (-3+2) = 2, beta m = 1 -> loss = log(1+e^-1) = 0.3132617;
           r_w = 0.5*(-1+2) = 0.5, r_l = 0.5*(-3+2) = -0.5.
    row 1: m = 0 -> loss = log 2; r_w = r_l = 0.
    """
    out = dpo_loss(PC, PR, RC, RR, beta=0.5)
    assert_close(out.losses, t(sp(-1.0), math.log(2.0)), **TOL)
    assert out.losses[0].item() == pytest.approx(0.31326168751822286, abs=1e-9)
    assert_close(out.chosen_rewards, t(0.5, 0.0), **TOL)
    assert_close(out.rejected_rewards, t(-0.5, 0.0), **TOL)


def test_cdpo_hand_value():
    """cDPO: loss = -(1-eps) log sigma(x) - eps log sigma(-x) with x = beta m.

    Using sp(x) = x + sp(-x): loss = (1-eps) sp(-x) + eps (x + sp(-x)) = sp(-x) + eps x.
    beta = 0.5, eps = 0.1: row 0 x = 1 -> log(1+e^-1) + 0.1 = 0.4132617; row 1 x = 0 -> log 2.
    """
    out = dpo_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.1)
    assert_close(out.losses, t(sp(-1.0) + 0.1, math.log(2.0)), **TOL)
    assert_close(out.chosen_rewards, t(0.5, 0.0), **TOL)
    assert_close(out.rejected_rewards, t(-0.5, 0.0), **TOL)


def test_cdpo_minimum_at_finite_margin():
    """d/dx [sp(-x) + eps x] = -(1 - sigma(x)) + eps = 0 <=> sigma(x) = 1-eps <=> x = log((1-eps)/eps).

    eps = 0.1, beta = 1: x* = log 9. Gradient ~ 0 there, and the loss is larger on either side.
    """
    eps, x_star = 0.1, math.log(9.0)
    zero = t(0.0, 0.0)
    gc, gr = grads(dpo_loss, t(x_star, x_star), zero, zero, zero, beta=1.0, label_smoothing=eps)
    assert_close(gc, zero, **TOL)
    assert_close(gr, zero, **TOL)
    at = dpo_loss(t(x_star), t(0.0), t(0.0), t(0.0), beta=1.0, label_smoothing=eps).losses.item()
    assert at == pytest.approx(sp(-x_star) + eps * x_star, abs=1e-9)
    for x in (x_star - 0.5, x_star + 0.5):
        assert dpo_loss(t(x), t(0.0), t(0.0), t(0.0), beta=1.0, label_smoothing=eps).losses.item() > at


def test_robust_dpo_hand_value():
    """Robust DPO Eq. 8: loss = [(1-eps) sp(-x) - eps sp(x)] / (1-2eps), x = beta m.

    With sp(x) = x + sp(-x): loss = sp(-x) - eps x / (1-2eps).
    beta = 0.5, eps = 0.1: row 0 x = 1 -> log(1+e^-1) - 0.1/0.8 = 0.3132617 - 0.125 = 0.1882617;
    row 1 x = 0 -> log 2.
    """
    out = robust_dpo_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.1)
    assert_close(out.losses, t(sp(-1.0) - 0.125, math.log(2.0)), **TOL)
    assert_close(out.chosen_rewards, t(0.5, 0.0), **TOL)
    assert_close(out.rejected_rewards, t(-0.5, 0.0), **TOL)


def test_robust_dpo_eps_zero_equals_dpo():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-10 * torch.rand(4, generator=g, dtype=torch.float64) for _ in range(4))
    assert_close(
        robust_dpo_loss(pc, pr, rc, rr, beta=0.3, label_smoothing=0.0).losses,
        dpo_loss(pc, pr, rc, rr, beta=0.3).losses,
        **TOL,
    )


@pytest.mark.parametrize("eps", [0.05, 0.2, 0.4])
def test_robust_dpo_is_unbiased(eps):
    """With labels flipped w.p. eps: (1-eps) L_rob(m) + eps L_rob(-m) == -log sigma(beta m).

    [(1-e)^2 sp(-x) - e(1-e) sp(x) + e(1-e) sp(x) - e^2 sp(-x)] / (1-2e) = sp(-x) since (1-e)^2 - e^2 = 1-2e.
    """
    pc, pr, rc, rr = t(-1.0, -4.0, -2.5), t(-3.0, -1.0, -2.5), t(-2.0, -2.0, -1.0), t(-2.0, -3.0, -4.0)
    beta = 0.7
    clean = robust_dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps).losses
    flipped = robust_dpo_loss(pr, pc, rr, rc, beta=beta, label_smoothing=eps).losses
    margins = [(a - c) - (b - d) for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), strict=True)]
    assert_close((1 - eps) * clean + eps * flipped, t(*[sp(-beta * m) for m in margins]), **TOL)


@pytest.mark.parametrize("fn", [dpo_loss, robust_dpo_loss])
@pytest.mark.parametrize("eps", [0.5, 0.7, -0.1])
def test_invalid_label_smoothing(fn, eps):
    with pytest.raises(ValueError, match="label_smoothing"):
        fn(PC, PR, RC, RR, beta=0.5, label_smoothing=eps)


def test_hinge_hand_value():
    """SLiC hinge: loss = max(0, 1 - beta m), beta = 0.5.

    row 0: m = 2 -> 1 - 1 = 0 (exactly at the margin); row 1: m = 0 -> 1;
    row 2: pc=-2.5, pr=-3, refs -2 -> m = -0.5 - (-1) = 0.5 -> 1 - 0.25 = 0.75.
    """
    out = hinge_loss(t(-1.0, -2.0, -2.5), t(-3.0, -2.0, -3.0), t(-2.0, -2.0, -2.0), t(-2.0, -2.0, -2.0), beta=0.5)
    assert_close(out.losses, t(0.0, 1.0, 0.75), **TOL)
    assert_close(out.chosen_rewards, t(0.5, 0.0, -0.25), **TOL)
    assert_close(out.rejected_rewards, t(-0.5, 0.0, -0.5), **TOL)


def test_hinge_zero_gradient_beyond_margin():
    """beta = 0.5, m = 4 > 1/beta = 2 -> loss 0 and no gradient."""
    gc, gr = grads(hinge_loss, t(-1.0, 0.0), t(-3.0, -4.0), t(-3.0, -2.0), t(-1.0, -2.0), beta=0.5)
    assert_close(gc, t(0.0, 0.0), **TOL)
    assert_close(gr, t(0.0, 0.0), **TOL)


def test_ipo_hand_value():
    """IPO Eq. 17: loss = (m - 1/(2 tau))^2, tau = beta = 0.5 -> target margin 1.

    row 0: m = 2 -> (2-1)^2 = 1; row 1: m = 0 -> (0-1)^2 = 1;
    row 2: pc=-1.5, pr=-2, refs -2 -> m = 0.5 -> 0.25. Rewards beta * (pi - ref).
    """
    out = ipo_loss(t(-1.0, -2.0, -1.5), t(-3.0, -2.0, -2.0), t(-2.0, -2.0, -2.0), t(-2.0, -2.0, -2.0), beta=0.5)
    assert_close(out.losses, t(1.0, 1.0, 0.25), **TOL)
    assert_close(out.chosen_rewards, t(0.5, 0.0, 0.25), **TOL)
    assert_close(out.rejected_rewards, t(-0.5, 0.0, 0.0), **TOL)


def test_ipo_gradient_flips_above_target():
    """dL/d pi(y_w) = 2 (m - 1/(2 beta)) = -dL/d pi(y_l). beta = 0.5, target 1.

    m = 0.5 -> grad_chosen = -1, grad_rejected = +1; m = 3 -> grad_chosen = +4, grad_rejected = -4.
    """
    zero = t(0.0, 0.0)
    gc, gr = grads(ipo_loss, t(0.5, 3.0), zero, zero, zero, beta=0.5)
    assert_close(gc, t(-1.0, 4.0), **TOL)
    assert_close(gr, t(1.0, -4.0), **TOL)


# Points inside every loss's active region: beta = 0.5 and m = 0.5 (< 1/beta = 2 for hinge,
# < 1/(2 beta) = 1 for IPO).
@pytest.mark.parametrize("fn", PAIRED)
def test_paired_gradient_direction(fn):
    pc, pr, rc, rr = t(-2.0, -5.0), t(-2.5, -5.5), t(-2.0, -5.0), t(-2.0, -5.0)
    gc, gr = grads(fn, pc, pr, rc, rr, beta=0.5)
    assert (gc < 0).all() and (gr > 0).all()


def test_cdpo_gradient_direction():
    gc, gr = grads(dpo_loss, PC, PR, RC, RR, beta=0.5, label_smoothing=0.1)
    assert (gc < 0).all() and (gr > 0).all()


# ------------------------------------------------------------------------ reference-free
def test_orpo_hand_value():
    """ORPO Eqs. 4-7, lambda = 0.1.

    chosen: logp = 2 log 0.5 over 2 tokens -> s_w = log 0.5, odds = 0.5/0.5 = 1, log odds_w = 0.
    rejected: logp = 3 log 0.25 over 3 tokens -> s_l = log 0.25, odds = 0.25/0.75 = 1/3.
    log_odds_chosen = 0 - log(1/3) = log 3; log_odds_ratio = log sigma(log 3) = log(3/4).
    nll = -s_w = log 2; loss = log 2 - 0.1 log(3/4) = 0.7219162. Rewards: lambda*s = 0.1 log 0.5, 0.1 log 0.25.
    """
    out = orpo_loss(t(2 * math.log(0.5)), t(3 * math.log(0.25)), t(2.0), t(3.0), lam=0.1)
    assert_close(out.losses, t(math.log(2) - 0.1 * math.log(0.75)), **TOL)
    assert_close(out.metrics["nll_loss"], t(math.log(2)), **TOL)
    assert_close(out.metrics["log_odds_chosen"], t(math.log(3)), **TOL)
    assert_close(out.metrics["log_odds_ratio"], t(math.log(0.75)), **TOL)
    assert_close(out.chosen_rewards, t(0.1 * math.log(0.5)), **TOL)
    assert_close(out.rejected_rewards, t(0.1 * math.log(0.25)), **TOL)


def test_orpo_equal_logps():
    """s_w = s_l -> log odds difference 0, log sigma(0) = log 0.5; loss = -s_w - lam log 0.5."""
    lp, n = t(-3.0, -8.0), t(3.0, 4.0)
    out = orpo_loss(lp, lp, n, n, lam=0.2)
    assert_close(out.metrics["log_odds_chosen"], t(0.0, 0.0), **TOL)
    assert_close(out.metrics["log_odds_ratio"], t(math.log(0.5), math.log(0.5)), **TOL)
    assert_close(out.losses, t(1.0 - 0.2 * math.log(0.5), 2.0 - 0.2 * math.log(0.5)), **TOL)


def test_orpo_extreme_probabilities_finite():
    """Mean logp -30 (P ~ 1e-13) and -1e-4 (P ~ 1): log odds = s - log(1 - e^s) stays finite.

    log odds(-30) = -30 - log(1 - e^-30) ~ -30; log odds(-1e-4) = -1e-4 - log(1 - e^-1e-4) ~ 9.21.
    """
    lo = lambda s: s - log1mexp(s)  # noqa: E731
    n = t(5.0, 5.0)
    cw, cl = t(-30.0 * 5, -1e-4 * 5), t(-1e-4 * 5, -30.0 * 5)
    out = orpo_loss(cw.clone().requires_grad_(True), cl, n, n, lam=0.1)
    expected = t(lo(-30.0) - lo(-1e-4), lo(-1e-4) - lo(-30.0))
    assert torch.isfinite(out.losses).all()
    assert_close(out.metrics["log_odds_chosen"], expected, **TOL)
    assert_close(out.metrics["log_odds_ratio"], t(-sp(-expected[0].item()), -sp(-expected[1].item())), **TOL)
    gc, gr = grads(orpo_loss, cw, cl, n, n, lam=0.1)
    assert torch.isfinite(gc).all() and torch.isfinite(gr).all()


def test_simpo_hand_value():
    """SimPO Eq. 6, beta = 2, gamma = 1: r = beta/|y| log pi.

    row 0: r_w = 2 * (-4/4) = -2, r_l = 2 * (-9/3) = -6 -> loss = -log sigma(-2+6-1) = log(1+e^-3) = 0.0485874.
    row 1: r_w = 2 * (-6/3) = -4, r_l = 2 * (-4/2) = -4 -> loss = -log sigma(-1) = log(1+e) = 1.3132617.
    """
    out = simpo_loss(t(-4.0, -6.0), t(-9.0, -4.0), t(4.0, 3.0), t(3.0, 2.0), beta=2.0, gamma=1.0)
    assert_close(out.losses, t(sp(-3.0), sp(1.0)), **TOL)
    assert out.losses[0].item() == pytest.approx(0.04858735157374206, abs=1e-9)
    assert_close(out.chosen_rewards, t(-2.0, -4.0), **TOL)
    assert_close(out.rejected_rewards, t(-6.0, -4.0), **TOL)


def test_simpo_length_normalised():
    """Doubling |y| and log pi(y) leaves r = beta log pi / |y| and therefore the loss unchanged."""
    cw, cl, nw, nl = t(-4.0, -6.0), t(-9.0, -4.0), t(4.0, 3.0), t(3.0, 2.0)
    base = simpo_loss(cw, cl, nw, nl).losses
    assert_close(simpo_loss(2 * cw, cl, 2 * nw, nl).losses, base, **TOL)
    assert_close(simpo_loss(cw, 2 * cl, nw, 2 * nl).losses, base, **TOL)


def test_cpo_hand_value():
    """CPO: loss = -log sigma(beta (lp_w - lp_l)) + w * (-lp_w / |y_w|), beta = 0.1.

    row 0: lp_w = -10 (5 tokens), lp_l = -20 -> -log sigma(1) = 0.3132617, nll = 2 -> 2.3132617 (w = 1).
    row 1: lp_w = lp_l = -6 (3 tokens) -> log 2 + 2 = 2.6931472. Rewards beta lp: (-1, -0.6), (-2, -0.6).
    With w = 0.5: 0.3132617 + 1 and log 2 + 1.
    """
    cw, cl, n = t(-10.0, -6.0), t(-20.0, -6.0), t(5.0, 3.0)
    out = cpo_loss(cw, cl, n, beta=0.1)
    assert_close(out.losses, t(sp(-1.0) + 2.0, math.log(2) + 2.0), **TOL)
    assert_close(out.metrics["nll_loss"], t(2.0, 2.0), **TOL)
    assert_close(out.chosen_rewards, t(-1.0, -0.6), **TOL)
    assert_close(out.rejected_rewards, t(-2.0, -0.6), **TOL)
    assert_close(cpo_loss(cw, cl, n, beta=0.1, nll_weight=0.5).losses, t(sp(-1.0) + 1.0, math.log(2) + 1.0), **TOL)


@pytest.mark.parametrize(
    "fn, extra",
    [(orpo_loss, dict(lam=0.1)), (simpo_loss, dict(beta=2.0, gamma=1.0)), (cpo_loss, dict(beta=0.1))],
)
def test_reference_free_gradient_direction(fn, extra):
    cw, cl, nw, nl = t(-6.0, -12.0), t(-9.0, -10.0), t(3.0, 4.0), t(3.0, 5.0)
    args = (nw,) if fn is cpo_loss else (nw, nl)
    gc, gr = grads(fn, cw, cl, *args, **extra)
    assert (gc < 0).all() and (gr > 0).all()
