"""Hand-derived checks of the paired DPO variants (``lit_align.losses.dpo_variants``, ``gpo``)
and a smoke test of their modules.

Expected values are computed with ``math`` from the papers' equations, never by calling torch
functions that mirror the implementation. Notation: h = log pi - log pi_ref (log-ratio),
m = h_w - h_l (margin), sp(z) = log(1 + e^z) = -log sigma(-z), sig(z) = 1 / (1 + e^-z).
"""

from __future__ import annotations

import math
import re
import typing

import pytest
import torch
from torch.testing import assert_close

from lit_align.data import PreferenceDataModule, WordRulesTask
from lit_align.errors import SettingError
from lit_align.losses import (
    GPO_FUNCTIONS,
    aot_loss,
    aot_pair_loss,
    apo_down_loss,
    apo_zero_loss,
    bco_pair_loss,
    beta_dpo_beta,
    beta_dpo_filter,
    beta_dpo_loss,
    dpo_loss,
    dpop_loss,
    exo_pair_loss,
    gpo_loss,
    hinge_loss,
    ipo_loss,
    nca_pair_loss,
    odpo_loss,
    rdpo_loss,
    sppo_hard_loss,
)
from lit_align.methods import (
    AOT,
    DPOP,
    EXO,
    GPO,
    NCA,
    ODPO,
    RDPO,
    APODown,
    APOZero,
    BCOPair,
    BetaDPO,
    SPPOHard,
)

TOL = {"rtol": 1e-6, "atol": 1e-6}


def t(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def sp(z: float) -> float:
    """Softplus log(1 + e^z), i.e. -log sigma(-z)."""
    return math.log1p(math.exp(z))


def sig(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def random_inputs(n: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(-10 * torch.rand(n, generator=g, dtype=torch.float64) for _ in range(4))


# Two pairs: row 0 has h_w = -1+2 = 1, h_l = -3+2 = -1, m = 2; row 1 has h_w = h_l = m = 0.
PC, PR, RC, RR = t(-1.0, -2.0), t(-3.0, -2.0), t(-2.0, -2.0), t(-2.0, -2.0)


def check_rewards(out, beta, chosen=(1.0, 0.0), rejected=(-1.0, 0.0)):
    assert_close(out.chosen_rewards, t(*(beta * h for h in chosen)), **TOL)
    assert_close(out.rejected_rewards, t(*(beta * h for h in rejected)), **TOL)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


# ----------------------------------------------------------------------------- R-DPO
def test_rdpo_hand_value():
    """R-DPO: loss = -log sigma(beta m + alpha (|y_w| - |y_l|)), beta = 0.5, alpha = 0.1.

    row 0: |y_w| = 5, |y_l| = 3 -> length term 0.2; logit 0.5*2 + 0.2 = 1.2 -> sp(-1.2) = 0.2634...
    row 1: |y_w| = 3, |y_l| = 4 -> length term -0.1; logit 0 - 0.1 -> sp(0.1) = 0.7443966...
    """
    out = rdpo_loss(PC, PR, RC, RR, t(5.0, 3.0), t(3.0, 4.0), beta=0.5, alpha=0.1)
    assert_close(out.losses, t(sp(-1.2), sp(0.1)), **TOL)
    assert out.losses[1].item() == pytest.approx(0.7443966600735709, abs=1e-9)
    assert_close(out.metrics["length_term"], t(0.2, -0.1), **TOL)
    check_rewards(out, 0.5)


def test_rdpo_alpha_zero_is_dpo_and_longer_chosen_gets_less_push():
    pc, pr, rc, rr = random_inputs()
    lengths_w, lengths_l = t(9.0, 3.0, 4.0, 7.0, 1.0), t(2.0, 3.0, 8.0, 1.0, 5.0)
    assert_close(
        rdpo_loss(pc, pr, rc, rr, lengths_w, lengths_l, beta=0.3, alpha=0.0).losses,
        dpo_loss(pc, pr, rc, rr, beta=0.3).losses,
        **TOL,
    )
    # a longer chosen response already explains part of the preference: smaller loss and
    # smaller gradient on its log-prob than DPO (d/dh_w of sp(-x) is -beta sigma(-x))
    a = PC.clone().requires_grad_(True)
    b = PC.clone().requires_grad_(True)
    rdpo_loss(a, PR, RC, RR, t(10.0, 10.0), t(5.0, 5.0), beta=0.5, alpha=0.1).losses.sum().backward()
    dpo_loss(b, PR, RC, RR, beta=0.5).losses.sum().backward()
    assert torch.all(a.grad.abs() < b.grad.abs())
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        rdpo_loss(PC, PR, RC, RR, t(1.0, 1.0), t(1.0, 1.0), alpha=-0.1)


# ----------------------------------------------------------------------------- DPOP
def test_dpop_hand_value():
    """DPOP Eq. 3: loss = -log sigma(beta (m - lambda max(0, log pi_ref(y_w) - log pi(y_w)))).

    beta = 0.5, lambda = 2.
    row 0: pc = -1 >= rc = -2 -> penalty 0; m = 2 -> sp(-1).
    row 1: pc = -3 < rc = -2 -> penalty 1; h_l = -4+2 = -2, m = -1+2 = 1;
           logit 0.5 (1 - 2) = -0.5 -> sp(0.5) = 0.9740770...
    """
    out = dpop_loss(t(-1.0, -3.0), t(-3.0, -4.0), t(-2.0, -2.0), t(-2.0, -2.0), beta=0.5, lam=2.0)
    assert_close(out.losses, t(sp(-1.0), sp(0.5)), **TOL)
    assert out.losses[1].item() == pytest.approx(0.9740769841801067, abs=1e-9)
    assert_close(out.metrics["dpop_penalty"], t(0.0, 1.0), **TOL)
    check_rewards(out, 0.5, chosen=(1.0, -1.0), rejected=(-1.0, -2.0))


def test_dpop_lambda_zero_is_dpo_and_penalty_only_below_the_reference():
    pc, pr, rc, rr = random_inputs()
    assert_close(dpop_loss(pc, pr, rc, rr, beta=0.3, lam=0.0).losses, dpo_loss(pc, pr, rc, rr, beta=0.3).losses, **TOL)
    # policy chosen at or above the reference: DPOP == DPO for any lambda
    above = rc + t(0.0, 0.5, 1.0, 2.0, 3.0)
    assert_close(
        dpop_loss(above, pr, rc, rr, beta=0.3, lam=50.0).losses, dpo_loss(above, pr, rc, rr, beta=0.3).losses, **TOL
    )
    # below the reference: strictly larger loss, and a stronger pull up on log pi(y_w)
    below = rc - t(0.1, 0.5, 1.0, 2.0, 3.0)
    assert torch.all(
        dpop_loss(below, pr, rc, rr, beta=0.3, lam=1.0).losses > dpo_loss(below, pr, rc, rr, beta=0.3).losses
    )
    a, b = below.clone().requires_grad_(True), below.clone().requires_grad_(True)
    dpop_loss(a, pr, rc, rr, beta=0.3, lam=1.0).losses.sum().backward()
    dpo_loss(b, pr, rc, rr, beta=0.3).losses.sum().backward()
    assert torch.all(a.grad < b.grad)  # both negative (descent raises log pi(y_w)); DPOP's larger
    with pytest.raises(ValueError, match="lam must be >= 0"):
        dpop_loss(PC, PR, RC, RR, lam=-1.0)


# ----------------------------------------------------------------------------- β-DPO
def test_beta_dpo_beta_follows_the_batch_margin():
    """beta_batch = beta_0 (1 + alpha (M_batch - M_0)), beta_0 = 0.1, alpha = 0.5, M_0 = 1.

    M_batch = 3 -> 0.1 * (1 + 0.5 * 2) = 0.2 (rises); M_batch = 0 -> 0.1 * 0.5 = 0.05 (falls);
    M_batch = M_0 -> 0.1; M_batch = -10 -> 0.1 * (1 - 5.5) < 0 -> floored at min_beta = 1e-3.
    """
    assert beta_dpo_beta(3.0, 1.0, beta=0.1, alpha=0.5).item() == pytest.approx(0.2)
    assert beta_dpo_beta(0.0, 1.0, beta=0.1, alpha=0.5).item() == pytest.approx(0.05)
    assert beta_dpo_beta(1.0, 1.0, beta=0.1, alpha=0.5).item() == pytest.approx(0.1)
    assert beta_dpo_beta(-10.0, 1.0, beta=0.1, alpha=0.5).item() == pytest.approx(1e-3)
    assert beta_dpo_beta(5.0, 1.0, beta=0.1, alpha=0.0).item() == pytest.approx(0.1)  # alpha = 0: fixed beta


@pytest.mark.parametrize(
    "size,rho,kept", [(10, 0.2, 8), (16, 0.25, 12), (5, 0.5, 2), (7, 0.0, 7), (4, 0.9, 1), (20, 0.9, 2)]
)
def test_beta_dpo_filter_keeps_the_requested_fraction(size, rho, kept):
    """floor(B (1 - rho)) pairs kept, at least one: e.g. 10 * 0.8 = 8, 5 * 0.5 = 2.5 -> 2, 4 * 0.1 -> 1."""
    margins = torch.linspace(-2, 2, size, dtype=torch.float64)
    mask = beta_dpo_filter(margins, 0.0, 1.0, rho=rho, generator=torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and int(mask.sum()) == kept


def test_beta_dpo_filter_is_reproducible_and_drops_outliers():
    margins = t(0.0, 0.1, -0.1, 0.05, 50.0, -0.2, 0.3, 0.0, 0.1, -40.0)
    first = beta_dpo_filter(margins, 0.0, 1.0, rho=0.2, generator=torch.Generator().manual_seed(7))
    again = beta_dpo_filter(margins, 0.0, 1.0, rho=0.2, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, again)
    # weights exp(-50^2/2) and exp(-40^2/2) are ~0: the two outliers are the two dropped pairs
    assert first.tolist() == [True, True, True, True, False, True, True, True, True, False]
    with pytest.raises(ValueError, match=r"rho .* must be in \[0, 1\)"):
        beta_dpo_filter(margins, 0.0, 1.0, rho=1.0)


def test_beta_dpo_filter_samples_in_proportion_to_the_gaussian_weight():
    """Two pairs, one kept; M_0 = 0, sigma = 1, margins (0, 1): weights (1, e^-1/2), so pair 0
    is kept with probability 1 / (1 + e^-0.5) = sig(0.5) = 0.6225. 4000 draws: std error 0.0077."""
    g = torch.Generator().manual_seed(0)
    draws = [bool(beta_dpo_filter(t(0.0, 1.0), 0.0, 1.0, rho=0.5, generator=g)[0]) for _ in range(4000)]
    assert sum(draws) / len(draws) == pytest.approx(sig(0.5), abs=0.03)


def test_beta_dpo_loss_hand_value():
    """loss_i = -log sigma(beta_batch m_i) * keep_i * B / sum(keep); beta_batch = 0.5, rewards use beta = 0.1.

    m = (2, 0, 1), keep = (1, 0, 1): per-pair sp(-1), log 2, sp(-0.5); scaled by 3/2 on the kept
    rows, 0 on the filtered one, so the mean is (sp(-1) + sp(-0.5)) / 2.
    """
    pc, pr, ref = t(-1.0, -2.0, -1.0), t(-3.0, -2.0, -2.0), t(-2.0, -2.0, -2.0)
    out = beta_dpo_loss(pc, pr, ref, ref, beta_batch=0.5, beta=0.1, keep=torch.tensor([True, False, True]))
    assert_close(out.losses, t(1.5 * sp(-1.0), 0.0, 1.5 * sp(-0.5)), **TOL)
    assert out.losses.mean().item() == pytest.approx((sp(-1.0) + sp(-0.5)) / 2, abs=1e-9)
    assert_close(out.metrics["beta_used"], t(0.5, 0.5, 0.5), **TOL)
    assert_close(out.metrics["kept"], t(1.0, 0.0, 1.0), **TOL)
    check_rewards(out, 0.1, chosen=(1.0, 0.0, 1.0), rejected=(-1.0, 0.0, 0.0))
    # beta_batch = beta and no filtering: DPO
    pc, pr, rc, rr = random_inputs()
    assert_close(
        beta_dpo_loss(pc, pr, rc, rr, beta_batch=0.3, beta=0.3).losses, dpo_loss(pc, pr, rc, rr, beta=0.3).losses, **TOL
    )


# ----------------------------------------------------------------------------- ODPO
def test_odpo_identity_and_log_offsets():
    """ODPO: loss = -log sigma(beta m - Delta), Delta = alpha f(s_w - s_l); beta = 0.5, m = (2, 0).

    scores s_w = (4, 2), s_l = (1, 1.5) -> d = (3, 0.5).
    identity, alpha = 0.5: Delta = (1.5, 0.25); logits (1 - 1.5, -0.25) -> sp(0.5), sp(0.25).
    log, alpha = 1: Delta = (log 3, log 0.5); logits (1 - log 3, log 2) -> sp(log 3 - 1), sp(-log 2) = log 1.5.
    """
    s_w, s_l = t(4.0, 2.0), t(1.0, 1.5)
    identity = odpo_loss(PC, PR, RC, RR, s_w, s_l, beta=0.5, alpha=0.5, offset_fn="identity")
    assert_close(identity.losses, t(sp(0.5), sp(0.25)), **TOL)
    assert_close(identity.metrics["offset"], t(1.5, 0.25), **TOL)
    log = odpo_loss(PC, PR, RC, RR, s_w, s_l, beta=0.5, alpha=1.0, offset_fn="log")
    assert_close(log.losses, t(sp(math.log(3.0) - 1.0), math.log(1.5)), **TOL)
    check_rewards(log, 0.5)


def test_odpo_log1p_and_missing_scores():
    """log1p: f(d) = sign(d) log(1 + |d|); d = (3, -1), alpha = 1 -> Delta = (log 4, -log 2).
    NaN score -> the constant default_offset (0.7) on that pair; no scores at all -> all 0.7;
    no scores and default 0 -> DPO."""
    out = odpo_loss(PC, PR, RC, RR, t(4.0, 0.5), t(1.0, 1.5), beta=0.5, alpha=1.0, offset_fn="log1p")
    assert_close(out.metrics["offset"], t(math.log(4.0), -math.log(2.0)), **TOL)
    assert_close(out.losses, t(sp(math.log(4.0) - 1.0), sp(-math.log(2.0))), **TOL)
    nan = odpo_loss(
        PC, PR, RC, RR, t(math.nan, 2.0), t(1.0, 1.5), beta=0.5, alpha=1.0, offset_fn="identity", default_offset=0.7
    )
    assert_close(nan.metrics["offset"], t(0.7, 0.5), **TOL)
    assert_close(nan.losses, t(sp(-(1.0 - 0.7)), sp(0.5)), **TOL)
    unscored = odpo_loss(PC, PR, RC, RR, beta=0.5, default_offset=0.7)
    assert_close(unscored.metrics["offset"], t(0.7, 0.7), **TOL)
    pc, pr, rc, rr = random_inputs()
    assert_close(odpo_loss(pc, pr, rc, rr, beta=0.3).losses, dpo_loss(pc, pr, rc, rr, beta=0.3).losses, **TOL)


def test_odpo_errors_are_named():
    with pytest.raises(ValueError, match=r"offset_fn='log' needs score_chosen > score_rejected, but 1 scored pair"):
        odpo_loss(PC, PR, RC, RR, t(1.0, math.nan), t(1.0, 0.0), offset_fn="log")
    with pytest.raises(
        ValueError, match=r"unknown ODPO offset_fn 'sqrt'; choose one of \['identity', 'log', 'log1p'\]"
    ):
        odpo_loss(PC, PR, RC, RR, offset_fn="sqrt")


# ----------------------------------------------------------------------------- EXO, NCA, APO, SPPO, BCO
def test_exo_pair_hand_value():
    """EXO Eq. 16 (K = 2): KL(q || p), q = (sig(x), sig(-x)), x = beta m, p = (1 - eps, eps); beta = 0.5, eps = 0.1.

    row 0: x = 1: sig(1) (log sig(1) - log 0.9) + sig(-1) (log sig(-1) - log 0.1).
    row 1: x = 0: q = (1/2, 1/2): log(1/2) - (log 0.9 + log 0.1) / 2 = 0.5108256...
    """
    out = exo_pair_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.1)
    q, r = sig(1.0), sig(-1.0)
    row0 = q * (math.log(q) - math.log(0.9)) + r * (math.log(r) - math.log(0.1))
    assert_close(out.losses, t(row0, math.log(0.5) - 0.5 * (math.log(0.9) + math.log(0.1))), **TOL)
    assert out.losses[1].item() == pytest.approx(0.5108256237659907, abs=1e-9)
    check_rewards(out, 0.5)


def test_exo_minimum_is_zero_at_the_label_distribution():
    """KL(q || p) = 0 iff q = p: sig(x*) = 1 - eps <=> x* = log((1 - eps) / eps) = log 9 for eps = 0.1."""
    zero = t(0.0)
    out = exo_pair_loss(t(math.log(9.0)), zero, zero, zero, beta=1.0, label_smoothing=0.1)
    assert out.losses.item() == pytest.approx(0.0, abs=1e-12)
    for eps in (0.0, 0.5, -0.1):
        with pytest.raises(ValueError, match=r"label_smoothing must be in \(0, 0.5\) for EXO"):
            exo_pair_loss(PC, PR, RC, RR, label_smoothing=eps)


def test_nca_pair_hand_value():
    """NCA: -log sig(r_w) - 1/2 log sig(-r_w) - 1/2 log sig(-r_l), r = beta h, beta = 0.5.

    row 0: r_w = 0.5, r_l = -0.5: sp(-0.5) + sp(0.5)/2 + sp(-0.5)/2.   row 1: r = 0: 2 log 2.
    """
    out = nca_pair_loss(PC, PR, RC, RR, beta=0.5)
    assert_close(out.losses, t(1.5 * sp(-0.5) + 0.5 * sp(0.5), 2 * math.log(2.0)), **TOL)
    check_rewards(out, 0.5)


def test_apo_zero_and_down_hand_values():
    """APO Eq. 7: (1 - sig(r_w)) + sig(r_l); Eq. 8: sig(r_w) + 1 - sig(r_w - r_l); beta = 0.5.

    zero, row 0 (r_w = 0.5, r_l = -0.5): 2 sig(-0.5) = 0.7550...;  row 1: 1/2 + 1/2 = 1.
    down, row 0: sig(0.5) + 1 - sig(1) = 0.8914...;                row 1: 1/2 + 1 - 1/2 = 1.
    """
    zero = apo_zero_loss(PC, PR, RC, RR, beta=0.5)
    assert_close(zero.losses, t(2 * sig(-0.5), 1.0), **TOL)
    assert zero.losses[0].item() == pytest.approx(0.7550813375962908, abs=1e-9)
    down = apo_down_loss(PC, PR, RC, RR, beta=0.5)
    assert_close(down.losses, t(sig(0.5) + 1 - sig(1.0), 1.0), **TOL)
    check_rewards(zero, 0.5)
    check_rewards(down, 0.5)


def test_apo_gradients_point_the_anchored_ways():
    """At r = 0: APO-zero raises log pi(y_w) and lowers log pi(y_l) (d/dh_w = -beta/4, d/dh_l = +beta/4);
    APO-down leaves log pi(y_w) alone to first order (beta/4 - beta/4 = 0) and lowers log pi(y_l)."""
    zero = t(0.0)

    def grads(fn):
        a, b = zero.clone().requires_grad_(True), zero.clone().requires_grad_(True)
        fn(a, b, zero, zero, beta=0.5).losses.sum().backward()
        return a.grad.item(), b.grad.item()

    assert grads(apo_zero_loss) == pytest.approx((-0.125, 0.125))
    assert grads(apo_down_loss) == pytest.approx((0.0, 0.125))


def test_sppo_hard_hand_value():
    """SPPO hard: (h_w - 1/(2 beta))^2 + (h_l + 1/(2 beta))^2, beta = 0.5 -> targets +-1.

    row 0: h = (1, -1) -> 0; row 1: h = (0, 0) -> 1 + 1 = 2; row 2: h = (2, 0.5) -> 1 + 2.25 = 3.25.
    """
    out = sppo_hard_loss(t(-1.0, -2.0, 0.0), t(-3.0, -2.0, -1.5), t(-2.0, -2.0, -2.0), t(-2.0, -2.0, -2.0), beta=0.5)
    assert_close(out.losses, t(0.0, 2.0, 3.25), **TOL)
    with pytest.raises(ValueError, match="beta must be > 0"):
        sppo_hard_loss(PC, PR, RC, RR, beta=0.0)


def test_bco_pair_hand_value():
    """BCO: -log sig(r_w - delta) - log sig(-(r_l - delta)), beta = 0.5, delta = 0.25.

    row 0: r_w = 0.5, r_l = -0.5: sp(-0.25) + sp(-0.75).  row 1: r = 0: sp(0.25) + sp(-0.25).
    """
    out = bco_pair_loss(PC, PR, RC, RR, beta=0.5, delta=0.25)
    assert_close(out.losses, t(sp(-0.25) + sp(-0.75), sp(0.25) + sp(-0.25)), **TOL)
    assert_close(out.metrics["delta"], t(0.25, 0.25), **TOL)
    check_rewards(out, 0.5)


# ----------------------------------------------------------------------------- AOT
def test_aot_unpaired_sorts_chosen_and_rejected_log_ratios():
    """beta = 1, references 0: h_w = (0.5, -1, 2), h_l = (0, 1, -2).

    sorted h_w = (-1, 0.5, 2), sorted h_l = (-2, 0, 1): differences (1, 0.5, 1)
    -> losses sp(-1), sp(-0.5), sp(-1)  (pair by pair, DPO would see margins 0.5, -2, 4).
    With eps = 0.1: sp(-x) + eps x (cDPO identity) -> sp(-1) + 0.1, sp(-0.5) + 0.05, sp(-1) + 0.1.
    """
    zero = t(0.0, 0.0, 0.0)
    pc, pr = t(0.5, -1.0, 2.0), t(0.0, 1.0, -2.0)
    out = aot_loss(pc, pr, zero, zero, beta=1.0)
    assert_close(out.losses, t(sp(-1.0), sp(-0.5), sp(-1.0)), **TOL)
    check_rewards(out, 1.0, chosen=(0.5, -1.0, 2.0), rejected=(0.0, 1.0, -2.0))
    smoothed = aot_loss(pc, pr, zero, zero, beta=1.0, label_smoothing=0.1)
    assert_close(smoothed.losses, t(sp(-1.0) + 0.1, sp(-0.5) + 0.05, sp(-1.0) + 0.1), **TOL)


def test_aot_depends_only_on_the_sorted_values():
    pc, pr, rc, rr = random_inputs(6)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    base = aot_loss(pc, pr, rc, rr, beta=0.3).losses
    assert_close(aot_loss(pc[perm], pr, rc[perm], rr, beta=0.3).losses, base, **TOL)  # chosen permuted alone
    assert_close(aot_loss(pc, pr[perm], rc, rr[perm], beta=0.3).losses, base, **TOL)
    paired = aot_pair_loss(pc, pr, rc, rr, beta=0.3).losses
    assert_close(aot_pair_loss(pc, pr, rc[perm], rr[perm], beta=0.3).losses, paired, **TOL)  # reference pairs permuted
    with pytest.raises(ValueError, match="label_smoothing"):
        aot_loss(pc, pr, rc, rr, label_smoothing=0.5)


def test_aot_pair_hand_value():
    """beta = 1: policy margins log pi(y_w) - log pi(y_l) = (0.5, -2, 4); reference margins (0, 1, -1).

    sorted (-2, 0.5, 4) - sorted (-1, 0, 1) = (-1, 0.5, 3) -> sp(1), sp(-0.5), sp(-3).
    """
    out = aot_pair_loss(t(0.5, -1.0, 2.0), t(0.0, 1.0, -2.0), t(0.0, 1.0, -1.0), t(0.0, 0.0, 0.0), beta=1.0)
    assert_close(out.losses, t(sp(1.0), sp(-0.5), sp(-3.0)), **TOL)
    check_rewards(out, 1.0, chosen=(0.5, -2.0, 3.0), rejected=(0.0, 1.0, -2.0))


# ----------------------------------------------------------------------------- GPO
GPO_M = (t(-1.0, -2.0, -2.5), t(-3.0, -2.0, -1.5), t(-2.0, -2.0, -2.0), t(-2.0, -2.0, -2.0))  # m = (2, 0, -1)


@pytest.mark.parametrize(
    "function,expected",
    [
        ("logistic", (sp(-1.0), math.log(2.0), sp(0.5))),
        ("hinge", (0.0, 1.0, 1.5)),
        ("squared", (0.0, 1.0, 2.25)),
        ("exponential", (math.exp(-1.0), 1.0, math.exp(0.5))),
        ("truncated_quadratic", (0.0, 1.0, 2.25)),
        ("savage", (1 / (1 + math.e) ** 2, 0.25, 1 / (1 + math.exp(-0.5)) ** 2)),
    ],
)
def test_gpo_hand_values(function, expected):
    """GPO: loss = f(rho), rho = beta m, beta = 0.5, m = (2, 0, -1) -> rho = (1, 0, -0.5).

    logistic log(1+e^-rho); hinge max(0, 1-rho); squared (rho-1)^2; exponential e^-rho;
    truncated quadratic max(0, 1-rho)^2; savage 1/(1+e^rho)^2.
    """
    out = gpo_loss(*GPO_M, beta=0.5, function=function)
    assert_close(out.losses, t(*expected), **TOL)
    check_rewards(out, 0.5, chosen=(1.0, 0.0, -0.5), rejected=(-1.0, 0.0, 0.5))


def test_gpo_special_cases_are_dpo_slic_and_ipo():
    """logistic == DPO, hinge == SLiC hinge; squared: (beta m - 1)^2 = beta^2 (m - 1/beta)^2
    = beta^2 IPO(tau = beta/2)."""
    pc, pr, rc, rr = random_inputs()
    assert_close(
        gpo_loss(pc, pr, rc, rr, beta=0.3, function="logistic").losses, dpo_loss(pc, pr, rc, rr, beta=0.3).losses, **TOL
    )
    assert_close(
        gpo_loss(pc, pr, rc, rr, beta=0.3, function="hinge").losses, hinge_loss(pc, pr, rc, rr, beta=0.3).losses, **TOL
    )
    assert_close(
        gpo_loss(pc, pr, rc, rr, beta=0.3, function="squared").losses,
        0.09 * ipo_loss(pc, pr, rc, rr, beta=0.15).losses,
        **TOL,
    )


def test_gpo_unknown_function_lists_the_choices():
    with pytest.raises(
        ValueError,
        match=r"unknown GPO function 'cubic'; choose one of "
        r"\['exponential', 'hinge', 'logistic', 'savage', 'squared', 'truncated_quadratic'\]",
    ):
        gpo_loss(PC, PR, RC, RR, function="cubic")
    with pytest.raises(
        SettingError,
        match=re.escape(
            "GPO: function must be one of logistic, hinge, squared, exponential, truncated_quadratic, "
            "savage, got 'cubic'"
        ),
    ):
        GPO(function="cubic")
    # the CLI's choices are the dict's keys
    assert set(typing.get_args(typing.get_type_hints(GPO.__init__)["function"])) == set(GPO_FUNCTIONS)


# ----------------------------------------------------------------------------- modules
MODULES = [
    (RDPO, {}),
    (DPOP, {}),
    (BetaDPO, {}),
    (ODPO, {}),
    (EXO, {}),
    (NCA, {}),
    (APOZero, {}),
    (APODown, {}),
    (SPPOHard, {}),
    (BCOPair, {}),
    (AOT, {}),
    (AOT, {"variant": "unpaired"}),
    (GPO, {"function": "savage"}),
]


@pytest.fixture(scope="module")
def batch():
    from lit_align.model.tiny import build_tiny_tokenizer

    data = PreferenceDataModule(
        batch_size=6, max_length=48, task=WordRulesTask(num_train=12, num_val=4), use_cache=False
    )
    data.tokenizer = build_tiny_tokenizer()
    data.setup()
    return next(iter(data.train_dataloader()))


@pytest.mark.parametrize(
    "cls,kwargs", MODULES, ids=[c.__name__ + "".join(f"-{v}" for v in k.values()) for c, k in MODULES]
)
def test_module_returns_a_finite_loss(cls, kwargs, batch):
    torch.manual_seed(0)
    module = cls(**kwargs)
    output = module.forward_pair(batch)
    assert output.losses.shape == (6,) and torch.isfinite(output.losses).all()
    assert torch.isfinite(output.losses.mean())
    assert all(v.shape == (6,) for v in output.metrics.values())


def test_odpo_module_reads_the_batch_scores(batch):
    """A fresh policy equals its reference copy, so m = 0 and loss = sp(Delta): scores (3, 1) and
    (NaN, 1) with log f, alpha = 0.5, default 0.2 -> Delta = 0.5 log 2 on scored pairs, 0.2 on the others."""
    scored = dict(batch)
    scored["score_chosen"] = torch.tensor([3.0] * 3 + [math.nan] * 3)
    scored["score_rejected"] = torch.ones(6)
    output = ODPO(alpha=0.5, default_offset=0.2).forward_pair(scored)
    assert_close(output.metrics["offset"].double(), t(*[0.5 * math.log(2.0)] * 3, *[0.2] * 3), **TOL)
    assert_close(output.losses.double(), t(*[sp(0.5 * math.log(2.0))] * 3, *[sp(0.2)] * 3), rtol=1e-5, atol=1e-5)


def test_running_statistics_update_in_training_only(batch):
    beta_dpo, bco = BetaDPO(rho=0.5), BCOPair()
    for module in (beta_dpo, bco):
        module.eval()
        module.forward_pair(batch)
    assert beta_dpo.margin_updates.item() == 0 and bco.reward_shift.count.item() == 0
    for module in (beta_dpo, bco):
        module.train()
        output = module.forward_pair(batch)
    assert beta_dpo.margin_updates.item() == 1 and bco.reward_shift.count.item() == 1
    assert output.metrics["delta"].shape == (6,)
    assert {"margin_mean", "margin_std", "margin_updates"} <= set(beta_dpo.state_dict())  # checkpointed
    assert "reward_shift.value" in bco.state_dict()
    kept = beta_dpo.forward_pair(batch).metrics["kept"]
    assert kept.sum().item() == 3  # rho = 0.5 of 6 pairs
    with pytest.raises(SettingError, match=re.escape("BetaDPO: rho must be in [0, 1), got 1.5")):
        BetaDPO(rho=1.5)
    with pytest.raises(SettingError, match=re.escape("BCOPair: momentum must be in [0, 1), got 1.0")):
        BCOPair(momentum=1.0)
