"""Reward-model objectives: Bradley-Terry on scalar rewards of pairs and of ranked lists.

Both functions take rewards r(x, y) that a scalar head put on each response (not log-prob
ratios) and return a :class:`RewardLoss`: a loss per prompt plus the reward margin r_w - r_l of
every compared pair, from which pairwise accuracy follows.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from lit_align.losses.types import pairwise_accuracy


class RewardLoss(NamedTuple):
    """Per-prompt losses and per-pair margins of a reward-model objective.

    Attributes:
        losses: ``[B]`` loss of each prompt (its pair, or the mean over its list's pairs).
        margins: ``[P]`` r(x, y_w) - r(x, y_l) of every compared pair (detached), preferred first.
    """

    losses: torch.Tensor
    margins: torch.Tensor

    @property
    def accuracies(self) -> torch.Tensor:
        """``[P]`` 1 where the preferred response has the higher reward, 1/2 on a tie, else 0."""
        return pairwise_accuracy(self.margins)


def bradley_terry_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | None = None
) -> RewardLoss:
    """Pairwise Bradley-Terry reward-model loss (InstructGPT, Ouyang et al. 2022, Eq. 1 with K = 2;
    Llama 2, Touvron et al. 2023, Eq. 1, and Eq. 2 with a margin):

        loss = -log sigma(r(x, y_w) - r(x, y_l) - m)

    With m = 0 this is the negative log-likelihood of the preference under the Bradley-Terry model
    P(y_w > y_l | x) = sigma(r_w - r_l). A margin m > 0 (Llama 2's m(r), larger for pairs rated
    as clearly better) keeps pushing until r_w exceeds r_l by at least about m.

    Args:
        chosen_rewards: ``[B]`` r(x, y_w) of the preferred responses.
        rejected_rewards: ``[B]`` r(x, y_l) of the other responses.
        margin: ``[B]`` per-pair margin m, or None for 0; NaN entries (a pair without a margin
            in data where others have one) count as 0.
    """
    difference = chosen_rewards - rejected_rewards
    offset = 0.0 if margin is None else torch.nan_to_num(margin.to(difference), nan=0.0)
    losses = -F.logsigmoid(difference - offset)
    return RewardLoss(losses, difference.detach())


def listwise_bradley_terry_loss(rewards: torch.Tensor, scores: torch.Tensor) -> RewardLoss:
    """Bradley-Terry over every ordered pair of a ranked list (InstructGPT, Ouyang et al. 2022, Eq. 1):

        loss(x) = -1 / N(x) * sum_{s_i > s_j} log sigma(r(x, y_i) - r(x, y_j))

    over the pairs of responses of prompt x whose scores differ (higher score = preferred); N(x)
    is their number, C(K, 2) when the K scores are all distinct, as in the paper. Pairs tied in
    score carry no preference and are skipped (and not counted in N). All K responses of a
    prompt are scored once and their C(K, 2) comparisons share them, which is why InstructGPT
    trains a prompt's comparisons as one batch element.

    Args:
        rewards: ``[B, K]`` r(x, y_k) (entries of missing responses are ignored, whatever they hold).
        scores: ``[B, K]`` scores (higher = better); NaN marks a missing response (a list
            shorter than K).

    A prompt with no pair of different scores gets loss 0.
    """
    valid = ~torch.isnan(scores)
    rewards = torch.where(
        valid, rewards, torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    )  # NaN-safe gradients
    filled = torch.where(valid, scores, torch.zeros((), dtype=scores.dtype, device=scores.device))
    better = (
        (filled[:, :, None] > filled[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    )  # [b, i, j]: i preferred to j
    difference = rewards[:, :, None] - rewards[:, None, :]
    pair_losses = torch.where(
        better, F.softplus(-difference), torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    )
    losses = pair_losses.sum(dim=(1, 2)) / better.sum(dim=(1, 2)).clamp(min=1)
    return RewardLoss(losses, difference[better].detach())
