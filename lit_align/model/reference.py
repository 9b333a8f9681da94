"""Reference sources: where an objective's reference log-probs come from.

``model.reference`` is resolved once, by :func:`resolve_reference`, into one of these objects;
everything else asks the object what it can do (``builds_copy``, ``uses_adapters``,
``precomputed``, ``runs_forward``) and uses its texts in errors, never the setting's string.
Objectives call ``backbone.reference_logps(batch)`` and never know which source ran:

* ``copy``: a frozen copy of the initial policy (twice the weights in memory).
* ``adapter``: the policy with its LoRA adapters disabled (no second copy; needs LoRA).
* ``cached``: log-probs computed once, before training, from the initial policy (adapters
  disabled under LoRA) and stored next to the tokenized data; training runs no reference forward
  and holds no reference weights. See :mod:`lit_align.model.reference_cache`.
* ``none``: reference-free objectives; nothing is built.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import ClassVar, Protocol

import torch
from torch import nn

from lit_align.data.collate import REFERENCE_LOGPS_KEY
from lit_align.data.packing import response_mask
from lit_align.errors import SettingError
from lit_align.model.logprobs import SequenceLogps
from lit_align.settings import ModelSettings


class ScoresSequences(Protocol):
    """What a reference source uses of the backbone (:class:`lit_align.model.backbone.Backbone`)."""

    policy: nn.Module
    reference: nn.Module | None
    is_peft: bool

    def logps(self, batch: dict[str, torch.Tensor], model: nn.Module | None = None) -> SequenceLogps: ...

    def hidden_states(self, batch: dict[str, torch.Tensor], model: nn.Module | None = None) -> torch.Tensor: ...

    def lm_head(self, model: nn.Module) -> nn.Module: ...


class ReferenceSource:
    """One way of getting reference log-probs; subclasses set what differs.

    Capabilities: ``builds_copy`` (a separate, writable frozen copy of the initial weights),
    ``uses_adapters`` (the policy itself with LoRA off), ``precomputed`` (log-probs attached to
    the data before the first batch), ``runs_forward`` (a reference forward per step, counted in
    FLOPs; only these have full next-token distributions, per-token KL). ``lacks_weights``: why
    the source has no reference weights of its own, for errors of whatever needs them.
    """

    name: ClassVar[str] = ""
    builds_copy: ClassVar[bool] = False
    uses_adapters: ClassVar[bool] = False
    precomputed: ClassVar[bool] = False
    runs_forward: ClassVar[bool] = False
    lacks_weights: ClassVar[str] = ""

    def logps(self, backbone: ScoresSequences, batch: dict[str, torch.Tensor]) -> SequenceLogps:
        raise NotImplementedError

    def hidden_states(
        self, backbone: ScoresSequences, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, nn.Module]:
        """(last hidden states, LM head) of the reference, for objectives that need its full
        next-token distributions (TDPO); only sources that run a forward (``runs_forward``) have them."""
        raise NotImplementedError(f"reference={self.name} has no reference weights to run: {self.lacks_weights}")

    def require_forward(self, who: str, purpose: str) -> None:
        """Raise unless this source runs a reference forward (full next-token distributions)."""
        if not self.runs_forward:
            raise SettingError(
                None,
                "model.reference",
                f"{who} needs {purpose}, but model.reference={self.name}: {self.lacks_weights}; "
                "set model.reference: copy or adapter (adapter needs model.lora)",
            )

    def require_copy(self, who: str, purpose: str) -> None:
        """Raise unless this source keeps separate reference weights that can be written."""
        if not self.builds_copy:
            raise SettingError(
                None,
                "model.reference",
                f"{who} {purpose}, but model.reference={self.name}: {self.lacks_weights}; set model.reference: copy",
            )


class FrozenCopy(ReferenceSource):
    """A frozen copy of the initial policy, built once by the backbone."""

    name = "copy"
    builds_copy = True
    runs_forward = True

    def logps(self, backbone: ScoresSequences, batch: dict[str, torch.Tensor]) -> SequenceLogps:
        return backbone.logps(batch, backbone.reference)

    def hidden_states(
        self, backbone: ScoresSequences, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, nn.Module]:
        return backbone.hidden_states(batch, backbone.reference), backbone.lm_head(backbone.reference)


class DisabledAdapter(ReferenceSource):
    """The policy's own weights with LoRA adapters switched off."""

    name = "adapter"
    uses_adapters = True
    runs_forward = True
    lacks_weights = (
        "the reference is the policy itself with its LoRA adapters disabled, so there are no separate reference "
        "weights (model.reference: copy keeps a frozen plain copy of the base model, updated with the base + LoRA "
        "weights)"
    )

    def logps(self, backbone: ScoresSequences, batch: dict[str, torch.Tensor]) -> SequenceLogps:
        with backbone.policy.disable_adapter():
            return backbone.logps(batch)

    def hidden_states(
        self, backbone: ScoresSequences, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, nn.Module]:
        with backbone.policy.disable_adapter():
            return backbone.hidden_states(batch), backbone.lm_head(backbone.policy)


class CachedLogps(ReferenceSource):
    """Per-token reference log-probs that the collator put in ``batch["reference_logps"]``."""

    name = "cached"
    precomputed = True
    lacks_weights = (
        "the reference log-probs of the data's own tokens were computed once before training and stored with the data; "
        "no reference model is kept, and a fixed cache cannot follow the policy"
    )

    def logps(self, backbone: ScoresSequences, batch: dict[str, torch.Tensor]) -> SequenceLogps:
        if REFERENCE_LOGPS_KEY not in batch:
            raise RuntimeError(
                "model.reference=cached, but this batch carries no precomputed reference log-probs; "
                "they are attached when fit/validate/test starts (use a lit-align data module)"
            )
        return SequenceLogps(batch[REFERENCE_LOGPS_KEY].to(torch.float32), response_mask(batch))

    @staticmethod
    def source(backbone: ScoresSequences):
        """Context in which the policy computes the reference: adapters off under LoRA."""
        return backbone.policy.disable_adapter() if backbone.is_peft else nullcontext()


class NoReference(ReferenceSource):
    """Reference-free objectives: asking for reference log-probs is a bug."""

    name = "none"
    lacks_weights = "this method has no reference model (a reference-free objective, or reference=none)"

    def logps(self, backbone: ScoresSequences, batch: dict[str, torch.Tensor]) -> SequenceLogps:
        raise RuntimeError("this method was built without a reference model (reference='none')")


BASE_MOVING_INITS = ("pissa", "olora")
"""LoRA initialisations that subtract what they put into the adapters from the base weights."""

REFERENCE_SOURCES: dict[str, type[ReferenceSource]] = {
    source.name: source for source in (FrozenCopy, DisabledAdapter, CachedLogps, NoReference)
}


def resolve_reference(settings: ModelSettings, needs_reference: bool, method: str | None = None) -> ReferenceSource:
    """The reference source ``settings.reference`` asks for, for a method that does (or does not)
    use reference log-probs. ``auto``: ``none`` for reference-free methods, else ``adapter`` with
    LoRA and ``copy`` without. A source that cannot work, or one set on a reference-free method
    (where it would do nothing), is a :class:`SettingError`."""
    chosen, who = settings.reference, f"{method}: " if method else ""
    if not needs_reference:
        if chosen not in ("auto", "none"):
            raise SettingError(
                None,
                "model.reference",
                f"{who}model.reference={chosen}, but this method is reference-free: the reference "
                "would be built or computed and never used; leave model.reference auto (or none)",
            )
        return NoReference()
    moves_base = settings.lora is not None and settings.lora.init_lora_weights in BASE_MOVING_INITS
    if chosen == "auto":
        chosen = "adapter" if settings.lora is not None and not moves_base else "copy"
    if moves_base and chosen in ("adapter", "cached"):
        raise SettingError(
            None,
            "model.reference",
            f"{who}model.reference={chosen} computes the reference with the LoRA adapters disabled, but "
            f"model.lora.init_lora_weights={settings.lora.init_lora_weights} moves the principal part of each weight "
            "into the adapters, so the disabled model is not the initial policy: use model.reference copy (or auto)",
        )
    if chosen == "none":
        raise SettingError(
            None,
            "model.reference",
            f"{who}model.reference=none, but this method needs a reference model; use copy, adapter or cached",
        )
    if chosen == "adapter" and settings.lora is None:
        raise SettingError(
            None,
            "model.reference",
            f"{who}model.reference=adapter needs model.lora (the reference is the policy with its LoRA adapters "
            "disabled)",
        )
    return REFERENCE_SOURCES[chosen]()
