"""REINFORCE++ (Hu 2025, "REINFORCE++: a simple and efficient approach for aligning large language
models"): critic-free, the KL folded into the token rewards, advantages normalised over the global
batch, PPO's clipped token surrogate."""

from __future__ import annotations

import torch

from lit_align.errors import SettingError
from lit_align.losses.grpo_family import clip_higher_surrogate, masked_moments, reinforce_pp_returns, whiten_with
from lit_align.losses.policy_gradient import kl_k2, masked_mean
from lit_align.methods.on_policy import OnPolicyModule, PolicyPass
from lit_align.online.rollout import Rollout
from lit_align.runtime.trainer import distributed
from lit_align.settings import ClipRange


class REINFORCEPlusPlus(OnPolicyModule):
    """REINFORCE++ (Hu 2025, eq. 3-7).

    The token reward is -kl.beta * KL_t (the ``kl.estimator``), plus the completion's score on its
    last token; the return at t is the sum of the rewards from t on (gamma = 1); the advantages are
    the returns whitened over every completion token of the global batch (all processes), with
    no critic and no per-prompt baseline; the update is PPO's clipped surrogate, token mean.

    Args:
        clip: epsilon of the clipped ratio.
        group_baseline: REINFORCE++-baseline: centre each score on the mean of its prompt's
            ``samples_per_prompt`` samples first (needs ``samples_per_prompt`` >= 2).
        (everything else: :class:`lit_align.methods.on_policy.OnPolicyModule`)
    """

    def __init__(self, *args, clip: ClipRange = 0.2, group_baseline: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.clip, self.group_baseline = clip, group_baseline

    def check_settings(self) -> None:
        """Also refuse ``group_baseline`` with one sample per prompt (a group of one has no baseline)."""
        super().check_settings()
        if self.hparams.get("group_baseline") and self.hparams.get("samples_per_prompt", 1) < 2:
            raise SettingError(
                "REINFORCEPlusPlus",
                "group_baseline",
                "needs samples_per_prompt >= 2: a prompt's own samples give its baseline",
            )

    def prepare(self, rollout: Rollout) -> None:
        group = self.samples_per_prompt if self.group_baseline else None
        returns = reinforce_pp_returns(
            rollout.scores, self.token_kl(rollout), self.kl_controller.beta, rollout.mask, group
        )
        moments = masked_moments(returns, rollout.mask).to(returns.device)
        if distributed(self):  # the global batch's mean and variance
            moments = self.trainer.strategy.reduce(moments, reduce_op="sum")
        rollout.advantages = whiten_with(returns, rollout.mask, moments)

    def loss(self, part: Rollout, current: PolicyPass) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mask = part.mask
        surrogate, clipped = clip_higher_surrogate(
            current.logps.tokens - part.old_logps, part.advantages, self.clip, self.clip
        )
        loss = masked_mean(surrogate, mask)
        return loss, {
            "loss/policy": loss.detach(),
            "policy/clipfrac": masked_mean(clipped.float(), mask),
            "policy/approxkl": masked_mean(kl_k2(current.logps.tokens.detach(), part.old_logps), mask),
        }
