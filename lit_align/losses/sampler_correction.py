"""The mismatch between the engine that samples and the model that trains, and its corrections.

A rollout engine (vLLM) and the trainer compute the same policy with different kernels and
precision, so the sampling distribution pi_sampler (the engine's) is not quite the trainer's
pi_old, and a PPO/GRPO update that treats the samples as drawn from pi_old is slightly off-policy.
Yao et al. 2025 ("Your efficient RL framework secretly brings you off-policy RL training") weight
each token's policy-gradient term by the importance ratio

    rho_t = pi_old(y_t | x, y_<t) / pi_sampler(y_t | x, y_<t) = exp(log pi_old - log pi_sampler),

with pi_old the trainer's recomputed log-probs of the sampled tokens and pi_sampler the engine's,
and bound it: truncated IS (TIS) uses min(rho_t, C); masked IS (MIS, their follow-up) drops the
tokens whose ratio exceeds C, w_t = rho_t * 1[rho_t <= C]. The weight is a constant (no
gradient). Every per-token term of the surrogates here is linear in the advantage, e.g. PPO's
min(r A, clip(r) A), and w >= 0, so weighting the term equals weighting the token's advantage:
:meth:`lit_align.methods.on_policy.OnPolicyModule` multiplies ``advantages`` by w.
"""

from __future__ import annotations

from typing import Callable

import torch

from lit_align.losses.policy_gradient import masked_mean


def importance_ratio(trainer_logps: torch.Tensor, sampler_logps: torch.Tensor) -> torch.Tensor:
    """rho_t = exp(log pi_old - log pi_sampler) per token (1 where both are 0, off the mask)."""
    return torch.exp(trainer_logps.detach() - sampler_logps.detach())


def truncated_importance_weights(
    trainer_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor, cap: float
) -> torch.Tensor:
    """TIS (Yao et al. 2025, token level): w_t = min(rho_t, C), 0 off the mask.

    By hand: log pi_old = -1.0, log pi_sampler = -1.5 gives rho = e^0.5 = 1.6487: w = 1.6487 with
    C = 2, w = 1.2 with C = 1.2; rho below 1 (the engine found the token likelier) is kept as is."""
    return importance_ratio(trainer_logps, sampler_logps).clamp(max=cap) * mask


def masked_importance_weights(
    trainer_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor, cap: float
) -> torch.Tensor:
    """MIS (masked importance sampling, token level): w_t = rho_t * 1[rho_t <= C], 0 off the mask:
    a token the engine sampled far more rarely than the trainer would is dropped rather than
    down-weighted to C (which TIS keeps, biased). By hand: rho = 1.6487 gives 1.6487 with C = 2
    and 0 with C = 1.2."""
    ratio = importance_ratio(trainer_logps, sampler_logps)
    return ratio * (ratio <= cap) * mask


SAMPLER_CORRECTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "tis": truncated_importance_weights,
    "mis": masked_importance_weights,
}
"""Weights of each ``sampler_correction.kind``: (trainer log-probs, sampler log-probs, mask, cap) -> w."""


def sampler_mismatch(
    trainer_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """How far the sampler's token log-probs are from the trainer's, over the completion tokens:

    - ``kl``: token mean of log pi_sampler - log pi_old, the k1 estimate of KL(pi_sampler || pi_old)
      from the sampler's own samples (0 when the two agree; Yao et al. 2025 log the same gap);
    - ``k3``: token mean of (rho - 1) - log rho, the always-non-negative estimator of the same KL
      (Schulman 2020), rho = pi_old / pi_sampler;
    - ``max_ratio``: the largest rho_t (how far a TIS cap would truncate);
    - ``min_ratio``: the smallest rho_t.

    By hand, one token with log pi_old = -1, log pi_sampler = -1.5: kl = -0.5, rho = e^0.5,
    k3 = e^0.5 - 1 - 0.5 = 0.1487."""
    log_ratio = (trainer_logps - sampler_logps).detach()
    ratio = torch.exp(log_ratio)
    mask = mask.bool()
    if not mask.any():
        zero = log_ratio.new_zeros(())
        return {"kl": zero, "k3": zero, "max_ratio": zero + 1, "min_ratio": zero + 1}
    return {
        "kl": masked_mean(-log_ratio, mask),
        "k3": masked_mean((ratio - 1) - log_ratio, mask),
        "max_ratio": ratio[mask].max(),
        "min_ratio": ratio[mask].min(),
    }
