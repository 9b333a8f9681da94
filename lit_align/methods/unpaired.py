"""The unpaired LightningModule: objectives on single completions labelled desirable or not (KTO, NPO, BCO).

A subclass overrides :meth:`UnpairedPreferenceModule.loss`; the base runs one policy forward over
the batch's completions (and, when the objective sets ``needs_mismatched_completions``, the
mismatched prompt/completion rows of KTO's reference point), the reference, and the metrics.
"""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar, Optional

import torch

from lit_align.data.collate import UnpairedLayout
from lit_align.data.contract import DataRequest
from lit_align.losses.types import UnpairedLoss
from lit_align.methods.alignment import AlignmentModule
from lit_align.model.logprobs import SequenceLogps


class UnpairedPreferenceModule(AlignmentModule):
    """Base for objectives on (prompt, completion, label) examples; use with
    :class:`lit_align.data.UnpairedDataModule`.

    Logged: ``loss``, ``rewards/desirable`` and ``rewards/undesirable`` (mean implicit reward of
    each class), ``rewards/margins`` (their difference within a batch that has both; the
    held-out headline), ``logps/desirable|undesirable`` and the objective's extras.

    Args:
        model: the causal LM, LoRA/QLoRA and reference source.
        optimizer: AdamW and learning-rate schedule.
    """

    data_layouts = (UnpairedLayout,)
    data_module_name = "lit_align.data.UnpairedDataModule"
    headline_metric = "val/rewards/margins"
    needs_mismatched_completions: ClassVar[bool] = False
    """Whether the data module should give each example a mismatched completion (KTO's KL rows):
    part of this method's :meth:`data_request`."""

    def data_request(self) -> DataRequest:
        return replace(super().data_request(), mismatched_completions=self.needs_mismatched_completions)

    def loss(
        self,
        completions: SequenceLogps,
        ref_completions: Optional[SequenceLogps],
        desirable: torch.Tensor,
        mismatched: Optional[SequenceLogps],
        ref_mismatched: Optional[SequenceLogps],
    ) -> UnpairedLoss:
        """Per-example losses and implicit rewards.

        Args:
            completions: policy log-probs of each example's completion (``.sum``, ``.count``, ...).
            ref_completions: the reference's, or None when ``needs_reference`` is False.
            desirable: ``[B]`` bool, the labels.
            mismatched: policy log-probs of the mismatched completions (None unless
                ``needs_mismatched_completions``).
            ref_mismatched: the reference's.
        """
        raise NotImplementedError

    def forward_unpaired(self, batch: dict[str, torch.Tensor]) -> UnpairedLoss:
        """The reference's forward, one policy forward over every row (the reference first, as in
        :meth:`PairedPreferenceModule.forward_pair`), then the objective."""
        self.current_batch = batch
        desirable = batch["label"].bool()
        references = self.reference_logps(batch) if self.needs_reference else None
        rows = self.backbone.logps(batch)
        completions, mismatched = _split_mismatched(rows, desirable.shape[0])
        ref_completions, ref_mismatched = (
            _split_mismatched(references, desirable.shape[0]) if references is not None else (None, None)
        )
        if self.needs_mismatched_completions and mismatched is None:
            raise RuntimeError(
                f"{type(self).__name__} needs mismatched completions, but the batch has none; "
                "train it with lit_align.data.UnpairedDataModule, which adds them when the module asks"
            )
        output = self.loss(completions, ref_completions, desirable, mismatched, ref_mismatched)
        logps = completions.sum.detach()
        return output._replace(
            metrics={"logps/desirable": logps[desirable], "logps/undesirable": logps[~desirable], **output.metrics}
        )

    def step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        output = self.forward_unpaired(batch)
        desirable = batch["label"].bool()
        values = {
            "loss": output.losses.detach(),
            "rewards/desirable": output.rewards[desirable],
            "rewards/undesirable": output.rewards[~desirable],
        }
        if desirable.any() and (~desirable).any():
            values["rewards/margins"] = output.rewards[desirable].mean() - output.rewards[~desirable].mean()
        values.update(output.metrics)
        self.log_metrics(stage, values, batch_size=output.losses.shape[0])
        return output.losses.mean()


def _split_mismatched(rows: SequenceLogps, count: int) -> tuple[SequenceLogps, Optional[SequenceLogps]]:
    """(completion rows, mismatched rows or None) of an unpaired batch."""
    if rows.tokens.shape[0] == count:
        return rows, None
    return SequenceLogps(rows.tokens[:count], rows.mask[:count]), SequenceLogps(rows.tokens[count:], rows.mask[count:])
