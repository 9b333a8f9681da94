"""Critic-free policy-gradient methods: REINFORCE with a baseline and RLOO (GRPO: ``grpo.py``)."""

from __future__ import annotations

from typing import Annotated, Literal

import torch

from lit_align.errors import SettingError
from lit_align.losses.policy_gradient import (
    leave_one_out_advantages,
)
from lit_align.methods.on_policy import OnPolicyModule, PolicyPass
from lit_align.methods.running import RunningMean
from lit_align.online.rollout import Rollout
from lit_align.settings import Momentum, Range

BASELINE_MOMENTUM = 0.9
"""REINFORCE's default ``baseline_momentum``."""


class SequencePolicyGradient(OnPolicyModule):
    """REINFORCE-style update with one advantage per completion: loss = -mean_i A_i sum_t log pi(y_it)
    (the score-function estimator, Williams 1992), A_i from :meth:`sequence_advantages` of the
    KL-penalised return R_i = score_i - beta sum_t KL_it (Ziegler et al. 2019, eq. 2)."""

    def sequence_advantages(self, returns: torch.Tensor, rollout: Rollout) -> torch.Tensor:
        raise NotImplementedError

    def prepare(self, rollout: Rollout) -> None:
        returns = rollout.scores - self.kl_controller.beta * self.token_kl(rollout).sum(-1)
        rollout.extra["advantage"] = self.sequence_advantages(returns, rollout)
        rollout.advantages = rollout.extra["advantage"][:, None] * rollout.mask

    def loss(self, part: Rollout, current: PolicyPass) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # A_i sum_t log pi(y_it), written over tokens: the per-token advantages are A_i on each
        # completion token unless ``sampler_correction`` weighted them token by token.
        loss = -(part.advantages * current.logps.tokens * part.mask).sum(-1).mean()
        return loss, {"loss/policy": loss.detach(), "advantages": part.extra["advantage"]}


class REINFORCE(SequencePolicyGradient):
    """REINFORCE with a baseline (Williams 1992, eq. 9; for LMs, Ahmadian et al. 2024, sec. 3):
    A_i = R_i - b with b the batch mean of the returns or a moving average across steps.

    Args:
        baseline: ``moving_average`` (exponential, across rollouts; checkpointed) or ``batch_mean``.
        baseline_momentum: weight of the old value in the moving average.
        (everything else: :class:`lit_align.methods.on_policy.OnPolicyModule`)
    """

    def __init__(
        self,
        *args,
        baseline: Literal["moving_average", "batch_mean"] = "moving_average",
        baseline_momentum: Momentum = BASELINE_MOMENTUM,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.baseline = baseline
        self.running_return = RunningMean(baseline_momentum)

    def check_settings(self) -> None:
        """Also refuse ``baseline_momentum`` with the batch-mean baseline, which has no moving average."""
        super().check_settings()
        momentum = self.hparams.get("baseline_momentum")
        if self.hparams.get("baseline") == "batch_mean" and momentum != BASELINE_MOMENTUM:
            raise SettingError(
                "REINFORCE",
                "baseline_momentum",
                f"must be unset with baseline=batch_mean, got {momentum!r}: only the moving_average baseline uses it",
            )

    def sequence_advantages(self, returns: torch.Tensor, rollout: Rollout) -> torch.Tensor:
        if self.baseline == "batch_mean":
            return returns - returns.mean()
        if self.running_return.count == 0:  # first rollout: its own mean is the best guess
            self.running_return.update(returns.sum(), returns.numel())
        advantages = returns - self.running_return.value
        self.running_return.update(returns.sum(), returns.numel())  # after use: b never sees R_i
        return advantages


class RLOO(SequencePolicyGradient):
    """REINFORCE Leave-One-Out (Ahmadian et al. 2024, eq. 7): k completions per prompt, each
    baselined by the mean return of the other k - 1. Needs ``samples_per_prompt`` >= 2."""

    def __init__(self, *args, samples_per_prompt: Annotated[int, Range(2)] = 4, **kwargs):
        super().__init__(*args, samples_per_prompt=samples_per_prompt, **kwargs)

    def sequence_advantages(self, returns: torch.Tensor, rollout: Rollout) -> torch.Tensor:
        return leave_one_out_advantages(returns, self.samples_per_prompt)
