"""GRPO and its 2025 refinements as options of one module: the loss's normalisation (``loss_type``:
GRPO, BNPO, Dr. GRPO, DAPO, CISPO), advantage scaling, clip-higher and dual clip, GSPO's
sequence-level ratio, and DAPO's overlong shaping. Each option is a table of pure functions in
:mod:`lit_align.losses.grpo_family`; nothing here branches on a method's name."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

import torch

from lit_align.errors import SettingError
from lit_align.losses.grpo_family import (
    IMPORTANCE_LEVELS,
    LOSS_NORMALISATIONS,
    SURROGATES,
    TokenCounts,
    high_entropy_mask,
    overlong_penalty,
    scaled_group_advantages,
    zero_spread_groups,
)
from lit_align.losses.policy_gradient import kl_k2, kl_k3, masked_mean
from lit_align.methods.on_policy import OnPolicyModule, PolicyPass
from lit_align.online.kl_control import KLPenalty
from lit_align.online.rollout import GenerationSettings, Rollout, concat_rollouts
from lit_align.runtime.trainer import distributed
from lit_align.settings import ClipRange, Count, NonNegative, Positive, Range, as_settings

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo"]


class GRPO(OnPolicyModule):
    """Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath, eq. 3 and sec. 4.1.2)
    and its refinements.

    k completions per prompt; the advantage of every token of completion i is its score centred
    on the group's mean (and scaled, ``scale_rewards``); a clipped-ratio surrogate over ``epochs``
    of minibatch reuse; the KL to the reference is a k3 term in the loss (eq. 4), weighted by
    ``kl.beta`` (not a reward penalty); the KL controller adapts beta when ``kl.target`` is set.
    The estimator is always k3 (the logged ``objective/kl`` too).

    Args:
        loss_type: how per-token losses become the loss (:data:`LOSS_NORMALISATIONS`): ``grpo``
            (each completion's token mean, then the mean over completions), ``bnpo`` (mean over
            the minibatch's tokens), ``dr_grpo`` (sum over tokens / (completions x
            ``generation.max_new_tokens``); Liu et al. 2025), ``dapo`` (sum / completion tokens of
            the global batch, across processes; Yu et al. 2025), ``cispo`` (MiniMax-M1 2025: the
            clipped-ratio surrogate is replaced by a REINFORCE term with a clipped, stop-gradient
            importance weight, normalised as ``dapo``).
        scale_rewards: divide the group-centred scores by the std of the ``group``, of the
            ``batch``, or not at all (``none``: Dr. GRPO).
        epsilon_low: lower clip range of the ratio (1 - epsilon_low); with ``cispo``, the lower
            bound of the importance weight.
        epsilon_high: upper clip range (1 + epsilon_high); unset = ``epsilon_low``. DAPO's
            clip-higher uses e.g. 0.28 against 0.2; CISPO's weight bound is usually larger (e.g. 4).
        delta: dual clip (Ye et al. 2020): bound the objective of negative-advantage tokens below
            by delta * A (delta > 1); not with ``cispo``, which has no clipped ratio.
        importance_sampling_level: ``token`` ratios, or ``sequence``: GSPO's (Zheng et al. 2025)
            length-normalised sequence ratio, shared by a completion's tokens.
        mask_truncated_completions: leave completions that reached ``generation.max_new_tokens``
            without ending out of the loss (DAPO's overlong filtering).
        overlong_buffer: DAPO's soft overlong punishment: completions longer than
            ``max_new_tokens - overlong_buffer`` tokens lose up to ``overlong_penalty`` of their
            score, linearly (Yu et al. 2025, eq. 13). Unset: off.
        overlong_penalty: the most the overlong punishment takes off; only with ``overlong_buffer``.
        entropy_coef: weight of an entropy bonus (token mean of the policy's entropy, subtracted
            from the loss; 0: none). The entropy is logged (``policy/entropy``) either way.
        dynamic_sampling: DAPO's dynamic sampling (Yu et al. 2025, eq. 11): drop the groups whose
            scores are all equal (they have no advantage, so no policy gradient) and sample the
            batch's prompts again, up to ``max_sampling_rounds`` rounds in all, until as many groups
            as prompts are kept; logs ``dynamic_sampling/rounds``, ``/dropped_groups``, ``/kept_groups``.
            When no round gives a group with spread, the last round is used as it is.
        max_sampling_rounds: the most sampling rounds of one step; only with ``dynamic_sampling``.
        high_entropy_fraction: the policy-gradient term only on this fraction of the completion
            tokens with the highest entropy (Wang et al. 2025, "Beyond the 80/20 rule": 0.2); the
            KL term keeps every token. Unset: every token.
        (everything else: :class:`lit_align.methods.on_policy.OnPolicyModule`)
    """

    def __init__(
        self,
        *args,
        samples_per_prompt: Annotated[int, Range(2)] = 4,
        loss_type: LossType = "grpo",
        scale_rewards: Literal["group", "batch", "none"] = "group",
        epsilon_low: ClipRange = 0.2,
        epsilon_high: Optional[Positive] = None,
        delta: Optional[Annotated[float, Range(1, low_open=True)]] = None,
        importance_sampling_level: Literal["token", "sequence"] = "token",
        mask_truncated_completions: bool = False,
        overlong_buffer: Optional[Count] = None,
        overlong_penalty: Positive = 1.0,
        entropy_coef: NonNegative = 0.0,
        high_entropy_fraction: Optional[Annotated[float, Range(0, 1, low_open=True, high_open=True)]] = None,
        dynamic_sampling: bool = False,
        max_sampling_rounds: Count = 3,
        **kwargs,
    ):
        super().__init__(*args, samples_per_prompt=samples_per_prompt, **kwargs)
        self.loss_type, self.scale_rewards = loss_type, scale_rewards
        self.epsilon_low = epsilon_low
        self.epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
        self.delta, self.importance_sampling_level = delta, importance_sampling_level
        self.mask_truncated_completions = mask_truncated_completions
        self.overlong_buffer, self.overlong_penalty = overlong_buffer, overlong_penalty
        self.entropy_coef, self.high_entropy_fraction = entropy_coef, high_entropy_fraction
        self.dynamic_sampling, self.max_sampling_rounds = dynamic_sampling, max_sampling_rounds

    def check_settings(self) -> None:
        """Also refuse settings that would change nothing in this combination: ``reward_normalization``
        with scaled advantages, a KL estimator but k3 (the default k1 is accepted: it cannot be told
        from an unset one), ``delta`` with ``cispo``, ``overlong_penalty`` without ``overlong_buffer``,
        a buffer as long as the generation limit, and ratio settings when every ratio is 1
        (:meth:`_check_ratio_settings_act`)."""
        super().check_settings()
        h = self.hparams
        if h.get("scale_rewards", "group") != "none" and h.get("reward_normalization"):
            raise SettingError(
                "GRPO",
                "reward_normalization",
                f"must be unset with scale_rewards={h.get('scale_rewards', 'group')}: GRPO standardises the scores "
                "itself",
                hint="set scale_rewards none (Dr. GRPO) where the scores' scale should matter",
            )
        estimator = as_settings(h.get("kl"), KLPenalty).estimator
        if estimator not in ("k3", KLPenalty.estimator):
            raise SettingError(
                "GRPO",
                "kl.estimator",
                f"must be k3 or unset, got {estimator!r}: GRPO's KL term in the loss is always the k3 estimator "
                "(DeepSeekMath, eq. 4)",
            )
        if h.get("delta") is not None and h.get("loss_type") == "cispo":
            raise SettingError(
                "GRPO",
                "delta",
                "must be unset with loss_type=cispo: the dual clip bounds a clipped-ratio objective, and CISPO has "
                "none (its importance weight is clipped by epsilon_low/epsilon_high)",
            )
        if h.get("overlong_penalty", 1.0) != 1.0 and h.get("overlong_buffer") is None:
            raise SettingError(
                "GRPO",
                "overlong_penalty",
                "is set, but overlong_buffer is not, so no completion is ever punished; set overlong_buffer too",
            )
        if not h.get("dynamic_sampling") and h.get("max_sampling_rounds", 3) != 3:
            raise SettingError(
                "GRPO",
                "max_sampling_rounds",
                "is set, but dynamic_sampling is off, so the batch is sampled once; set dynamic_sampling true too",
            )
        self._check_ratio_settings_act()
        limit = as_settings(h.get("generation"), GenerationSettings).max_new_tokens
        if h.get("overlong_buffer") is not None and h["overlong_buffer"] >= limit:
            raise SettingError(
                "GRPO",
                "overlong_buffer",
                f"must be < generation.max_new_tokens={limit}, got {h['overlong_buffer']}: the punishment starts "
                "max_new_tokens - overlong_buffer tokens in",
            )

    def _check_ratio_settings_act(self) -> None:
        """Refuse the settings that only shape the importance ratio when every ratio is 1: with
        one epoch and no ``minibatch_size`` each rollout makes one update on its own samples, so
        the ratio is exp(0) at every token. Then GSPO's sequence ratio, the upper clip and the
        dual clip change nothing, and CISPO's gradient, -sg(clip(1)) A grad log pi, is exactly
        ``dapo``'s (-A grad log pi, the same normalisation)."""
        h = self.hparams
        if h.get("epochs", 1) != 1 or h.get("minibatch_size") is not None:
            return
        idle = {
            "importance_sampling_level": h.get("importance_sampling_level", "token") == "sequence",
            "epsilon_high": h.get("epsilon_high") is not None,
            "delta": h.get("delta") is not None,
            "loss_type": h.get("loss_type") == "cispo",
        }
        for name, is_set in idle.items():
            if is_set:
                same = " (cispo is then exactly dapo)" if name == "loss_type" else ""
                raise SettingError(
                    "GRPO",
                    name,
                    f"changes nothing here{same}: with epochs 1 and minibatch_size unset each rollout makes one "
                    "update on its own samples, so every importance ratio is 1",
                    hint="set minibatch_size below the rollout's rows (prompts x samples_per_prompt) or epochs > 1, "
                    f"or remove {name}",
                )

    def collect_rollout(self, batch: dict[str, Any], sampling_pass: bool) -> Rollout:
        """With ``dynamic_sampling``: rounds of sampling the batch's prompts, keeping the groups
        whose scores differ, until there are as many as prompts or the rounds run out."""
        if not self.dynamic_sampling:
            return super().collect_rollout(batch, sampling_pass)
        wanted, k = len(batch["prompts"]), self.samples_per_prompt
        kept: list[Rollout] = []
        count, dropped, rounds, last = 0, 0, 0, None
        while count < wanted and rounds < self.max_sampling_rounds:
            rounds += 1
            last = self.make_rollout(batch, sampling_pass=False)
            spread = ~zero_spread_groups(last.scores, k)
            dropped += int((~spread).sum())
            groups = spread.nonzero().flatten()[: wanted - count]
            if len(groups):
                rows = (groups[:, None] * k + torch.arange(k, device=groups.device)).flatten()
                kept.append(last.select(rows))
                count += len(groups)
        rollout = concat_rollouts(kept, self.tokenizer.pad_token_id) if kept else last
        self.log_metrics(
            "train",
            {
                "dynamic_sampling/rounds": torch.tensor([float(rounds)], device=self.device),
                "dynamic_sampling/dropped_groups": torch.tensor([float(dropped)], device=self.device),
                "dynamic_sampling/kept_groups": torch.tensor([float(count)], device=self.device),
            },
            batch_size=wanted,
        )
        self._rollout_counts = (rollout.size, int(rollout.batch["attention_mask"].sum()))
        if sampling_pass:  # frozen log-probs: no graph (over every row at once, it would hold all activations)
            with torch.no_grad():
                rollout.take_sampling_pass(self.forward_rollout(rollout.batch))
        return rollout

    def token_kl(self, rollout: Rollout) -> torch.Tensor:
        if rollout.ref_logps is None:
            return torch.zeros_like(rollout.old_logps)
        return kl_k3(rollout.old_logps, rollout.ref_logps) * rollout.mask

    def prepare(self, rollout: Rollout) -> None:
        """Shaped scores (overlong punishment), group advantages, and which completions the loss
        keeps (``extra["in_loss"]``: those that ended, with ``mask_truncated_completions``)."""
        scores = rollout.scores
        if self.overlong_buffer is not None:
            lengths = rollout.mask.sum(-1)
            scores = scores + overlong_penalty(
                lengths, self.generation.max_new_tokens, self.overlong_buffer, self.overlong_penalty
            )
        advantages = scaled_group_advantages(scores, self.samples_per_prompt, self.scale_rewards)
        rollout.advantages = advantages[:, None] * rollout.mask
        if self.mask_truncated_completions:
            rollout.extra["in_loss"] = rollout.ended

    def token_counts(self, mask: torch.Tensor) -> TokenCounts:
        """What :data:`LOSS_NORMALISATIONS` divide by for a minibatch with ``mask``."""
        tokens = mask.sum().float()
        world = 1
        if distributed(self):
            tokens = self.trainer.strategy.reduce(tokens, reduce_op="sum")
            world = self.trainer.world_size
        return TokenCounts(self.generation.max_new_tokens, float(tokens), world)

    def loss(self, part: Rollout, current: PolicyPass) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mask = part.mask
        logps = current.logps.tokens
        if "in_loss" in part.extra:  # mask_truncated_completions: whole completions left out
            mask = mask & part.extra["in_loss"][:, None]
        log_ratio = IMPORTANCE_LEVELS[self.importance_sampling_level](logps, part.old_logps, mask)
        surrogate, clipped = SURROGATES[self.loss_type](
            logps, log_ratio, part.advantages, self.epsilon_low, self.epsilon_high, self.delta
        )
        metrics = {}
        if self.entropy_coef or self.high_entropy_fraction:
            entropy = self.entropy(current) if self.entropy_coef else self.entropy(current).detach()
            metrics["policy/entropy"] = masked_mean(entropy, mask).detach()
        if self.high_entropy_fraction:
            surrogate = surrogate * high_entropy_mask(entropy.detach(), mask, self.high_entropy_fraction)
        kl = kl_k3(logps, part.ref_logps) if part.ref_logps is not None else torch.zeros_like(surrogate)
        normalise, counts = LOSS_NORMALISATIONS[self.loss_type], self.token_counts(mask)
        loss = normalise(surrogate + self.kl_controller.beta * kl, mask, counts)
        if self.entropy_coef:
            loss = loss - self.entropy_coef * masked_mean(entropy, mask)
        return loss, metrics | {
            "loss/policy": normalise(surrogate, mask, counts).detach(),
            "policy/kl": masked_mean(kl, mask).detach(),
            "policy/clipfrac": masked_mean(clipped.float(), mask),
            "policy/approxkl": masked_mean(kl_k2(logps.detach(), part.old_logps), mask),
        }
