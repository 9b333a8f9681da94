"""Supervised fine-tuning: the first stage of the SFT -> reward model -> PPO pipeline."""

from __future__ import annotations

from typing import ClassVar

import torch

from lit_align.data.collate import CompletionLayout
from lit_align.losses.sft import completion_nll
from lit_align.methods.alignment import AlignmentModule


class SFT(AlignmentModule):
    """Maximum likelihood on completion tokens only (prompt tokens are context, never targets).

    Data: :class:`lit_align.data.SFTDataModule` (``{prompt, completion}``, chat ``messages``,
    plain ``text`` or the chosen side of preference pairs), padded or packed. Logs ``loss``
    (NLL per completion token) and ``perplexity`` = exp(loss) of each batch.
    """

    needs_reference: ClassVar[bool] = False
    data_layouts: ClassVar[tuple[type, ...]] = (CompletionLayout,)
    data_module_name: ClassVar[str] = "lit_align.data.SFTDataModule"
    headline_metric: ClassVar[str] = "val/loss"

    def step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        logps = self.backbone.logps(batch)
        loss = completion_nll(logps.tokens, logps.mask)
        rows = logps.tokens.shape[0]
        self.log_metrics(stage, {"loss": loss.detach()[None], "perplexity": loss.detach().exp()[None]}, batch_size=rows)
        return loss
