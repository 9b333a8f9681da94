"""TDPO: DPO with a token-level forward-KL term (Zeng et al. 2024, "Token-level Direct Preference
Optimization", ICML 2024, Sec. 4).

Inputs are summed response log-probs ``[B]`` of the policy and the reference, as for
:mod:`lit_align.losses.dpo`, plus the sequential KL of each response,

    D_SeqKL(x, y; pi_ref || pi) = sum_t KL(pi_ref(.|x, y_<t) || pi(.|x, y_<t)),

summed over its tokens and taken over the whole vocabulary (:mod:`lit_align.model.token_kl` computes it).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from lit_align.losses.dpo import log_ratios
from lit_align.losses.types import PreferenceLoss

TDPOVariant = Literal["tdpo1", "tdpo2"]


def tdpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    seq_kl_chosen: torch.Tensor,
    seq_kl_rejected: torch.Tensor,
    beta: float = 0.1,
    alpha: float = 0.5,
    variant: TDPOVariant = "tdpo2",
) -> PreferenceLoss:
    """TDPO1 and TDPO2 (Zeng et al. 2024, Sec. 4.3).

    With the DPO reward difference and the difference of sequential KLs (Theorem 4.2 writes the
    Bradley-Terry preference as sigma(u - delta)):

        u     = beta (log pi(y_w|x) - log pi_ref(y_w|x)) - beta (log pi(y_l|x) - log pi_ref(y_l|x))
        delta = beta D_SeqKL(x, y_l; pi_ref || pi) - beta D_SeqKL(x, y_w; pi_ref || pi)

    * TDPO1: loss = -log sigma(u - delta).
    * TDPO2: loss = -log sigma(u - alpha (beta D_SeqKL(y_l) - sg(beta D_SeqKL(y_w)))), where sg is
      the stop-gradient: the chosen response's KL shifts the logit but is not itself optimised,
      and alpha weighs the KL term (the authors' released configuration: alpha = 0.5, beta = 0.1).

    The implicit rewards are those of the preference model sigma(u - delta):
    r = beta (log pi(y|x) - log pi_ref(y|x) + D_SeqKL(x, y; pi_ref || pi)) (as in the authors'
    code), so r_w - r_l = u - delta. Metrics ``kl/chosen`` and ``kl/rejected`` are the two
    D_SeqKL terms (without beta).

    Args:
        seq_kl_chosen: ``[B]`` D_SeqKL(x, y_w; pi_ref || pi), differentiable.
        seq_kl_rejected: ``[B]`` D_SeqKL(x, y_l; pi_ref || pi), differentiable.
        beta: inverse temperature, as in DPO.
        alpha: weight of the KL difference in TDPO2 (unused by TDPO1).
        variant: ``tdpo1`` or ``tdpo2``.
    """
    if variant not in ("tdpo1", "tdpo2"):
        raise ValueError(f"TDPO variant must be 'tdpo1' or 'tdpo2', got {variant!r}")
    h_w, h_l = log_ratios(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    u = beta * (h_w - h_l)
    if variant == "tdpo1":
        logits = u - (beta * seq_kl_rejected - beta * seq_kl_chosen)
    else:
        logits = u - alpha * (beta * seq_kl_rejected - (beta * seq_kl_chosen).detach())
    losses = -F.logsigmoid(logits)
    chosen = beta * (h_w + seq_kl_chosen)
    rejected = beta * (h_l + seq_kl_rejected)
    metrics = {"kl/chosen": seq_kl_chosen.detach(), "kl/rejected": seq_kl_rejected.detach()}
    return PreferenceLoss(losses, chosen.detach(), rejected.detach(), metrics)
