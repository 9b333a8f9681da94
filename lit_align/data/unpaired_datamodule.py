"""The unpaired data module: ``{prompt, completion, label}`` examples for KTO, NPO and BCO."""

from __future__ import annotations

from typing import Any

from lit_align.data.collate import UnpairedLayout
from lit_align.data.datamodule import AlignmentDataModule
from lit_align.data.errors import DataError
from lit_align.data.formats import PAIR_FIELDS, normalise_record
from lit_align.data.storage import ExampleTable
from lit_align.data.unpaired import (
    UNPAIRED_FIELDS,
    normalise_unpaired,
    pair_to_unpaired,
)


class UnpairedDataModule(AlignmentDataModule):
    """Unpaired examples: a prompt, one completion and a label (true = desirable).

    Every setting of :class:`AlignmentDataModule` applies. Records are ``{prompt, completion,
    label}`` (text or chat messages; ``columns`` renames fields), or preference pairs when
    ``from_pairs`` is set: each pair then gives its chosen response as a desirable example and its
    rejected response as an undesirable one. The built-in task is always converted from pairs.

    When the objective asks for them (KTO's reference point), each example also gets a
    *mismatched* completion: the completion of the next example with a different prompt, tokenized
    after this example's prompt. They are fixed when the data is prepared, so the KL estimate
    works at any batch size (batch size 1 included) and with the cached reference.

    :meth:`count_classes` gives the number of desirable and undesirable training examples (KTO's
    and BCO's class-balance weights are computed from them).

    Args:
        from_pairs: the records are preference pairs (any paired format) to convert.
    """

    layout = UnpairedLayout()
    record_fields = UNPAIRED_FIELDS + PAIR_FIELDS[1:]  # pairs with ``from_pairs``
    example_features = {"prompt": "ids", "completion": "ids", "label": "bool"}  # + kl_completion (finish_split)

    def __init__(self, *args, from_pairs: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.mismatched_completions = False
        """Add mismatched completions even without a request asking for them (standalone use)."""

    def _converts_pairs(self, source: str) -> bool:
        """Paired records to convert: ``from_pairs``, or the built-in task's pairs."""
        return self.hparams.from_pairs or source.startswith("builtin:")

    def tokenize_record(self, record: dict[str, Any], source: str, index: int) -> list[dict[str, Any]]:
        h = self.hparams
        if self._converts_pairs(source):
            items = pair_to_unpaired(
                normalise_record(record, source, index, h.format, h.columns, h.assistant_marker, h.user_marker)
            )
        else:
            items = [normalise_unpaired(record, source, index, h.columns)]
        return [self._tokenize(item, source, index) for item in items]

    def _tokenize(self, item, source: str, index: int) -> dict[str, Any]:
        prompt, responses = self.tokenize_responses(item.prompt, {"completion": item.completion}, source, index)
        return {"prompt": prompt, "completion": responses["completion"], "label": item.label}

    def cache_identity(self) -> list[Any]:
        return [self._wants_mismatched()]

    def _wants_mismatched(self) -> bool:
        return self.mismatched_completions or (self.request is not None and self.request.mismatched_completions)

    def finish_split(self, name: str, source: str, examples: ExampleTable) -> ExampleTable:
        """Each example's mismatched completion (``kl_completion``): the completion of the next
        example (cyclically) whose prompt differs, cut to fit ``max_length`` after this prompt."""
        if not self._wants_mismatched():
            return examples
        starts, first, previous = [], None, None  # where each run of equal consecutive prompts starts
        for position, prompt in enumerate(examples.iter_column("prompt")):
            if position == 0:
                first = prompt
            if position == 0 or prompt != previous:
                starts.append(position)
            previous = prompt
        if len(starts) < 2:
            raise DataError(
                source, "every example has the same prompt, so no mismatched completions exist for the KL estimate"
            )
        # a run's examples take the next run's first completion (it differs from theirs, equal to
        # theirs being what a run means); the last run wraps around to the first example, or to
        # the second run when the first run has its prompt too
        wrap = 0 if first != previous else starts[1]
        other, bounds = [], starts + [len(examples)]
        for run in range(len(starts)):
            target = starts[run + 1] if run + 1 < len(starts) else wrap
            other += [target] * (bounds[run + 1] - bounds[run])

        def mismatched(positions: range) -> list[list[int]]:
            prompts = examples.column("prompt", positions)
            completions = examples.column("completion", [other[p] for p in positions])
            return [c[: self.hparams.max_length - len(p)] for p, c in zip(prompts, completions, strict=True)]

        path = examples.path.with_name(f"{name}-mismatched.arrow")
        return examples.write(path, {"kl_completion": ("ids", mismatched)})

    def count_classes(self) -> dict[str, int]:
        labels = [bool(label) for label in self.datasets["train"].column("label")]
        return {"desirable": sum(labels), "undesirable": len(labels) - sum(labels)}
