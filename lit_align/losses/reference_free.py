"""Reference-free preference objectives: ORPO, SimPO, CPO. No reference model is ever built.

Inputs are the policy's response log-probs: summed ``[B]`` (``*_logps``) and token counts
``[B]`` (``*_lengths``) where an objective length-normalises.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lit_align.losses.types import PreferenceLoss


def orpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    lam: float = 0.1,
) -> PreferenceLoss:
    """ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference
    Model", Eqs. 4-7).

    With the length-normalised log-likelihood s(y) = log pi(y|x) / |y| and
    log odds(y) = s(y) - log(1 - exp(s(y))):

        L_OR  = -log sigma(log odds(y_w) - log odds(y_l))            (Eq. 7)
        L_SFT = -s(y_w)                                              (NLL per chosen token)
        loss  = L_SFT + lambda * L_OR                                (Eq. 6)

    Args:
        lam: lambda, weight of the odds-ratio term against the SFT term.

    Metrics: ``nll_loss`` (L_SFT), ``log_odds_ratio`` (log sigma of the log-odds difference, the
    quantity ORPO maximises), ``log_odds_chosen`` (the log-odds difference). Rewards are
    lambda * s(y), as in the reference implementation.
    """
    chosen_mean = chosen_logps / chosen_lengths.clamp(min=1)
    rejected_mean = rejected_logps / rejected_lengths.clamp(min=1)
    log_odds = (chosen_mean - rejected_mean) - (_log1mexp(chosen_mean) - _log1mexp(rejected_mean))
    log_odds_ratio = F.logsigmoid(log_odds)
    nll = -chosen_mean
    losses = nll - lam * log_odds_ratio
    metrics = {
        "nll_loss": nll.detach(),
        "log_odds_ratio": log_odds_ratio.detach(),
        "log_odds_chosen": log_odds.detach(),
    }
    return PreferenceLoss(losses, lam * chosen_mean.detach(), lam * rejected_mean.detach(), metrics)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable near 0 and for very negative x."""
    x = x.clamp(max=-1e-6)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def simpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 1.0,
) -> PreferenceLoss:
    """SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free
    Reward", Eq. 6).

        r(y)  = beta / |y| * log pi(y|x)                 (length-normalised reward, Eq. 4)
        loss  = -log sigma(r(y_w) - r(y_l) - gamma)      (target reward margin gamma)

    Args:
        beta: reward scale.
        gamma: target reward margin; the paper's tuned gamma / beta is around 0.5.
    """
    chosen = beta * chosen_logps / chosen_lengths.clamp(min=1)
    rejected = beta * rejected_logps / rejected_lengths.clamp(min=1)
    losses = -F.logsigmoid(chosen - rejected - gamma)
    return PreferenceLoss(losses, chosen.detach(), rejected.detach())


def cpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    beta: float = 0.1,
    nll_weight: float = 1.0,
) -> PreferenceLoss:
    """CPO (Xu et al. 2024, "Contrastive Preference Optimization", Eq. 3-4 then L = L_prefer + L_NLL).

        L_prefer = -log sigma(beta log pi(y_w|x) - beta log pi(y_l|x))   (DPO with a uniform reference)
        L_NLL    = -log pi(y_w|x) / |y_w|                                 (per-token NLL on chosen)
        loss     = L_prefer + nll_weight * L_NLL

    Args:
        beta: inverse temperature of the preference term.
        nll_weight: weight of the behaviour-cloning NLL term (1 in the paper).

    Metrics: ``nll_loss`` (L_NLL). Rewards are beta log pi(y|x).
    """
    chosen = beta * chosen_logps
    rejected = beta * rejected_logps
    nll = -chosen_logps / chosen_lengths.clamp(min=1)
    losses = -F.logsigmoid(chosen - rejected) + nll_weight * nll
    return PreferenceLoss(losses, chosen.detach(), rejected.detach(), {"nll_loss": nll.detach()})
