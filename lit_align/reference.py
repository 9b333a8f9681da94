"""Reference strategies: where an objective's reference log-probs come from.

Objectives call ``backbone.reference_logps(batch)`` and never know which strategy ran:

* ``copy``: a frozen copy of the initial policy (twice the weights in memory).
* ``adapter``: the policy with its LoRA adapters disabled (no second copy; needs LoRA).
* ``cached``: log-probs computed once, before training, from the initial policy (adapters
  disabled under LoRA) and stored next to the tokenized data; training runs no reference forward
  and holds no reference weights. See :mod:`lit_align.reference_cache`.
* ``none``: reference-free objectives; nothing is built.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch

from lit_align.data.collate import REFERENCE_LOGPS_KEY
from lit_align.packing import response_mask

if TYPE_CHECKING:
    from lit_align.backbone import Backbone, SequenceLogps


class ReferenceStrategy:
    """What a strategy needs from the backbone; subclasses set only what differs."""

    name = ""
    precomputed = False  # log-probs are attached to the data before the first batch
    builds_copy = False  # the backbone keeps a frozen copy of the initial weights
    runs_forward = False  # a reference forward per step (counted in FLOPs)

    def logps(self, backbone: Backbone, batch: dict[str, torch.Tensor]) -> SequenceLogps:
        raise NotImplementedError

    def hidden_states(self, backbone: Backbone, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.nn.Module]:
        """(last hidden states, LM head) of the reference, for objectives that need its full
        next-token distributions (TDPO); only strategies that run a forward (``runs_forward``) have them."""
        raise NotImplementedError(f"reference={self.name} has no reference weights to run")


class FrozenCopy(ReferenceStrategy):
    """A frozen copy of the initial policy, built once by the backbone."""

    name = "copy"
    builds_copy = True
    runs_forward = True

    def logps(self, backbone: Backbone, batch: dict[str, torch.Tensor]) -> SequenceLogps:
        return backbone.logps(batch, backbone.reference)

    def hidden_states(self, backbone: Backbone, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.nn.Module]:
        return backbone.hidden_states(batch, backbone.reference), backbone.lm_head(backbone.reference)


class DisabledAdapter(ReferenceStrategy):
    """The policy's own weights with LoRA adapters switched off."""

    name = "adapter"
    runs_forward = True

    def logps(self, backbone: Backbone, batch: dict[str, torch.Tensor]) -> SequenceLogps:
        with backbone.policy.disable_adapter():
            return backbone.logps(batch)

    def hidden_states(self, backbone: Backbone, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.nn.Module]:
        with backbone.policy.disable_adapter():
            return backbone.hidden_states(batch), backbone.lm_head(backbone.policy)


class CachedLogps(ReferenceStrategy):
    """Per-token reference log-probs that the collator put in ``batch["reference_logps"]``."""

    name = "cached"
    precomputed = True

    def logps(self, backbone: Backbone, batch: dict[str, torch.Tensor]) -> SequenceLogps:
        from lit_align.backbone import SequenceLogps

        if REFERENCE_LOGPS_KEY not in batch:
            raise RuntimeError("model.reference=cached, but this batch carries no precomputed reference log-probs; "
                               "they are attached when fit/validate/test starts (use a lit-align data module)")
        return SequenceLogps(batch[REFERENCE_LOGPS_KEY].to(torch.float32), response_mask(batch))

    @staticmethod
    def source(backbone: Backbone):
        """Context in which the policy computes the reference: adapters off under LoRA."""
        return backbone.policy.disable_adapter() if backbone.is_peft else nullcontext()


class NoReference(ReferenceStrategy):
    """Reference-free objectives: asking for reference log-probs is a bug."""

    name = "none"

    def logps(self, backbone: Backbone, batch: dict[str, torch.Tensor]) -> SequenceLogps:
        raise RuntimeError("this method was built without a reference model (reference='none')")


STRATEGIES = {strategy.name: strategy for strategy in (FrozenCopy, DisabledAdapter, CachedLogps, NoReference)}
