"""Methods with a critic: PPO (clipped surrogate, GAE) and advantage actor-critic (A2C)."""

from __future__ import annotations

from typing import Optional

import torch

from lit_align.losses.policy_gradient import (
    clipped_surrogate,
    clipped_value_loss,
    gae,
    kl_k2,
    masked_mean,
    n_step_advantages,
    token_rewards,
    whiten,
)
from lit_align.methods.on_policy import ActorCriticModule, PolicyPass
from lit_align.online.rollout import Rollout
from lit_align.settings import ClipRange, Count, NonNegative, Positive, Probability


class PPO(ActorCriticModule):
    """Proximal Policy Optimization for language models (Schulman et al. 2017; Ziegler et al. 2019;
    Ouyang et al. 2022, eq. 2).

    Per-token reward: -beta KL_t on every completion token plus the score on the last one;
    advantages by GAE(gamma, lambda) over the completion tokens with the critic's values, returns
    = advantages + values; advantages whitened over the rollout; then ``epochs`` passes of
    minibatches with the sampling log-probs frozen: clipped surrogate (eq. 7), clipped value loss,
    entropy bonus, and optionally the PPO-ptx NLL term (InstructGPT eq. 2) on ``ptx`` batches of
    the data module.

    Args:
        gamma: discount per token.
        lam: GAE lambda (0: TD error, 1: Monte-Carlo return minus value).
        clip: epsilon of the clipped ratio.
        value_clip: epsilon of the clipped value loss (null: unclipped squared error).
        vf_coef: weight of the value loss.
        whiten_advantages: normalise advantages to zero mean, unit variance over the rollout.
        ptx_coef: weight of the NLL on ``ptx`` batches (PPO-ptx; 0 = off). Needs a data module
            that adds them to each training batch (``provides_ptx``): ``PromptDataModule`` with
            ``ptx_train`` set; without one a nonzero value stops before training with an error.
        (everything else: :class:`lit_align.methods.on_policy.OnPolicyModule`)
    """

    def __init__(
        self,
        *args,
        gamma: Probability = 1.0,
        lam: Probability = 0.95,
        clip: ClipRange = 0.2,
        value_clip: Optional[Positive] = 0.2,
        whiten_advantages: bool = True,
        ptx_coef: NonNegative = 0.0,
        epochs: Count = 4,
        **kwargs,
    ):
        super().__init__(*args, epochs=epochs, **kwargs)
        self.gamma, self.lam, self.clip, self.value_clip = gamma, lam, clip, value_clip
        self.whiten_advantages, self.ptx_coef = whiten_advantages, ptx_coef

    def prepare(self, rollout: Rollout) -> None:
        rewards = token_rewards(rollout.scores, self.token_kl(rollout), self.kl_controller.beta, rollout.mask)
        advantages, rollout.returns = gae(rewards, rollout.values, rollout.mask, self.gamma, self.lam)
        rollout.advantages = whiten(advantages, rollout.mask) if self.whiten_advantages else advantages

    def loss(self, part: Rollout, current: PolicyPass) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mask = part.mask
        surrogate, ratio, clipped = clipped_surrogate(current.logps.tokens, part.old_logps, part.advantages, self.clip)
        policy_loss = masked_mean(surrogate, mask)
        if self.value_clip is None:
            value_loss, value_clipped = 0.5 * (current.values - part.returns) ** 2, torch.zeros_like(mask)
        else:
            value_loss, value_clipped = clipped_value_loss(current.values, part.values, part.returns, self.value_clip)
        return self.combine(
            policy_loss,
            masked_mean(value_loss, mask),
            part,
            current,
            {
                "policy/clipfrac": masked_mean(clipped.float(), mask),
                "policy/approxkl": masked_mean(kl_k2(current.logps.tokens.detach(), part.old_logps), mask),
                "value/clipfrac": masked_mean(value_clipped.float(), mask),
            },
        )


class A2C(ActorCriticModule):
    """Advantage actor-critic (Mnih et al. 2016, A3C's synchronous form) with the critic PPO uses.

    Per-token rewards as in PPO (-beta KL_t, score on the last token); advantages are n-step
    TD errors A_t = sum_{i<n} gamma^i r_{t+i} + gamma^n V(s_{t+n}) - V(s_t) (``n_steps=1``:
    TD(0)), bootstrapped from the critic at sampling time; loss = -mean A_t log pi(y_t) +
    vf_coef (V(s_t) - R_t)^2 / 2 - entropy_coef H. One update per rollout by default.

    Args:
        gamma: discount per token.
        n_steps: steps before bootstrapping from the critic (1 = TD(0)).
        (everything else: :class:`lit_align.methods.on_policy.ActorCriticModule`)
    """

    def __init__(self, *args, gamma: Probability = 1.0, n_steps: Count = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.gamma, self.n_steps = gamma, n_steps

    def prepare(self, rollout: Rollout) -> None:
        rewards = token_rewards(rollout.scores, self.token_kl(rollout), self.kl_controller.beta, rollout.mask)
        rollout.advantages, rollout.returns = n_step_advantages(
            rewards, rollout.values, rollout.mask, self.gamma, self.n_steps
        )

    def loss(self, part: Rollout, current: PolicyPass) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mask = part.mask
        policy_loss = masked_mean(-part.advantages * current.logps.tokens, mask)
        value_loss = masked_mean(0.5 * (current.values - part.returns) ** 2, mask)
        return self.combine(policy_loss, value_loss, part, current, {})
