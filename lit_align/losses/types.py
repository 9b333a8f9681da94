"""What every paired objective returns."""

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
