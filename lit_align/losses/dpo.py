"""The DPO family: objectives on the policy/reference log-ratio margin of a preference pair.

All functions take summed response log-probs ``[B]`` of the policy (``policy_chosen``,
``policy_rejected``) and of the reference (``reference_chosen``, ``reference_rejected``) and
return a :class:`PreferenceLoss`. With the log-ratio margin

    m = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)),

the implicit rewards are r_w = beta (log pi(y_w|x) - log pi_ref(y_w|x)) and likewise r_l, and
each loss is a function of beta * m.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lit_align.losses.types import PreferenceLoss


def _rewards(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta):
    chosen = beta * (policy_chosen - reference_chosen)
    rejected = beta * (policy_rejected - reference_rejected)
    return chosen, rejected


def _smoothed_logits(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta, label_smoothing):
    """(r_w, r_l, beta * m), after checking the label-noise rate is in [0, 0.5)."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen, rejected = _rewards(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta)
    return chosen, rejected, chosen - rejected


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """DPO (Rafailov et al. 2023, "Direct Preference Optimization", Eq. 7), with cDPO smoothing.

    loss = -(1 - eps) log sigma(beta m) - eps log sigma(-beta m)

    ``eps = label_smoothing = 0`` is DPO's Eq. 7. ``eps > 0`` is conservative DPO (cDPO, Mitchell
    2023): the preference label is assumed flipped with probability eps, so the loss is the
    cross-entropy against the smoothed label and its minimum sits at a finite margin
    beta m = log((1 - eps) / eps) instead of infinity.

    Args:
        beta: inverse temperature; the strength of the implicit KL penalty to the reference.
        label_smoothing: eps in [0, 0.5), the assumed label-noise rate.
    """
    chosen, rejected, logits = _smoothed_logits(
        policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta, label_smoothing
    )
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return PreferenceLoss(losses, chosen.detach(), rejected.detach())


def robust_dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.1,
) -> PreferenceLoss:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO", Eq. 8).

    loss = [(1 - eps)(-log sigma(beta m)) - eps(-log sigma(-beta m))] / (1 - 2 eps)

    An unbiased estimate of the clean-label DPO loss when labels flip with known rate eps:
    unlike cDPO the noisy-label term is subtracted, so its expectation over the noise equals
    the DPO loss of the true labels.

    Args:
        beta: inverse temperature, as in DPO.
        label_smoothing: eps in [0, 0.5), the known label-flip rate.
    """
    chosen, rejected, logits = _smoothed_logits(
        policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta, label_smoothing
    )
    losses = (-(1 - label_smoothing) * F.logsigmoid(logits) + label_smoothing * F.logsigmoid(-logits)) / (
        1 - 2 * label_smoothing
    )
    return PreferenceLoss(losses, chosen.detach(), rejected.detach())


def hinge_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float = 0.1,
) -> PreferenceLoss:
    """Hinge loss on the log-ratio margin (SLiC-HF, Zhao et al. 2023, Eq. 2 calibration term,
    in the reference-normalised form used by DPO implementations).

    loss = max(0, 1 - beta m)

    Pairs whose scaled margin already exceeds 1 contribute no gradient.

    Args:
        beta: inverse of the margin: the loss is zero once m >= 1 / beta.
    """
    chosen, rejected = _rewards(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta)
    losses = torch.relu(1 - (chosen - rejected))
    return PreferenceLoss(losses, chosen.detach(), rejected.detach())


def ipo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float = 0.1,
) -> PreferenceLoss:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", Eq. 17, with tau = beta).

    loss = (m - 1 / (2 tau))^2

    A squared loss that regresses the log-ratio margin to a finite target instead of pushing
    it to infinity, so it does not over-fit deterministic preferences.

    Args:
        beta: tau, the regularisation strength; the target margin is 1 / (2 tau).
    """
    margin = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    losses = (margin - 1 / (2 * beta)) ** 2
    chosen, rejected = _rewards(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta)
    return PreferenceLoss(losses, chosen.detach(), rejected.detach())
