"""On-policy methods inside Lightning: each training step samples a rollout and optimises on it.

``training_step`` receives a batch of prompts (:class:`lit_align.data.PromptDataModule`) and

1. samples completions with the current policy on the generation backend (``hf``: ``generate`` with
   the KV cache; ``vllm``: a vLLM engine given the policy's weights; :mod:`lit_align.online.rollout`),
2. scores them with the configured reward (a Python reward function or a reward model, picked by
   ``class_path``; :mod:`lit_align.online.rewards`),
3. computes log-probs under the sampling policy (recomputed by the trainer; the backend's own are
   compared with them, ``rollout/mismatch_*``, and can correct the update, ``sampler_correction``)
   and the reference, and the per-token KL,
4. lets the method turn that into advantages (:meth:`OnPolicyModule.prepare`), then
5. runs ``epochs`` passes of minibatch updates over the rollout with manual optimisation
   (:meth:`OnPolicyModule.loss` per minibatch; one optimizer step each).

Lightning keeps the loop, devices, checkpointing and logging; there is no training loop outside
the Trainer. ``trainer.max_steps`` counts optimizer steps (a rollout gives ``epochs`` x
minibatches of them); ``val_check_interval`` counts rollouts. Held-out evaluation generates
(greedily by default) for held-out prompts and logs ``val/objective/scores``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal, Optional

import torch

from lit_align.data.collate import PromptLayout
from lit_align.data.contract import DataRequest
from lit_align.data.packing import at_positions
from lit_align.errors import NonFiniteLossError, SettingError
from lit_align.losses.policy_gradient import (
    KL_ESTIMATORS,
    explained_variance,
    masked_mean,
)
from lit_align.losses.sampler_correction import importance_ratio, sampler_mismatch
from lit_align.losses.sft import completion_nll
from lit_align.methods.alignment import AlignmentModule
from lit_align.methods.running import RunningMoments
from lit_align.model.logprobs import SequenceLogps
from lit_align.model.reference import resolve_reference
from lit_align.model.sharding import fully_shard_on_policy, head_logits_of
from lit_align.online.generation_backends import GENERATION_BACKENDS
from lit_align.online.kl_control import KLPenalty
from lit_align.online.rewards import (
    RewardFunction,
    check_reward,
    require_answers,
    reward_parts,
    score_completions,
)
from lit_align.online.rollout import GenerationSettings, Rollout, SamplerCorrection
from lit_align.runtime.trainer import distributed
from lit_align.settings import (
    Count,
    Finite,
    ModelSettings,
    NonNegative,
    OptimizerSettings,
    Positive,
    as_settings,
    init_hints,
)

log = logging.getLogger(__name__)
ADAPTIVE_KL_FIELDS = ("increase_above", "decrease_below", "factor")
"""The :class:`KLPenalty` fields only the adaptive controller reads (it runs when ``target`` is set)."""


@dataclass
class PolicyPass:
    """One decoder pass over rollout rows: log-probs, critic values (None without a critic) and
    the last hidden states (for the entropy, without another pass)."""

    logps: SequenceLogps
    values: Optional[torch.Tensor]
    hidden: torch.Tensor


class OnPolicyModule(AlignmentModule):
    """Shared machinery of the on-policy family (PPO, REINFORCE, A2C, TRPO, RLOO, GRPO, online DPO).

    A method implements :meth:`prepare` (advantages of a fresh rollout) and :meth:`loss` (the
    loss of a minibatch of it).

    Args:
        reward: scores completions: ``lit_align.online.rewards.WordRulesReward`` (built-in task),
            ``lit_align.online.reward_model.RewardModelReward`` (a trained reward model) or your own
            :class:`lit_align.online.rewards.RewardFunction`. Required for training.
        eval_reward: reward reported on held-out prompts (default: ``reward``); e.g. the
            verifier while training against a learned reward model. When set, the training
            ``reward`` is reported on the same held-out completions too
            (``objective/train_reward_scores``): proxy against gold reward, the over-optimisation
            picture of Gao et al. 2022.
        generation: sampling settings (max new tokens, temperature, top-p, top-k) and the
            backend that samples (``hf`` or ``vllm``, with the engine's settings).
        samples_per_prompt: completions sampled per prompt (RLOO and GRPO need >= 2).
        kl: per-token KL penalty to the reference: estimator k1/k2/k3, fixed or adaptive beta.
        epochs: passes over each rollout (PPO's K epochs of minibatch reuse).
        minibatch_size: rollout rows per optimizer step (default: the whole rollout).
        max_grad_norm: clip the gradient norm to this (null: no clipping).
        missing_eos_penalty: subtracted from the score of completions that hit
            ``max_new_tokens`` without EOS (null: none).
        reward_normalization: standardise the scores, (score - mean) / std, before the method
            turns them into advantages: ``initial`` with the mean and std of the first rollout's
            scores (samples of the initial policy; the first rollout whose scores differ), then
            fixed, as Ziegler et al. 2019 normalise their reward model to mean 0 and variance 1
            on samples of the initial policy; ``running`` with the mean and std of every score
            so far (TRL's score normalisation with running moments, OpenRLHF's reward
            normalisation). Null: raw scores. For learned reward models, whose Bradley-Terry
            training fixes neither offset nor scale, while ``kl.beta``, a critic's initial value
            0 and PPO's ``value_clip`` are set for scores of order 1. Logged
            ``objective/scores`` stay raw; ``objective/rlhf_reward`` uses the standardised
            scores (what is optimised). An error for methods that only see the scores' order or
            group-standardise them anyway (online DPO; GRPO with ``scale_rewards`` group or batch).
        sampler_correction: weight each token's policy-gradient term by the importance ratio of
            the trainer's to the sampler's log-prob, truncated (``tis``) or masked (``mis``) at
            ``cap`` (Yao et al. 2025; :mod:`lit_align.losses.sampler_correction`). Only with
            ``generation.backend: vllm`` (with ``hf`` the sampler is the trainer's own model).
        model: the causal LM, LoRA/QLoRA and reference source (``cached`` is not possible:
            completions are new every step).
        optimizer: AdamW and learning-rate schedule.
    """

    data_layouts: ClassVar[tuple[type, ...]] = (PromptLayout,)
    data_module_name: ClassVar[str] = "lit_align.data.PromptDataModule"
    headline_metric: ClassVar[str] = "val/objective/scores"
    generates_held_out: ClassVar[bool] = True
    reference_only_for_kl: ClassVar[bool] = True
    """Whether the reference serves only the KL penalty: then ``kl.beta: 0`` (without ``kl.target``)
    builds no reference at all (False where the objective itself needs it: online DPO)."""
    hparams_ignore: ClassVar[tuple[str, ...]] = ("reward", "eval_reward")
    ptx_coef: float = 0.0
    """Weight of the NLL of ``ptx`` batches (demonstrations or pre-training text) in the loss;
    PPO sets it (PPO-ptx), other methods keep 0."""

    def __init__(
        self,
        reward: Optional[RewardFunction] = None,
        eval_reward: Optional[RewardFunction] = None,
        generation: GenerationSettings = GenerationSettings(),  # noqa: B008 (never mutated)
        samples_per_prompt: Count = 1,
        kl: KLPenalty = KLPenalty(),  # noqa: B008
        epochs: Count = 1,
        minibatch_size: Optional[Count] = None,
        max_grad_norm: Optional[Positive] = 1.0,
        missing_eos_penalty: Optional[Finite] = None,
        reward_normalization: Optional[Literal["initial", "running"]] = None,
        sampler_correction: Optional[SamplerCorrection] = None,
        model: ModelSettings = ModelSettings(),  # noqa: B008
        optimizer: OptimizerSettings = OptimizerSettings(),  # noqa: B008
    ):
        settings = as_settings(model, ModelSettings)
        kl_settings = as_settings(kl, KLPenalty)
        if self.reference_only_for_kl and kl_settings.beta == 0 and kl_settings.target is None:
            if settings.reference not in ("auto", "none"):
                raise SettingError(
                    type(self).__name__,
                    "model.reference",
                    f"is {settings.reference}, but kl.beta is 0 (and no kl.target): the reference's log-probs would "
                    "only feed a KL term weighted 0; leave model.reference auto (then no reference is built)",
                )
            self.needs_reference = False  # KL-free: no reference is built or run
        if resolve_reference(settings, self.needs_reference, type(self).__name__).precomputed:
            raise SettingError(
                type(self).__name__,
                "model.reference",
                "cannot be cached for on-policy methods (completions are sampled anew every step); use copy or adapter",
            )
        check_reward(reward, type(self).__name__, "reward")
        check_reward(eval_reward, type(self).__name__, "eval_reward")
        super().__init__(settings, optimizer)
        self.automatic_optimization = False
        self.reward, self.eval_reward = reward, eval_reward
        self._rollout_counts = (0, 0)  # (completions, real tokens) of the last rollout, for Throughput
        self.generation = as_settings(generation, GenerationSettings)
        self.sampler = GENERATION_BACKENDS[self.generation.backend](self.generation)
        """Samples rollouts and held-out completions (built lazily: a vLLM engine on first use)."""
        self.sampler_correction = sampler_correction and as_settings(sampler_correction, SamplerCorrection)
        self.samples_per_prompt, self.epochs, self.minibatch_size = samples_per_prompt, epochs, minibatch_size
        self.max_grad_norm, self.missing_eos_penalty = max_grad_norm, missing_eos_penalty
        self.kl_settings = as_settings(kl, KLPenalty)
        self.kl_controller = self.kl_settings.controller()
        self.kl_estimator = KL_ESTIMATORS[self.kl_settings.estimator]
        self.reward_normalization = reward_normalization
        self.policy_version = 0
        """Training steps finished: the policy's weights changed since version v - 1 (the vllm
        backend pushes them to its engine when the version it holds is older)."""
        self.score_moments = RunningMoments() if reward_normalization else None
        """Mean and variance of the scores used by ``reward_normalization`` (checkpointed)."""

    def check_settings(self) -> None:
        """Also refuse the adaptive KL controller's settings without ``kl.target``, which turns it
        on, and the generation backend's settings it would not read."""
        super().check_settings()
        GENERATION_BACKENDS[as_settings(self.hparams.get("generation"), GenerationSettings).backend].check_settings(
            type(self).__name__, self.hparams
        )
        kl = as_settings(self.hparams.get("kl"), KLPenalty)
        unread = kl.set_away_from_default(ADAPTIVE_KL_FIELDS) if kl.target is None else []
        if unread:
            (name, value), *_ = unread
            raise SettingError(
                type(self).__name__,
                f"kl.{name}",
                f"must be unset without kl.target, got {value!r}: only the adaptive KL "
                "controller uses it, and kl.target turns that on (unset: fixed kl.beta)",
            )

    # ---- what a method implements ------------------------------------------------------------
    def prepare(self, rollout: Rollout) -> None:
        """Fill ``rollout.advantages`` (and whatever else :meth:`loss` reads) from a fresh rollout."""
        raise NotImplementedError

    def loss(self, part: Rollout, current: PolicyPass) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, metrics) of a minibatch ``part`` given the current policy's pass over it."""
        raise NotImplementedError

    # ---- forward passes ----------------------------------------------------------------------
    def forward_rollout(self, batch: dict[str, torch.Tensor]) -> PolicyPass:
        """Per-token log-probs of the completions under the policy (no critic here)."""
        hidden = self.backbone.hidden_states(batch)
        return PolicyPass(self.backbone.logps(batch, hidden=hidden), None, hidden)

    def entropy(self, current: PolicyPass) -> torch.Tensor:
        """``[N, T]`` entropy of the policy's next-token distribution at each completion token
        (logits only at completion positions, ``model.logp_chunk_size`` tokens at a time when no
        gradient is needed; 0 elsewhere)."""
        mask = current.logps.mask
        head = head_logits_of(self.backbone.policy)
        hidden = current.hidden[mask]
        step = hidden.shape[0] if torch.is_grad_enabled() else self.model_settings.logp_chunk_size or hidden.shape[0]
        parts = []
        for start in range(0, hidden.shape[0], max(1, step)):
            logits = head(hidden[start : start + step]).float()
            parts.append(-(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1))
        values = torch.cat(parts) if parts else hidden.new_zeros(0)
        return at_positions(values, mask)

    @property
    def flops_per_batch(self) -> int | None:
        """Not counted for on-policy methods (generation dominates and is not modelled)."""
        return None

    # ---- rollout -----------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Under :class:`lit_align.runtime.strategies.FSDP2Strategy` (which sets the device mesh),
        shard with FSDP2 (:func:`lit_align.model.sharding.fully_shard_on_policy`)."""
        mesh = getattr(self, "_device_mesh", None)
        if mesh is not None:
            fully_shard_on_policy(self, mesh["data_parallel"])

    def on_fit_start(self) -> None:
        super().on_fit_start()
        from lightning.pytorch.strategies import FSDPStrategy

        if isinstance(self.trainer.strategy, FSDPStrategy):
            raise SettingError(
                None,
                "trainer.strategy",
                f"{type(self).__name__}: on-policy methods do not run under FSDP1 (lit_align.runtime.strategies."
                "FSDPStrategy runs training_step inside the sharded root's forward, and an on-policy step takes its "
                "backward passes there); use lit_align.runtime.strategies.FSDP2Strategy "
                "(configs/strategies/fsdp2.yaml), DDP (configs/strategies/ddp.yaml) or one device",
            )
        if self.reward is None:
            raise SettingError(
                None,
                "reward",
                f"{type(self).__name__} needs a reward: set model.init_args.reward.class_path, e.g. "
                "lit_align.online.rewards.WordRulesReward (built-in task) or "
                "lit_align.online.reward_model.RewardModelReward (a trained reward model)",
            )

    def batch_samples(self, batch: dict[str, Any]) -> int:
        """Completions sampled for ``batch`` (its prompts x ``samples_per_prompt``), from its rollout."""
        return self._rollout_counts[0]

    def batch_tokens(self, batch: dict[str, Any]) -> int:
        """Real tokens (prompts and completions) of ``batch``'s rollout."""
        return self._rollout_counts[1]

    def data_request(self) -> DataRequest:
        """Also ``ptx`` batches when ``ptx_coef`` is set (PPO-ptx)."""
        return replace(
            super().data_request(),
            ptx=bool(self.ptx_coef),
            ptx_setting="ptx_coef" if "ptx_coef" in init_hints(type(self)) else None,
        )

    def check_examples(self, split: str, source: str, examples: list[dict[str, Any]]) -> None:
        """Also refuse prompts without a reference answer when the reward of the split checks
        completions against one (``needs_answers``; ``reward`` on ``train``, ``eval_reward`` or
        ``reward`` on held-out splits), before the first rollout rather than at it."""
        super().check_examples(split, source, examples)
        reward = self.reward if split == "train" else (self.eval_reward or self.reward)
        answers = [example.get("answer") for example in examples]
        require_answers(reward, answers, [example.get("record") for example in examples], source, f"{split} records")

    def prepare_data_for_method(self) -> None:
        """Also ready the rewards (fit, validate and test start): move them to the policy's device
        and hand the module to rewards that use it (``attach``, e.g. a self-rewarding judge)."""
        super().prepare_data_for_method()
        for reward in (self.reward, self.eval_reward):
            if reward is None:
                continue
            reward.to(self.device)
            reward.attach(self)

    @torch.no_grad()
    def make_rollout(
        self,
        batch: dict[str, Any],
        samples: int | None = None,
        temperature: float | None = None,
        sampling_pass: bool = True,
    ) -> Rollout:
        """Sample, decode, score and compute the reference's and (``sampling_pass``) the sampling
        policy's log-probs; without it the caller fills them with :meth:`Rollout.take_sampling_pass`."""
        samples = self.samples_per_prompt if samples is None else samples
        tokens, ended, sampler_logps = self.sample(batch, samples, temperature)
        prompts, answers = each_repeated(batch, samples)
        completions = self.decode(tokens)
        scores = score_completions(self.reward, prompts, completions, answers).to(self.device)
        self.log_reward_parts("train", self.reward)
        if self.missing_eos_penalty is not None:
            scores = scores - self.missing_eos_penalty * (~ended).float()
        ref = self.reference_logps(tokens).tokens if self.needs_reference else None
        rollout = Rollout(tokens, prompts, completions, ended, scores, ref_logps=ref, sampler_logps=sampler_logps)
        self._rollout_counts = (rollout.size, int(tokens["attention_mask"].sum()))
        if sampling_pass:
            rollout.take_sampling_pass(self.forward_rollout(tokens))
        return rollout

    def sample(self, batch: dict[str, Any], samples: int, temperature: float | None = None):
        """``samples`` completions of each of the batch's prompts from the generation backend, with
        the policy as it is now (:class:`lit_align.online.rollout.Sampled`)."""
        temperature = self.generation.temperature if temperature is None else temperature
        return self.sampler.sample(self, batch["prompt_ids"], batch["prompt_mask"], samples, temperature)

    def collect_rollout(self, batch: dict[str, Any], sampling_pass: bool) -> Rollout:
        """The rollout a training step updates on: one :meth:`make_rollout` of the batch here;
        methods that sample more (GRPO's dynamic sampling) extend it."""
        return self.make_rollout(batch, sampling_pass=sampling_pass)

    def log_reward_parts(self, stage: str, reward) -> None:
        """Each named part of a combined reward's last scores (``objective/rewards/<name>``)."""
        parts = reward_parts(reward)
        if parts:
            values = {f"objective/rewards/{name}": part.to(self.device) for name, part in parts.items()}
            self.log_metrics(stage, values, batch_size=len(next(iter(parts.values()))))

    def token_kl(self, rollout: Rollout) -> torch.Tensor:
        """``[N, T]`` per-token KL estimate of the sampling policy to the reference (0 off the mask)."""
        if rollout.ref_logps is None:
            return torch.zeros_like(rollout.old_logps)
        return self.kl_estimator(rollout.old_logps, rollout.ref_logps) * rollout.mask

    # ---- training ----------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._policy_is_initial = False
        one_update = self.updates_once(len(batch["prompts"]) * self.samples_per_prompt)
        rollout = self.collect_rollout(batch, sampling_pass=not one_update)
        current = None
        if one_update:  # the update's own pass (with gradients) gives the sampling log-probs: no second forward
            current = self.forward_rollout(rollout.batch)
            rollout.take_sampling_pass(current)
        beta = self.kl_controller.beta
        kl = self.token_kl(rollout).sum(-1)
        raw_scores = rollout.scores
        rollout.scores = self.normalise_scores(raw_scores)
        self.prepare(rollout)
        self.correct_for_sampler(rollout)
        self.log_rollout("train", rollout, kl, beta, raw_scores)
        self.kl_controller.update(float(kl.mean()))
        if one_update:
            self.optimise(rollout, batch.get("ptx"), current)
            return
        for _ in range(self.epochs):
            for rows in self.minibatches(rollout.size):
                self.optimise(rollout.select(rows), batch.get("ptx"))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        self.policy_version += 1

    @torch.no_grad()
    def correct_for_sampler(self, rollout: Rollout) -> None:
        """With ``sampler_correction``: the advantages times the TIS/MIS weights of the trainer's
        to the sampler's log-probs (each token's surrogate term is linear in its advantage, so this
        weights the term; :mod:`lit_align.losses.sampler_correction`), and the weights logged."""
        if self.sampler_correction is None:
            return
        weights = self.sampler_correction.weights(rollout.old_logps, rollout.sampler_logps, rollout.mask)
        rollout.advantages = rollout.advantages * weights
        mask = rollout.mask
        bounded = (importance_ratio(rollout.old_logps, rollout.sampler_logps) > self.sampler_correction.cap).float()
        self.log_metrics(
            "train",
            {
                "sampler_correction/weight": masked_mean(weights, mask)[None],
                "sampler_correction/bounded_fraction": masked_mean(bounded, mask)[None],
            },
            batch_size=rollout.size,
        )

    @torch.no_grad()
    def normalise_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """``scores`` standardised by ``reward_normalization`` (unchanged when it is null). The
        moments are updated first (with every process's scores), so a rollout is normalised with
        statistics that include it; ``initial`` stops updating after the first rollout whose
        scores are not all equal."""
        moments = self.score_moments
        if moments is None:
            return scores
        if self.reward_normalization == "running" or moments.count == 0 or moments.var <= 1e-12:
            sums = torch.stack(
                [scores.sum(), (scores**2).sum(), torch.tensor(scores.numel(), device=scores.device)]
            ).double()
            if distributed(self):
                sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
            moments.update(sums[0], sums[1], int(sums[2]))
        return ((scores - moments.mean) * torch.rsqrt(moments.var + 1e-8)).to(scores.dtype)

    def updates_once(self, rows: int) -> bool:
        """Whether a rollout of ``rows`` completions makes exactly one optimizer step on all of
        them (one epoch, one minibatch): then the sampling pass and the update's pass are the same
        forward, done once. Methods whose update runs its own forwards (TRPO) return False."""
        return self.epochs == 1 and (self.minibatch_size is None or self.minibatch_size >= rows)

    def minibatches(self, size: int) -> list[torch.Tensor]:
        """Row indices of each minibatch of one pass (shuffled; one optimizer step each)."""
        order = torch.randperm(size, device=self.device)
        step = self.minibatch_size or size
        return [order[start : start + step] for start in range(0, size, step)]

    def optimise(
        self, part: Rollout, ptx: dict[str, torch.Tensor] | None = None, current: PolicyPass | None = None
    ) -> None:
        """One optimizer step on a minibatch of the rollout (``current``: the policy's pass over
        it with gradients, when the caller already ran it)."""
        optimizer = self.optimizers()
        current = self.forward_rollout(part.batch) if current is None else current
        loss, metrics = self.loss(part, current)
        if "policy/entropy" not in metrics:  # logged for every method (token mean), no gradient
            with torch.no_grad():
                metrics["policy/entropy"] = masked_mean(self.entropy(current), current.logps.mask)
        if ptx is not None and self.ptx_coef:
            ptx_logps = self.backbone.logps(ptx)
            ptx_loss = completion_nll(ptx_logps.tokens, ptx_logps.mask)
            loss = loss + self.ptx_coef * ptx_loss
            metrics["loss/ptx"] = ptx_loss.detach()
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"{type(self).__name__}: non-finite loss {float(loss)} at step {self.global_step}")
        optimizer.zero_grad()
        self.manual_backward(loss)
        if self.max_grad_norm is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # freed now, not held through the next rollout and forward
        self.lr_schedulers().step()
        metrics["loss"] = loss.detach()
        self.log_metrics("train", {name: value.reshape(-1) for name, value in metrics.items()}, batch_size=part.size)

    def log_rollout(
        self, stage: str, rollout: Rollout, kl: torch.Tensor, beta: float, raw_scores: torch.Tensor | None = None
    ) -> None:
        """Rollout metrics: scores (``raw_scores``, before ``reward_normalization``, when given),
        KL, RLHF reward (the rollout's score - beta KL), length, EOS rate, beta; the
        normalisation's mean and std when it is on; and how far the sampler's log-probs are from
        the trainer's (``rollout/mismatch_kl``, ``_k3``, ``_max_ratio``, ``_min_ratio``:
        :func:`lit_align.losses.sampler_correction.sampler_mismatch`; ~0 and 1 with ``hf``)."""
        lengths = rollout.mask.sum(-1).float()
        if rollout.sampler_logps is not None and rollout.old_logps is not None:
            mismatch = sampler_mismatch(rollout.old_logps, rollout.sampler_logps, rollout.mask)
            self.log_metrics(
                stage,
                {f"rollout/mismatch_{name}": value.float()[None] for name, value in mismatch.items()},
                batch_size=rollout.size,
            )
        if self.score_moments is not None:
            self.log_metrics(
                stage,
                {
                    "reward_normalization/mean": self.score_moments.mean.float()[None],
                    "reward_normalization/std": self.score_moments.std.float()[None],
                },
                batch_size=rollout.size,
            )
        self.log_metrics(
            stage,
            {
                "objective/scores": rollout.scores if raw_scores is None else raw_scores,
                "objective/kl": kl,
                "objective/rlhf_reward": rollout.scores - beta * kl,
                "objective/beta": torch.tensor([beta], device=self.device),
                "response_length": lengths,
                "ended_with_eos": rollout.ended.float(),
            },
            batch_size=rollout.size,
        )

    # ---- evaluation --------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.evaluate(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.evaluate(batch, "test")

    @torch.no_grad()
    def evaluate(self, batch: dict[str, Any], stage: str) -> None:
        """Held-out prompts: ``generation.eval_samples`` completions each (one by default) at
        ``generation.eval_temperature``, scored by ``eval_reward`` (else ``reward``) and averaged per
        prompt (``objective/scores``: mean@k); with both rewards set, also by ``reward``
        (``objective/train_reward_scores``). Lengths and EOS rates are over every completion."""
        reward = self.eval_reward or self.reward
        if reward is None:
            raise SettingError(
                None,
                "reward",
                f"{type(self).__name__} needs a reward to evaluate: set model.init_args.reward (or eval_reward)",
            )
        k = self.generation.eval_samples
        tokens, ended, _ = self.sample(batch, k, self.generation.eval_temperature)
        completions = self.decode(tokens)
        prompts, answers = each_repeated(batch, k)
        scores = score_completions(reward, prompts, completions, answers).to(self.device)
        self.log_reward_parts(stage, reward)
        per_prompt = {"objective/scores": scores.view(-1, k).mean(-1)}
        if self.eval_reward is not None and self.reward is not None:
            train_scores = score_completions(self.reward, prompts, completions, answers).to(self.device)
            per_prompt["objective/train_reward_scores"] = train_scores.view(-1, k).mean(-1)
        self.log_metrics(stage, per_prompt, batch_size=len(batch["prompts"]))
        mask = tokens["labels"] != -100
        per_completion = {"response_length": mask.sum(-1).float(), "ended_with_eos": ended.float()}
        self.log_metrics(stage, per_completion, batch_size=len(completions))
        if self.held_out_samples is not None:  # the first ones (each prompt's first completion), for Samples
            first = slice(None, None, k)
            rows = zip(batch["prompts"], completions[first], scores[first].tolist(), answers[first], strict=True)
            room = max(0, self.held_out_sample_limit - len(self.held_out_samples))
            self.held_out_samples += [
                {"prompt": p, "completion": c, "score": s, **({"answer": a} if a is not None else {})}
                for p, c, s, a in rows
            ][:room]


def each_repeated(batch: dict[str, Any], samples: int) -> tuple[list, list]:
    """The batch's prompts and reference answers (None where it has none), each repeated ``samples``
    times in a row: the layout in which every generation backend returns a prompt's completions."""
    prompts = batch["prompts"]
    answers = batch.get("answers") or [None] * len(prompts)
    return [p for p in prompts for _ in range(samples)], [a for a in answers for _ in range(samples)]


class ActorCriticModule(OnPolicyModule):
    """An on-policy method with a critic: a scalar value head on the policy's last hidden state
    (shared trunk: one decoder pass gives log-probs and values). PPO and A2C share it.

    Args:
        vf_coef: weight of the value loss in the total loss.
        entropy_coef: weight of the entropy bonus (subtracted from the loss; 0 = not computed).
        (everything else: :class:`OnPolicyModule`)
    """

    def __init__(self, *args, vf_coef: NonNegative = 0.1, entropy_coef: NonNegative = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.vf_coef, self.entropy_coef = vf_coef, entropy_coef
        hidden = self.backbone.policy.get_input_embeddings().embedding_dim
        self.value_head = torch.nn.Linear(hidden, 1)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)

    def forward_rollout(self, batch: dict[str, torch.Tensor]) -> PolicyPass:
        current = super().forward_rollout(batch)
        hidden = current.hidden.to(self.value_head.weight.dtype)
        # the head sees [rows * positions, H]: on a 3-D input nn.Linear returns a view, which a
        # value head sharded by FSDP2 warns about (an in-place op on it would skip its hooks)
        values = self.value_head(hidden.flatten(0, -2)).view(hidden.shape[:-1])
        current.values = values * current.logps.mask
        return current

    def combine(
        self,
        policy_loss: torch.Tensor,
        value_loss: torch.Tensor,
        part: Rollout,
        current: PolicyPass,
        metrics: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """policy loss + vf_coef * value loss - entropy_coef * entropy, and the metrics every
        actor-critic method logs (added to the method's own ``metrics``)."""
        mask = part.mask
        loss = policy_loss + self.vf_coef * value_loss
        metrics.update(
            {
                "loss/policy": policy_loss.detach(),
                "loss/value": value_loss.detach(),
                "value/explained_variance": explained_variance(part.values, part.returns, mask),
            }
        )
        if self.entropy_coef:
            entropy = masked_mean(self.entropy(current), mask)
            loss = loss - self.entropy_coef * entropy
            metrics["policy/entropy"] = entropy.detach()
        return loss, metrics
