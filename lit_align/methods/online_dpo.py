"""Online (iterative) DPO on fresh samples of the policy."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

import torch

from lit_align.errors import SettingError
from lit_align.losses.dpo import dpo_loss
from lit_align.methods.on_policy import ADAPTIVE_KL_FIELDS, OnPolicyModule, PolicyPass
from lit_align.methods.paired import paired_metrics, with_logps
from lit_align.online.kl_control import KLPenalty
from lit_align.online.rollout import GenerationSettings, Rollout
from lit_align.settings import Positive, Range, as_settings


def best_worst_pairs(scores: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen rows, rejected rows) of a rollout whose ``group_size`` samples per prompt are
    adjacent: per prompt the highest against the lowest score (the first one on equal scores);
    prompts whose samples all tie give no pair (Yuan et al. 2024, Self-Rewarding Language Models,
    sec. 2.3: "we take the highest and lowest scoring responses ... discard the pair if their
    scores are the same")."""
    if group_size < 2:
        raise ValueError(f"pairs need at least 2 samples per prompt, got {group_size}")
    groups = scores.view(-1, group_size)
    offsets = torch.arange(groups.shape[0], device=scores.device) * group_size
    keep = groups.max(1).values > groups.min(1).values
    return (groups.argmax(1) + offsets)[keep], (groups.argmin(1) + offsets)[keep]


class OnlineDPO(OnPolicyModule):
    """Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback";
    iterative DPO, Xu et al. 2023 / Xiong et al. 2024) with the DPO loss of Rafailov et al. 2023, eq. 7.

    Each rollout samples ``samples_per_prompt`` completions per prompt with the current policy,
    scores them with ``reward`` (a reward function, a reward model or :class:`SelfJudge`), pairs
    the best against the worst of each prompt (:func:`best_worst_pairs`; tied prompts give no
    pair) and takes ``epochs`` passes of DPO steps over the fresh pairs: loss
    -log sigma(beta [(log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))]) with
    summed completion log-probs. ``minibatch_size`` counts pairs. A rollout without any pair takes
    one empty optimizer step (no parameter changes) so ``trainer.max_steps`` still bounds the run.

    Args:
        beta: DPO inverse temperature (the strength of the implicit KL penalty to the reference).
        samples_per_prompt: completions per prompt (>= 2; 2 = one pair per prompt at most).
        (everything else: :class:`lit_align.methods.on_policy.OnPolicyModule`; there is no KL
        penalty: ``beta`` is the KL control, and ``kl.beta``, ``kl.target`` and the adaptive
        controller's settings must stay unset; ``kl.estimator`` picks the estimator of the logged
        ``objective/kl``, and ``objective/rlhf_reward`` is score - ``beta`` KL, the objective DPO
        optimises; ``generation.temperature`` must be > 0, or the samples of a prompt are
        identical and never form a pair.)
    """

    reference_only_for_kl: ClassVar[bool] = False  # DPO's loss needs the reference itself

    def __init__(self, *args, beta: Positive = 0.1, samples_per_prompt: Annotated[int, Range(2)] = 2, **kwargs):
        super().__init__(*args, samples_per_prompt=samples_per_prompt, **kwargs)
        self.beta = beta

    def check_settings(self) -> None:
        """Also refuse greedy sampling, the KL penalty's settings and ``reward_normalization``."""
        h = self.hparams
        if as_settings(h.get("generation"), GenerationSettings).temperature <= 0:
            raise SettingError(
                "OnlineDPO",
                "generation.temperature",
                "must be > 0: greedy samples of a prompt are identical and never form a pair",
            )
        kl = as_settings(h.get("kl"), KLPenalty)
        # before the base's check: its message would say to set kl.target
        unused = kl.set_away_from_default(("beta", "target", *ADAPTIVE_KL_FIELDS))
        if unused:
            (name, value), *_ = unused
            raise SettingError(
                "OnlineDPO",
                f"kl.{name}",
                f"must be unset, got {value!r}: OnlineDPO has no KL penalty, DPO's beta is its KL "
                "control (set beta instead)",
            )
        if h.get("sampler_correction") is not None:
            raise SettingError(
                "OnlineDPO",
                "sampler_correction",
                "must be unset: it weights each token's policy-gradient term, and OnlineDPO's loss is DPO on the "
                "best and worst sample of each prompt, with no such term",
            )
        if h.get("reward_normalization"):
            raise SettingError(
                "OnlineDPO",
                "reward_normalization",
                "must be unset: OnlineDPO pairs the best and worst sample of each prompt, "
                "only the scores' order matters, so standardising them changes nothing",
            )
        super().check_settings()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._policy_is_initial = False
        rollout = self.make_rollout(batch)
        self.log_rollout("train", rollout, self.token_kl(rollout).sum(-1), self.beta)  # DPO's beta: its KL weight
        chosen, rejected = best_worst_pairs(rollout.scores, self.samples_per_prompt)
        self.log_metrics(
            "train", {"pairs": torch.tensor([float(len(chosen))], device=self.device)}, batch_size=rollout.size
        )
        if len(chosen) == 0:
            optimizer = self.optimizers()
            optimizer.zero_grad(set_to_none=True)  # AdamW skips parameters without a gradient
            optimizer.step()
            self.lr_schedulers().step()
            return
        for _ in range(self.epochs):
            for rows in self.minibatches(len(chosen)):
                self.optimise(rollout.select(torch.cat([chosen[rows], rejected[rows]])))

    def loss(self, part: Rollout, current: PolicyPass) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """DPO loss of a part whose first half is the chosen and second half the rejected rows."""
        chosen, rejected = current.logps.split()
        half = part.size // 2
        reference = part.ref_logps.sum(-1)
        output = with_logps(
            dpo_loss(chosen.sum, rejected.sum, reference[:half], reference[half:], self.beta), chosen, rejected
        )
        return output.losses.mean(), {
            **paired_metrics(output),
            "scores/chosen": part.scores[:half],
            "scores/rejected": part.scores[half:],
        }
