"""Pure pieces of Trust Region Policy Optimization (Schulman et al. 2015, "Trust Region Policy
Optimization", sec. 6 and appendix C): the surrogate, the exact categorical KL, Fisher-vector
products by double backprop, conjugate gradient and the backtracking line search.

TRPO solves (eq. 14)  max_theta L(theta)  s.t.  mean KL(pi_old || pi_theta) <= delta
with L(theta) = E[pi_theta(a|s) / pi_old(a|s) A] by a natural-gradient step: s = F^-1 g from
conjugate gradient on Fisher-vector products (F = the Hessian of the mean KL at theta_old),
scaled to the trust region's border, beta = sqrt(2 delta / s^T F s) (appendix C), then shrunk
until the surrogate improves and the measured KL is within delta.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from lit_align.losses.policy_gradient import masked_mean


def trpo_surrogate(
    logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Surrogate advantage L(theta) (Schulman et al. 2015, eq. 14), to maximise: the mean over
    completion tokens of r_t A_t with r_t = exp(log pi_theta(y_t) - log pi_old(y_t)).
    ``[N, T]`` inputs (``advantages`` already broadcast per token); scalar out."""
    return masked_mean((logps - old_logps).exp() * advantages, mask)


def categorical_kl(old_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(p_old || p) = sum_v p_old(v) (log p_old(v) - log p(v)) over the last (vocabulary)
    dimension, exactly (not a sampled estimate). ``[..., V]`` in, ``[...]`` out."""
    old = old_logits.float().log_softmax(-1)
    return (old.exp() * (old - logits.float().log_softmax(-1))).sum(-1)


def flat(tensors: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor]) -> torch.Tensor:
    """One float32 vector of ``tensors`` (a gradient per parameter; None counts as zeros)."""
    return torch.cat(
        [(t if t is not None else torch.zeros_like(p)).reshape(-1).float() for t, p in zip(tensors, like, strict=True)]
    )


def fisher_vector_product(
    kl: torch.Tensor, params: Sequence[torch.Tensor], damping: float = 0.0
) -> Callable[[torch.Tensor], torch.Tensor]:
    """v -> (F + damping I) v with F = d^2 kl / d params^2 (Schulman et al. 2015, appendix C.1).

    ``kl`` is the mean KL(pi_old || pi_theta) built with a graph to ``params`` and evaluated at
    theta_old (old logits detached): its gradient is zero there and its Hessian is the Fisher
    information matrix. The gradient is taken once with ``create_graph=True``; each product is
    one more backward pass through it (double backprop), so F is never formed."""
    params = list(params)
    grads = flat(torch.autograd.grad(kl, params, create_graph=True, allow_unused=True), params)

    def product(vector: torch.Tensor) -> torch.Tensor:
        hvp = torch.autograd.grad(grads @ vector.to(grads.dtype), params, retain_graph=True, allow_unused=True)
        return flat(hvp, params) + damping * vector

    return product


def conjugate_gradient(
    matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, iterations: int = 10, tolerance: float = 1e-10
) -> torch.Tensor:
    """Approximate solution x of A x = b for symmetric positive-definite A given only v -> A v
    (Hestenes & Stiefel 1952; Schulman et al. 2015, appendix C): ``iterations`` steps from
    x = 0, stopping early once the squared residual is below ``tolerance``."""
    x = torch.zeros_like(b)
    residual = b.clone()
    direction = b.clone()
    rr = residual @ residual
    for _ in range(iterations):
        if rr <= tolerance:
            break
        a_direction = matvec(direction)
        alpha = rr / (direction @ a_direction)
        x = x + alpha * direction
        residual = residual - alpha * a_direction
        new_rr = residual @ residual
        direction = residual + (new_rr / rr) * direction
        rr = new_rr
    return x


def trust_region_step_size(direction: torch.Tensor, fisher_direction: torch.Tensor, max_kl: float) -> float:
    """beta = sqrt(2 delta / s^T F s) (Schulman et al. 2015, appendix C): the step beta s reaches
    the border of the quadratic trust region, 1/2 (beta s)^T F (beta s) = delta. 0 when
    s^T F s is not positive (no direction to step in)."""
    curvature = float(direction @ fisher_direction)
    return (2 * max_kl / curvature) ** 0.5 if curvature > 0 else 0.0


class LineSearchResult(NamedTuple):
    """Outcome of :func:`backtracking_line_search`."""

    accepted: bool
    fraction: float
    """Fraction of the full step taken (0 when rejected)."""
    steps: int
    """Candidates evaluated."""
    surrogate: float
    """Surrogate at the kept parameters (the old value when rejected)."""
    kl: float
    """Measured mean KL at the kept parameters (0 when rejected)."""


def backtracking_line_search(
    evaluate: Callable[[float], tuple[float, float]],
    old_surrogate: float,
    max_kl: float,
    max_backtracks: int = 10,
    factor: float = 0.5,
) -> LineSearchResult:
    """Try fractions 1, factor, factor^2, ... of the full natural-gradient step (at most
    ``max_backtracks``) and accept the first whose surrogate exceeds ``old_surrogate`` and whose
    measured mean KL is at most ``max_kl`` (Schulman et al. 2015, appendix C: "we perform the line
    search on the objective L(theta) - X[KL <= delta]"). ``evaluate(fraction)`` puts the
    parameters at theta_old + fraction * step and returns (surrogate, kl); the caller restores
    theta_old when nothing is accepted."""
    fraction = 1.0
    for step in range(1, max_backtracks + 1):
        surrogate, kl = evaluate(fraction)
        if surrogate > old_surrogate and kl <= max_kl:
            return LineSearchResult(True, fraction, step, surrogate, kl)
        fraction *= factor
    return LineSearchResult(False, 0.0, max_backtracks, old_surrogate, 0.0)
