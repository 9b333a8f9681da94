"""The paired-preference LightningModule that every paired objective subclasses.

A subclass overrides :meth:`PairedPreferenceModule.loss` (and sets ``needs_reference``); the base
does the concatenated forward, the reference log-probs, metrics and the optimizer.
"""

from __future__ import annotations

from typing import Optional

import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, Strategy

from lit_align.data.contract import ServedData
from lit_align.errors import SettingError
from lit_align.losses.types import PreferenceLoss, pairwise_accuracy
from lit_align.methods.alignment import AlignmentModule
from lit_align.model.logprobs import SequenceLogps


class PairedPreferenceModule(AlignmentModule):
    """Base for objectives on (prompt, chosen, rejected) pairs.

    Args:
        model: the causal LM, LoRA/QLoRA and reference source.
        optimizer: AdamW and learning-rate schedule.
    """

    runs_shared_prompts = True

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
        """The reference's forward, one policy forward over the chosen and rejected rows (each
        prompt once with ``model.prefix_sharing``), then the objective. The reference runs first so
        its transient memory (the LM head's chunk, each layer's outputs) is freed before the
        policy's activations are held for the backward pass."""
        self.current_batch = batch
        ref_chosen = ref_rejected = None
        if self.needs_reference:
            ref_chosen, ref_rejected = self.reference_logps(batch).split()
        chosen, rejected = self.backbone.logps(batch).split()
        return with_logps(self.loss(chosen, rejected, ref_chosen, ref_rejected), chosen, rejected)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.model_settings.prefix_sharing:
            check_prefix_sharing(self.trainer.strategy, self.served_data)

    def prepare_data_for_method(self) -> None:
        """Before anything runs shared prompts (a cached reference's precompute included), check
        once that they give this model's whole-row log-probs."""
        if self.model_settings.prefix_sharing and not self._prefix_sharing_checked:
            try:
                matches, difference = self.backbone.prefix_sharing_matches(self.device)
            except ValueError as error:  # e.g. a cache with sliding-window layers
                raise SettingError(None, "model.prefix_sharing", f"{error}: remove model.prefix_sharing") from None
            if not matches:
                raise SettingError(
                    None,
                    "model.prefix_sharing",
                    f"with model.prefix_sharing the log-probs of {type(self.backbone.policy).__name__} (attention "
                    f"{self.backbone.settings.attn_implementation!r}) differ from the unshared forward's by "
                    f"{difference:.2e}: its attention or cache does not continue a prompt exactly; remove "
                    "model.prefix_sharing",
                )
            self._prefix_sharing_checked = True
        super().prepare_data_for_method()

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


def check_prefix_sharing(strategy: Strategy, served_data: ServedData | None) -> None:
    """Refuse ``model.prefix_sharing`` where it cannot run: under FSDP (a prompt pass and a
    response pass through each sharded layer per step are untested there) or with packed batches
    (a packed row holds whole sequences back to back, not prompts once)."""
    if isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)):
        raise SettingError(
            None,
            "model.prefix_sharing",
            f"model.prefix_sharing is not supported under {type(strategy).__name__}: use DDP or one device, or "
            "remove model.prefix_sharing",
        )
    if served_data is not None and served_data.packing:
        raise SettingError(
            None,
            "model.prefix_sharing",
            "model.prefix_sharing and data packing both remove repeated work from a batch, in ways that do not "
            "combine (a packed row holds whole sequences): remove one (data.init_args.packing or "
            "model.prefix_sharing)",
        )
