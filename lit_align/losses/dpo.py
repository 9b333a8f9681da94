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


# ---- shared by the DPO family (this module, dpo_variants, gpo, tdpo) --------------------------
def log_ratios(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h_w, h_l): the log-ratios h = log pi(y|x) - log pi_ref(y|x) of the chosen and the
    rejected response; the log-ratio margin is m = h_w - h_l."""
    return policy_chosen - reference_chosen, policy_rejected - reference_rejected


def preference_output(
    losses: torch.Tensor,
    chosen_ratio: torch.Tensor,
    rejected_ratio: torch.Tensor,
    beta: float,
    metrics: dict[str, torch.Tensor] | None = None,
) -> PreferenceLoss:
    """A :class:`PreferenceLoss` whose rewards are the DPO implicit rewards r = beta h (Rafailov
    et al. 2023, Sec. 5) of the log-ratios ``chosen_ratio``/``rejected_ratio``, detached like the
    ``metrics``."""
    chosen, rejected = (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()
    return PreferenceLoss(losses, chosen, rejected, {k: v.detach() for k, v in (metrics or {}).items()})


def check_label_smoothing(label_smoothing: float) -> None:
    """Raise ValueError unless the assumed label-noise rate eps is in [0, 0.5)."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")


def conservative_logistic(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """The cDPO loss of a logit x (conservative DPO, Mitchell 2023; DPO's Eq. 7 at eps = 0):

        -(1 - eps) log sigma(x) - eps log sigma(-x)

    the cross-entropy against the preference label smoothed by the label-noise rate
    eps = ``label_smoothing``; its minimum sits at the finite x = log((1 - eps) / eps)."""
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


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
    check_label_smoothing(label_smoothing)
    h_w, h_l = log_ratios(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    losses = conservative_logistic(beta * h_w - beta * h_l, label_smoothing)
    return preference_output(losses, h_w, h_l, beta)


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
    check_label_smoothing(label_smoothing)
    h_w, h_l = log_ratios(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    logits = beta * h_w - beta * h_l
    losses = (-(1 - label_smoothing) * F.logsigmoid(logits) + label_smoothing * F.logsigmoid(-logits)) / (
        1 - 2 * label_smoothing
    )
    return preference_output(losses, h_w, h_l, beta)


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
    h_w, h_l = log_ratios(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    losses = torch.relu(1 - (beta * h_w - beta * h_l))
    return preference_output(losses, h_w, h_l, beta)


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
    h_w, h_l = log_ratios(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    losses = (h_w - h_l - 1 / (2 * beta)) ** 2
    return preference_output(losses, h_w, h_l, beta)
