"""The KL penalty of on-policy methods: which estimator, and a fixed or adaptive coefficient beta."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal, Optional

import torch
from torch import nn

from lit_align.settings import NonNegative, Positive, Range


@dataclass
class KLPenalty:
    """Per-token KL penalty to the reference policy.

    Set ``target`` for the adaptive controller; leave it unset for a fixed ``beta``.
    """

    beta: NonNegative = 0.05
    """KL coefficient (the initial one under the adaptive controller)."""
    estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token estimator of KL(pi || pi_ref) on sampled tokens (:mod:`lit_align.losses.policy_gradient`).
    GRPO always uses k3 (k2 is an error there); online DPO uses it for the logged KL only."""
    target: Optional[Positive] = None
    """Adaptive controller: the KL per response (summed over its tokens) to aim for; unset = fixed beta
    (the three settings below are then an error: nothing reads them)."""
    increase_above: Annotated[float, Range(1)] = 1.5
    """Adaptive: multiply beta by ``factor`` when the observed KL exceeds ``increase_above * target``."""
    decrease_below: Annotated[float, Range(0, 1)] = 0.5
    """Adaptive: divide beta by ``factor`` when the observed KL is below ``decrease_below * target``."""
    factor: Annotated[float, Range(1, low_open=True)] = 2.0
    """Adaptive: how much beta moves per update."""

    def set_away_from_default(self, names: tuple[str, ...]) -> list[tuple[str, object]]:
        """(name, value) of each of ``names`` whose value differs from the default: the settings a
        method that does not read them must refuse."""
        default = type(self)()
        return [(name, getattr(self, name)) for name in names if getattr(self, name) != getattr(default, name)]

    def controller(self) -> "KLController":
        return KLController(self)


class KLController(nn.Module):
    """Holds beta as a buffer (so checkpoints resume it) and adapts it after each rollout.

    Adaptive rule (Schulman et al. 2017, PPO, sec. 4, "Adaptive KL Penalty Coefficient"):
    beta <- beta * factor if KL > increase_above * target; beta <- beta / factor if
    KL < decrease_below * target; otherwise unchanged.
    """

    def __init__(self, settings: KLPenalty):
        super().__init__()
        self.settings = settings
        self.register_buffer("beta_value", torch.tensor(float(settings.beta), dtype=torch.float64))

    @property
    def beta(self) -> float:
        return float(self.beta_value)

    @property
    def adaptive(self) -> bool:
        return self.settings.target is not None

    def update(self, observed_kl: float) -> float:
        """Adapt beta to the KL observed in the last rollout (no-op when fixed); returns beta."""
        s = self.settings
        if s.target is not None:
            if observed_kl > s.increase_above * s.target:
                self.beta_value.mul_(s.factor)
            elif observed_kl < s.decrease_below * s.target:
                self.beta_value.div_(s.factor)
        return self.beta
