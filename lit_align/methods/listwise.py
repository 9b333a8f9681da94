"""The listwise LightningModule: objectives on K scored responses per prompt (RRHF, PRO, LiPO).

The K responses of every prompt run as adjacent rows of one policy forward; the base gathers
their log-probs into ``[B, K]`` tables (:class:`ResponseLists`) for :meth:`ListwisePreferenceModule.loss`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from lit_align.data.collate import ListLayout
from lit_align.losses.types import ListwiseLoss, pairwise_accuracy
from lit_align.methods.alignment import AlignmentModule
from lit_align.model.logprobs import SequenceLogps


@dataclass
class ResponseLists:
    """Log-probs of K responses per prompt.

    Attributes:
        sum: ``[B, K]`` log pi(y_k|x) (0 where ``valid`` is False).
        count: ``[B, K]`` response lengths |y_k|.
        valid: ``[B, K]`` True where the prompt has a k-th response.
    """

    sum: torch.Tensor
    count: torch.Tensor
    valid: torch.Tensor

    @property
    def mean(self) -> torch.Tensor:
        """Length-normalised log-probs log pi(y_k|x) / |y_k| (0 where invalid)."""
        return self.sum / self.count.clamp(min=1)

    @classmethod
    def gather(cls, rows: SequenceLogps, list_index: torch.Tensor) -> "ResponseLists":
        """Tables ``[B, K]`` from per-row log-probs and the batch's ``list_index`` (-1 = none)."""
        valid = list_index >= 0
        index = list_index.clamp(min=0)
        zero = torch.zeros((), dtype=rows.tokens.dtype, device=rows.tokens.device)
        return cls(torch.where(valid, rows.sum[index], zero), torch.where(valid, rows.count[index], 0), valid)


class ListwisePreferenceModule(AlignmentModule):
    """Base for objectives on a prompt with K scored responses; use with
    :class:`lit_align.data.ListwiseDataModule`.

    Logged: ``loss``; ``rewards/accuracies``: over every pair of responses with different scores,
    how often the implicit rewards order them as the scores do (ties count 1/2; chance is 0.5);
    ``rewards/top1``: whether the highest reward falls on a best-scored response; and the
    objective's extras.

    Args:
        model: the causal LM, LoRA/QLoRA and reference source.
        optimizer: AdamW and learning-rate schedule.
    """

    data_layouts = (ListLayout,)
    data_module_name = "lit_align.data.ListwiseDataModule"

    def loss(self, policy: ResponseLists, reference: Optional[ResponseLists], scores: torch.Tensor) -> ListwiseLoss:
        """Per-prompt losses and implicit rewards.

        Args:
            policy: policy log-probs ``[B, K]`` of each response.
            reference: the reference's, or None when ``needs_reference`` is False.
            scores: ``[B, K]`` scores (higher = better; NaN where ``policy.valid`` is False).
        """
        raise NotImplementedError

    def forward_lists(self, batch: dict[str, torch.Tensor]) -> ListwiseLoss:
        """The reference's forward, one policy forward over the K responses of every prompt (the
        reference first, as in :meth:`PairedPreferenceModule.forward_pair`), then the objective."""
        self.current_batch = batch
        reference = (
            ResponseLists.gather(self.reference_logps(batch), batch["list_index"]) if self.needs_reference else None
        )
        policy = ResponseLists.gather(self.backbone.logps(batch), batch["list_index"])
        return self.loss(policy, reference, batch["scores"])

    def step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        output = self.forward_lists(batch)
        values = {
            "loss": output.losses.detach(),
            **ranking_metrics(output.rewards, batch["scores"], batch["list_index"] >= 0),
            **output.metrics,
        }
        self.log_metrics(stage, values, batch_size=output.losses.shape[0])
        return output.losses.mean()


def ranking_metrics(rewards: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """Pairwise ranking accuracy over pairs with different scores, and the top-1 hit rate; a tie in
    reward counts one half in accuracy, and top-1 is shared among tied highest rewards (so an
    untrained policy, whose rewards are all equal, scores chance, not a hit)."""
    better = (scores[:, :, None] > scores[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    correct = pairwise_accuracy(rewards[:, :, None] - rewards[:, None, :])
    masked = rewards.masked_fill(~valid, float("-inf"))
    highest = (masked == masked.amax(dim=1, keepdim=True)) & valid
    best = scores.masked_fill(~valid, float("-inf")).amax(dim=1, keepdim=True)
    top1 = (highest & (scores == best)).sum(1) / highest.sum(1)
    return {"rewards/accuracies": correct[better], "rewards/top1": top1.float()}
