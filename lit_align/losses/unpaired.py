"""Unpaired objectives: losses on single completions labelled desirable or undesirable.

All functions take the summed completion log-probs ``[B]`` of the policy (``policy_logps``,
log pi(y|x)) and of the reference (``reference_logps``, log pi_ref(y|x)), and a ``[B]`` bool
``desirable`` (the labels), and return a :class:`UnpairedLoss`. With the log-ratio

    r = log pi(y|x) - log pi_ref(y|x),

the implicit reward of a completion is beta * r (detached, in ``rewards``).
"""

from __future__ import annotations

from collections.abc import Callable
from numbers import Number

import torch
import torch.nn.functional as F

from lit_align.losses.types import UnpairedLoss

Gather = Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------- KTO
def kto_reference_point(
    policy_mismatched: torch.Tensor, reference_mismatched: torch.Tensor, gather: Gather | None = None
) -> torch.Tensor:
    """KTO's reference point z0 (Ethayarajh et al. 2024, Sec. 4.1): an estimate of
    KL(pi(y'|x) || pi_ref(y'|x)) from mismatched (prompt x, completion y') rows,

        z0 = max(0, mean over mismatched rows of [log pi(y'|x) - log pi_ref(y'|x)]),

    clamped at 0 (a KL is never negative) and detached: the paper does not back-propagate
    through z0, it only sets the level the rewards are compared against.

    Args:
        policy_mismatched: ``[M]`` summed policy log-probs of the mismatched completions.
        reference_mismatched: ``[M]`` the reference's.
        gather: maps this process's ``[sum, count]`` of the log-ratios to every process's,
            stacked (``LightningModule.all_gather``), so z0 is the mean over the global batch;
            None uses this process's rows only.

    Returns: the scalar z0 (no gradient).
    """
    ratios = (policy_mismatched - reference_mismatched).detach()
    totals = torch.stack([ratios.sum(), ratios.new_tensor(ratios.numel())])
    if gather is not None:
        totals = gather(totals).reshape(-1, 2).sum(0)
    return (totals[0] / totals[1].clamp(min=1)).clamp(min=0)


def kto_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor | Number,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> UnpairedLoss:
    """KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", Eq. 8).

        desirable:    loss = lambda_D (1 - sigma(beta (r - z0)))
        undesirable:  loss = lambda_U (1 - sigma(beta (z0 - r)))

    i.e. lambda_y - v(x, y) with the Kahneman-Tversky value v: a desirable completion gains
    when its log-ratio r rises above the reference point z0, an undesirable one when r falls
    below it. The sigmoid saturates, so examples already far on the right side stop
    contributing (the paper's risk aversion / loss aversion through lambda_D, lambda_U).

    Args:
        kl: z0, the reference point (see :func:`kto_reference_point`); the caller clamps it at 0.
            It is detached here as well, so no gradient ever flows into it.
        beta: scale of the log-ratios inside the sigmoid (the risk aversion of the value
            function); larger beta saturates sooner and keeps the policy closer to the reference.
        desirable_weight: lambda_D, weight of the desirable examples' losses.
        undesirable_weight: lambda_U, weight of the undesirable examples' losses; the paper
            recommends lambda_D n_D / (lambda_U n_U) in [1, 4/3] for n_D desirable and n_U
            undesirable examples.

    Metrics: ``kl`` (z0).
    """
    ratios = policy_logps - reference_logps
    z0 = torch.as_tensor(kl, dtype=ratios.dtype, device=ratios.device).detach()
    desirable = desirable.bool()
    gains = torch.where(desirable, torch.sigmoid(beta * (ratios - z0)), torch.sigmoid(beta * (z0 - ratios)))
    weights = torch.where(desirable, ratios.new_tensor(desirable_weight), ratios.new_tensor(undesirable_weight))
    losses = weights * (1 - gains)
    return UnpairedLoss(losses, (beta * ratios).detach(), {"kl": z0})


# ----------------------------------------------------------------------------- NPO
def npo_loss(
    policy_logps: torch.Tensor, reference_logps: torch.Tensor, beta: float = 0.1, desirable: torch.Tensor | None = None
) -> UnpairedLoss:
    """NPO (Zhang et al. 2024, "Negative Preference Optimization: From Catastrophic Collapse to
    Effective Unlearning", Eq. 3).

        undesirable (forget) examples:  loss = (2 / beta) log(1 + (pi / pi_ref)^beta)
                                             = (2 / beta) softplus(beta r)
        desirable examples:             loss = 0

    DPO with only a losing response: it lowers the likelihood of the undesirable completions.
    Its gradient with respect to log pi is 2 sigma(beta r), which vanishes as pi / pi_ref -> 0;
    plain gradient ascent on the NLL has a constant gradient there and diverges (the paper's
    "catastrophic collapse"). As beta -> 0 the loss tends to gradient ascent (up to a constant).
    Desirable rows give no NPO loss; the module can add a retain term on them (NPO+RT).

    Args:
        beta: inverse temperature; how quickly the push-down saturates once a completion's
            likelihood has dropped below the reference's.
        desirable: ``[B]`` bool labels; None treats every row as undesirable (a forget set).
    """
    ratios = policy_logps - reference_logps
    losses = (2.0 / beta) * F.softplus(beta * ratios)
    if desirable is not None:
        losses = torch.where(desirable.bool(), torch.zeros_like(losses), losses)
    return UnpairedLoss(losses, (beta * ratios).detach())


# ----------------------------------------------------------------------------- BCO
def bco_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    desirable: torch.Tensor,
    delta: torch.Tensor | Number = 0.0,
    beta: float = 0.1,
) -> UnpairedLoss:
    """BCO (Jung et al. 2024, "Binary Classifier Optimization for Large Language Model
    Alignment", the BCO loss with reward shift, Sec. 3).

        desirable:    loss = -log sigma(beta r - delta)
        undesirable:  loss = -log sigma(-(beta r - delta))

    A binary classifier whose logit is the implicit reward beta r shifted by delta, trained to
    label desirable completions 1 and undesirable ones 0; the paper shows its loss bounds the
    DPO loss from above. The reward shift delta (a running mean of the rewards of both
    classes, kept by the module) centres the logits. The paper's optional underlying
    distribution matching (UDM: density-ratio weights from a prompt classifier, for when the
    desirable and undesirable prompts differ in distribution) is not implemented.

    Args:
        delta: the reward shift (scalar; no gradient flows into it).
        beta: scale of the implicit rewards, the strength of the implicit KL penalty.

    Metrics: ``delta``.
    """
    ratios = policy_logps - reference_logps
    rewards = beta * ratios
    delta = torch.as_tensor(delta, dtype=rewards.dtype, device=rewards.device).detach()
    logits = rewards - delta
    losses = -F.logsigmoid(torch.where(desirable.bool(), logits, -logits))
    return UnpairedLoss(losses, rewards.detach(), {"delta": delta})
