"""Collating tokenized examples into one policy batch: every response of every example is a row.

A *layout* says which responses an example has and in which order they become rows:

* :class:`PairLayout` (paired data): all chosen rows first, then all rejected rows (``2B`` rows).
* :class:`UnpairedLayout` (KTO, NPO, BCO): one row per completion, then, when the examples carry
  one, a row per mismatched completion (another record's completion under this prompt, for KTO's
  reference point).
* :class:`CompletionLayout` (SFT): one row per ``{prompt, completion}`` example.
* :class:`PromptLayout` (on-policy methods): prompts only, left-padded by :class:`PromptCollator`.
* :class:`ListLayout` (listwise): the K responses of each example next to each other; ``list_index``
  ``[B, K]`` gives each (example, response) its row (-1 where an example has fewer responses).

The policy runs once over all rows; ``labels`` hold the response tokens and -100 on prompt and
padding positions, so the loss only ever sees response tokens. Per-example numbers (``label``,
``score_chosen``, ...) are stacked into ``[B]`` tensors; listwise ``scores`` become ``[B, K]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from lit_align.data.labels import IGNORE_INDEX
from lit_align.data.packing import response_mask, row_count, token_count

REFERENCE_FIELD = "ref_logps"  # per example: per-token reference log-probs of each response, in layout order
REFERENCE_LOGPS_KEY = "reference_logps"  # their [rows, T] tensor in a batch
Example = dict[str, Any]


class Layout:
    """Which responses of an example become policy rows, and in which order; one subclass per
    data regime. ``token_fields`` hold token ids; every other numeric field of an example is
    stacked into a ``[B]`` tensor of the batch (:meth:`extras`)."""

    token_fields: tuple[str, ...] = ()

    def responses(self, example: Example) -> list[list[int]]:
        """The token ids of each response of ``example`` that becomes a row."""
        raise NotImplementedError

    def rows(self, examples: Sequence[Example]) -> list[tuple[int, int]]:
        """(example, response) of each row of a batch of ``examples``, in row order."""
        raise NotImplementedError

    def extras(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        """Per-example values of the batch besides the token rows."""
        return _stack_scalars(examples, self.token_fields)

    def samples(self, batch: dict[str, Any]) -> int:
        """Examples in a collated batch (what samples/s counts): pairs, completions, lists or prompts."""
        raise NotImplementedError

    def tokens(self, batch: dict[str, Any]) -> int:
        """Real (non-padding) tokens of a collated batch, every row counted."""
        return token_count(batch)


class PairLayout(Layout):
    """Paired examples ``{prompt, chosen, rejected}``: chosen rows ``0..B-1``, rejected ``B..2B-1``."""

    token_fields = ("prompt", "chosen", "rejected")

    def responses(self, example: Example) -> list[list[int]]:
        return [example["chosen"], example["rejected"]]

    def rows(self, examples: Sequence[Example]) -> list[tuple[int, int]]:
        return [(i, 0) for i in range(len(examples))] + [(i, 1) for i in range(len(examples))]

    def samples(self, batch: dict[str, Any]) -> int:
        return row_count(batch) // 2


class UnpairedLayout(Layout):
    """Unpaired examples ``{prompt, completion, label[, kl_completion]}``: completion rows first,
    then (if present) the mismatched-completion rows in the same order."""

    token_fields = ("prompt", "completion", "kl_completion")

    def responses(self, example: Example) -> list[list[int]]:
        return [example["completion"]] + ([example["kl_completion"]] if "kl_completion" in example else [])

    def rows(self, examples: Sequence[Example]) -> list[tuple[int, int]]:
        count = len(self.responses(examples[0]))
        return [(i, k) for k in range(count) for i in range(len(examples))]

    def samples(self, batch: dict[str, Any]) -> int:
        return int(batch["label"].shape[0])  # mismatched-completion rows are not examples


class ListLayout(Layout):
    """Listwise examples ``{prompt, responses: [...], scores: [...]}``: an example's responses are
    adjacent rows; ``list_index [B, K]`` maps them back, ``scores [B, K]`` (NaN past an example's end)."""

    token_fields = ("prompt", "responses", "scores")

    def responses(self, example: Example) -> list[list[int]]:
        return list(example["responses"])

    def rows(self, examples: Sequence[Example]) -> list[tuple[int, int]]:
        return [(i, k) for i, example in enumerate(examples) for k in range(len(example["responses"]))]

    def extras(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        width = max(len(example["responses"]) for example in examples)
        index = torch.full((len(examples), width), -1, dtype=torch.long)
        scores = torch.full((len(examples), width), math.nan, dtype=torch.float32)
        row = 0
        for i, example in enumerate(examples):
            count = len(example["responses"])
            index[i, :count] = torch.arange(row, row + count)
            scores[i, :count] = torch.as_tensor(example["scores"], dtype=torch.float32)
            row += count
        return {"list_index": index, "scores": scores, **_stack_scalars(examples, self.token_fields)}

    def samples(self, batch: dict[str, Any]) -> int:
        return int(batch["list_index"].shape[0])


class CompletionLayout(Layout):
    """Single-response examples ``{prompt, completion}`` (SFT): one row per example, in order."""

    token_fields = ("prompt", "completion")

    def responses(self, example: Example) -> list[list[int]]:
        return [example["completion"]]

    def rows(self, examples: Sequence[Example]) -> list[tuple[int, int]]:
        return [(i, 0) for i in range(len(examples))]

    def samples(self, batch: dict[str, Any]) -> int:
        return row_count(batch)


class PromptLayout(Layout):
    """Prompts only ``{prompt, text}`` (on-policy methods generate the responses); collated by
    :class:`PromptCollator`, left-padded for generation."""

    token_fields = ("prompt",)

    def responses(self, example: Example) -> list[list[int]]:
        return []

    def rows(self, examples: Sequence[Example]) -> list[tuple[int, int]]:
        return []

    def samples(self, batch: dict[str, Any]) -> int:
        return int(batch["prompt_ids"].shape[0])

    def tokens(self, batch: dict[str, Any]) -> int:
        return int(batch["prompt_mask"].sum())


class PromptCollator:
    """Prompts padded on the left (``prompt_ids``, ``prompt_mask``), as ``generate`` expects, plus
    ``prompts``: the raw prompts (text or chat messages) for reward functions."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: Sequence[Example]) -> dict[str, Any]:
        length = max(len(example["prompt"]) for example in examples)
        ids = torch.full((len(examples), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(examples), length), dtype=torch.long)
        for row, example in enumerate(examples):
            prompt = example["prompt"]
            ids[row, length - len(prompt) :] = torch.tensor(prompt)
            mask[row, length - len(prompt) :] = 1
        batch = {"prompt_ids": ids, "prompt_mask": mask, "prompts": [example["text"] for example in examples]}
        if any(example.get("answer") is not None for example in examples):  # reference answers (verifiable rewards)
            batch["answers"] = [example.get("answer") for example in examples]
        return batch


class Collator:
    """Pads the rows of a layout on the right to one length (``input_ids``, ``attention_mask``, ``labels``)."""

    def __init__(self, pad_token_id: int, layout: Layout | None = None, pad_to_multiple_of: int = 1):
        self.pad_token_id = pad_token_id
        self.layout = layout or PairLayout()
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        placement = self.layout.rows(examples)
        rows = [(examples[i]["prompt"], self.layout.responses(examples[i])[k]) for i, k in placement]
        batch = self._tokens(rows)
        _add_reference_logps(batch, examples, placement)
        batch.update(self.layout.extras(examples))
        return batch

    def _tokens(self, rows: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        length = max(len(prompt) + len(response) for prompt, response in rows)
        length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for row, (prompt, response) in enumerate(rows):
            ids = prompt + response
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, len(prompt) : len(ids)] = torch.tensor(response)
            attention_mask[row, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class PackedCollator(Collator):
    """The rows of a layout packed, without padding between them, into as few rows of at most
    ``capacity`` tokens as first-fit-decreasing finds.

    Returns ``input_ids``, ``labels``, ``position_ids`` of shape ``[R, L]`` (positions restart at 0
    for each sequence; the short tail of a row is filler that no real token attends to) and, per
    sequence (in layout order), ``seq_rows``/``seq_starts``/``seq_lens``; no attention mask (see
    :mod:`lit_align.data.packing`). Bounded rows keep attention cost near that of the sequences
    themselves instead of growing with the square of the whole batch.

    Args:
        pad_token_id: filler token at row ends.
        capacity: tokens per row (at least the longest sequence); ``None`` = the longest sequence.
        layout: which responses become rows (default: pairs).
    """

    def __init__(self, pad_token_id: int = 0, capacity: int | None = None, layout: Layout | None = None):
        super().__init__(pad_token_id, layout)
        self.capacity = capacity

    def _tokens(self, rows: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        lengths = [len(prompt) + len(response) for prompt, response in rows]
        capacity = max(self.capacity or 0, *lengths)
        bins: list[list[int]] = []  # sequence indices per packed row
        used: list[int] = []
        for index in sorted(range(len(rows)), key=lambda i: -lengths[i]):
            slot = next((b for b, size in enumerate(used) if size + lengths[index] <= capacity), None)
            if slot is None:
                bins.append([])
                used.append(0)
                slot = len(bins) - 1
            bins[slot].append(index)
            used[slot] += lengths[index]
        width = max(used)
        input_ids = torch.full((len(bins), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(bins), width), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((len(bins), width), dtype=torch.long)
        seq_rows, seq_starts = [0] * len(rows), [0] * len(rows)
        for row, members in enumerate(bins):
            offset = 0
            for index in members:
                prompt, response = rows[index]
                ids = prompt + response
                input_ids[row, offset : offset + len(ids)] = torch.tensor(ids)
                labels[row, offset + len(prompt) : offset + len(ids)] = torch.tensor(response)
                labels[row, offset] = IGNORE_INDEX  # a sequence's first token is never predicted
                positions[row, offset : offset + len(ids)] = torch.arange(len(ids))
                seq_rows[index], seq_starts[index] = row, offset
                offset += len(ids)
            positions[row, offset:] = torch.arange(width - offset)  # filler: a segment of its own
        return {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": positions,
            "seq_rows": torch.tensor(seq_rows),
            "seq_starts": torch.tensor(seq_starts),
            "seq_lens": torch.tensor(lengths),
        }


class PairCollator(Collator):
    """Pads ``[prompt + chosen, ...] + [prompt + rejected, ...]`` on the right to one length."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 1):
        super().__init__(pad_token_id, PairLayout(), pad_to_multiple_of)


class PackedPairCollator(PackedCollator):
    """Chosen and rejected sequences packed (see :class:`PackedCollator`)."""

    def __init__(self, pad_token_id: int = 0, capacity: int | None = None):
        super().__init__(pad_token_id, capacity, PairLayout())


def _stack_scalars(examples: Sequence[Example], token_fields: Sequence[str]) -> dict[str, torch.Tensor]:
    """Every per-example number (``label``, ``score_chosen``, ...) as a ``[B]`` tensor; an
    example without a number another example has gets NaN (e.g. a pair without scores)."""
    skip = {*token_fields, REFERENCE_FIELD}
    keys = dict.fromkeys(key for ex in examples for key in ex if key not in skip)
    return {key: torch.stack([torch.as_tensor(ex.get(key, math.nan)) for ex in examples]) for key in keys}


def _add_reference_logps(
    batch: dict[str, torch.Tensor], examples: Sequence[Example], placement: list[tuple[int, int]]
) -> None:
    """Cached per-token reference log-probs as ``[rows, T]`` in the padded layout the backbone
    returns (position t holds the log-prob of token t+1, zero off the response), placed on the
    same response positions the policy's log-probs will have."""
    if REFERENCE_FIELD not in examples[0]:
        return
    mask = response_mask(batch)
    out = torch.zeros(mask.shape, dtype=torch.float32)
    for row, (i, k) in enumerate(placement):
        out[row, mask[row]] = torch.as_tensor(examples[i][REFERENCE_FIELD][k], dtype=torch.float32)
    batch[REFERENCE_LOGPS_KEY] = out
