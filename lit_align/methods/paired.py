"""The paired-preference LightningModule that every paired objective subclasses.

A subclass overrides :meth:`PairedPreferenceModule.loss` (and sets ``needs_reference``); the base
does the concatenated forward, the reference log-probs, metrics and the optimizer.
"""

from __future__ import annotations

from typing import Optional

import torch

from lit_align.losses.types import PreferenceLoss, pairwise_accuracy
from lit_align.methods.alignment import AlignmentModule
from lit_align.model.logprobs import SequenceLogps


class PairedPreferenceModule(AlignmentModule):
    """Base for objectives on (prompt, chosen, rejected) pairs.

    Args:
        model: the causal LM, LoRA/QLoRA and reference source.
        optimizer: AdamW and learning-rate schedule.
    """

    # ---- the one method a new objective overrides -----------------------------------------
    def loss(
        self,
        chosen: SequenceLogps,
        rejected: SequenceLogps,
        ref_chosen: Optional[SequenceLogps],
        ref_rejected: Optional[SequenceLogps],
    ) -> PreferenceLoss:
        """Per-pair losses and implicit rewards from policy (and reference) log-probs.

        ``chosen``/``rejected`` carry ``.sum`` (log pi(y|x)), ``.count`` (|y|), ``.mean`` and
        per-token ``.tokens``; ``ref_*`` are the same for the reference, or None when
        ``needs_reference`` is False. Per-pair data columns (e.g. ``score_chosen``) are in
        ``self.current_batch``.
        """
        raise NotImplementedError

    # ---- shared machinery ------------------------------------------------------------------
    def forward_pair(self, batch: dict[str, torch.Tensor]) -> PreferenceLoss:
        """One concatenated policy forward over chosen+rejected, then the objective."""
        self.current_batch = batch
        chosen, rejected = self.backbone.logps(batch).split()
        ref_chosen = ref_rejected = None
        if self.needs_reference:
            ref_chosen, ref_rejected = self.reference_logps(batch).split()
        return with_logps(self.loss(chosen, rejected, ref_chosen, ref_rejected), chosen, rejected)

    def step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        output = self.forward_pair(batch)
        values = {"loss": output.losses.detach(), **paired_metrics(output)}
        self.log_metrics(stage, values, batch_size=output.losses.shape[0])
        return output.losses.mean()


def with_logps(output: PreferenceLoss, chosen: SequenceLogps, rejected: SequenceLogps) -> PreferenceLoss:
    """``output`` with the policy's log pi(y|x) of both responses (``logps/chosen``,
    ``logps/rejected``, detached) ahead of the objective's own metrics."""
    metrics = {"logps/chosen": chosen.sum.detach(), "logps/rejected": rejected.sum.detach(), **output.metrics}
    return output._replace(metrics=metrics)


def paired_metrics(output: PreferenceLoss) -> dict[str, torch.Tensor]:
    """What a paired objective logs besides its loss: ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/accuracies`` (a tie, e.g. every DPO margin at step 0, is a coin flip: it counts one
    half), ``rewards/margins`` (r_w - r_l), then the output's metrics."""
    margins = output.chosen_rewards - output.rejected_rewards
    return {
        "rewards/chosen": output.chosen_rewards,
        "rewards/rejected": output.rejected_rewards,
        "rewards/accuracies": pairwise_accuracy(margins),
        "rewards/margins": margins,
        **output.metrics,
    }
