"""What every paired and listwise objective returns, and the pairwise accuracy read from its rewards."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import NamedTuple

import torch


class PreferenceLoss(NamedTuple):
    """Per-example outputs of a paired objective.

    Attributes:
        losses: ``[B]`` loss of each pair; the module averages them.
        chosen_rewards: ``[B]`` implicit reward of the chosen response (detached).
        rejected_rewards: ``[B]`` implicit reward of the rejected response (detached).
        metrics: extra ``[B]`` per-example values to log under their names (e.g. ``nll_loss``).
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    metrics: Mapping[str, torch.Tensor] = MappingProxyType({})  # read-only shared default


class ListwiseLoss(NamedTuple):
    """Per-prompt outputs of a listwise objective.

    Attributes:
        losses: ``[B]`` loss of each prompt's list; the module averages them.
        rewards: ``[B, K]`` implicit reward of each response (detached); ranking metrics compare
            them with the scores.
        metrics: extra values to log under their names (``[B]`` or scalars).
    """

    losses: torch.Tensor
    rewards: torch.Tensor
    metrics: Mapping[str, torch.Tensor] = MappingProxyType({})


class UnpairedLoss(NamedTuple):
    """Per-example outputs of an unpaired objective (KTO, NPO, BCO).

    Attributes:
        losses: ``[B]`` loss of each example; the module averages them.
        rewards: ``[B]`` implicit reward of each completion (detached), e.g. beta * log-ratio.
        metrics: extra values to log under their names (``[B]`` or scalars, e.g. ``kl``).
    """

    losses: torch.Tensor
    rewards: torch.Tensor
    metrics: Mapping[str, torch.Tensor] = MappingProxyType({})  # read-only shared default


def pairwise_accuracy(margins: torch.Tensor) -> torch.Tensor:
    """Per-pair accuracy of reward margins r_w - r_l: 1 where the preferred response gets the
    higher reward, 0 where it gets the lower one, and 1/2 on a tie (a coin flip: every margin of
    an untrained policy is 0 at step 0, which then scores chance, not a miss)."""
    return (margins > 0).float() + 0.5 * (margins == 0).float()
