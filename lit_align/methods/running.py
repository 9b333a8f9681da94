"""Running statistics that objectives keep across steps (checkpointed as buffers)."""

from __future__ import annotations

from typing import Optional

import torch


class RunningMean(torch.nn.Module):
    """A running mean in buffers ``value`` and ``count``, so checkpoints carry it.

    ``momentum=None``: the mean of every value folded in so far. A momentum in [0, 1): an
    exponential moving average with that weight on the old value. The first update sets it.

    Args:
        momentum: None (cumulative mean) or the weight of the old value in [0, 1) (the modules
            that keep one check the range when they are built: their settings are ``Momentum``).
    """

    def __init__(self, momentum: Optional[float] = None):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("value", torch.zeros(()))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, total: torch.Tensor, count: int | torch.Tensor) -> None:
        """Fold in ``count`` values summing to ``total``."""
        count = int(count)
        if count <= 0:
            return
        mean = (total / count).to(self.value.dtype)
        if self.count == 0:
            weight = 0.0
        elif self.momentum is None:  # old values weighted by how many there were
            weight = float(self.count) / (float(self.count) + count)
        else:
            weight = self.momentum
        self.value.mul_(weight).add_((1 - weight) * mean)
        self.count += count


class RunningMoments(torch.nn.Module):
    """Running mean and variance of every value folded in so far, in buffers (``mean``, ``var``,
    ``count``) so checkpoints carry them; batches are merged exactly (Chan et al. 1979, the
    parallel update OpenAI baselines' ``RunningMeanStd`` and TRL's ``RunningMoments`` use)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("var", torch.ones((), dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, total: torch.Tensor, total_of_squares: torch.Tensor, count: int | torch.Tensor) -> None:
        """Fold in ``count`` values with sum ``total`` and sum of squares ``total_of_squares``
        (sums, so that processes can all-reduce them before the update)."""
        count = int(count)
        if count <= 0:
            return
        batch_mean = total.double() / count
        batch_var = (total_of_squares.double() / count - batch_mean**2).clamp(min=0)
        old = float(self.count)
        merged = old + count
        delta = batch_mean - self.mean
        self.var.copy_((self.var * old + batch_var * count + delta**2 * old * count / merged) / merged)
        self.mean.add_(delta * count / merged)
        self.count += count

    @property
    def std(self) -> torch.Tensor:
        return self.var.sqrt()
