"""Critic-free policy-gradient methods: REINFORCE with a baseline, RLOO and GRPO."""

from __future__ import annotations

from typing import Annotated, Literal

import torch

from lit_align.errors import SettingError
from lit_align.losses.policy_gradient import (
    aggregate,
    clipped_surrogate,
    group_normalised_advantages,
    kl_k2,
    kl_k3,
    leave_one_out_advantages,
    masked_mean,
)
from lit_align.methods.on_policy import OnPolicyModule, PolicyPass
from lit_align.methods.running import RunningMean
from lit_align.online.kl_control import KLPenalty
from lit_align.online.rollout import Rollout
from lit_align.settings import ClipRange, Momentum, Range, as_settings

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
        advantage = part.extra["advantage"]
        loss = -(advantage * current.logps.sum).mean()
        return loss, {"loss/policy": loss.detach(), "advantages": advantage}


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


class GRPO(OnPolicyModule):
    """Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath, eq. 3 and sec. 4.1.2).

    k completions per prompt; advantage of every token of completion i is the group-normalised
    score (r_i - mean r) / std r; clipped-ratio surrogate over ``epochs`` of minibatch reuse; the
    KL to the reference is a k3 term in the loss (eq. 4), weighted by ``kl.beta`` (not a reward
    penalty). The KL controller still adapts beta when ``kl.target`` is set. The estimator is
    always k3 (the logged ``objective/kl`` too): ``kl.estimator`` must be k3 or left at its default.

    Args:
        clip: epsilon of the clipped ratio.
        loss_aggregation: ``sequence`` (mean over each completion's tokens, then over completions:
            the paper) or ``token`` (mean over all completion tokens of the minibatch: DAPO).
        scale_advantages: divide by the group's std (false: Dr. GRPO's mean shift only).
        (everything else: :class:`lit_align.methods.on_policy.OnPolicyModule`)
    """

    def __init__(
        self,
        *args,
        samples_per_prompt: Annotated[int, Range(2)] = 4,
        clip: ClipRange = 0.2,
        loss_aggregation: Literal["sequence", "token"] = "sequence",
        scale_advantages: bool = True,
        **kwargs,
    ):
        super().__init__(*args, samples_per_prompt=samples_per_prompt, **kwargs)
        self.clip, self.loss_aggregation, self.scale_advantages = clip, loss_aggregation, scale_advantages

    def check_settings(self) -> None:
        """Also refuse ``reward_normalization`` with ``scale_advantages`` and any KL estimator but
        k3 (the default k1 is accepted: it cannot be told from an unset one)."""
        super().check_settings()
        h = self.hparams
        if h.get("scale_advantages") and h.get("reward_normalization"):
            raise SettingError(
                "GRPO",
                "reward_normalization",
                "must be unset with scale_advantages: GRPO standardises each group's scores itself",
                hint="set scale_advantages false (Dr. GRPO) where the scores' scale should matter",
            )
        estimator = as_settings(h.get("kl"), KLPenalty).estimator
        if estimator not in ("k3", KLPenalty.estimator):
            raise SettingError(
                "GRPO",
                "kl.estimator",
                f"must be k3 or unset, got {estimator!r}: GRPO's KL term in the loss is always the k3 estimator "
                "(DeepSeekMath, eq. 4)",
            )

    def token_kl(self, rollout: Rollout) -> torch.Tensor:
        if rollout.ref_logps is None:
            return torch.zeros_like(rollout.old_logps)
        return kl_k3(rollout.old_logps, rollout.ref_logps) * rollout.mask

    def prepare(self, rollout: Rollout) -> None:
        advantages = group_normalised_advantages(rollout.scores, self.samples_per_prompt, self.scale_advantages)
        rollout.advantages = advantages[:, None] * rollout.mask

    def loss(self, part: Rollout, current: PolicyPass) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mask = part.mask
        surrogate, ratio, clipped = clipped_surrogate(current.logps.tokens, part.old_logps, part.advantages, self.clip)
        kl = kl_k3(current.logps.tokens, part.ref_logps) if part.ref_logps is not None else torch.zeros_like(surrogate)
        per_token = surrogate + self.kl_controller.beta * kl
        loss = aggregate(per_token, mask, self.loss_aggregation)
        return loss, {
            "loss/policy": aggregate(surrogate, mask, self.loss_aggregation).detach(),
            "policy/kl": masked_mean(kl, mask).detach(),
            "policy/clipfrac": masked_mean(clipped.float(), mask),
            "policy/approxkl": masked_mean(kl_k2(current.logps.tokens.detach(), part.old_logps), mask),
        }
