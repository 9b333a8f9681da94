"""Collating tokenized pairs into one concatenated batch: chosen rows first, then rejected rows.

The policy runs once over ``2B`` rows; ``labels`` hold the response tokens and -100 on prompt and
padding positions, so the loss only ever sees response tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lit_align.logprobs import IGNORE_INDEX
from lit_align.packing import response_mask

REFERENCE_FIELDS = ("ref_chosen", "ref_rejected")  # per-token reference log-probs of each response
REFERENCE_LOGPS_KEY = "reference_logps"  # their [2B, T] tensor in a batch


class PairCollator:
    """Pads ``[prompt + chosen, ...] + [prompt + rejected, ...]`` on the right to one length."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 1):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        rows = _sequences(examples)
        length = max(len(prompt) + len(response) for prompt, response in rows)
        length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for row, (prompt, response) in enumerate(rows):
            ids = prompt + response
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, len(prompt): len(ids)] = torch.tensor(response)
            attention_mask[row, : len(ids)] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        _add_reference_logps(batch, examples)
        for key in examples[0]:
            if key not in ("prompt", "chosen", "rejected", *REFERENCE_FIELDS):
                batch[key] = torch.stack([torch.as_tensor(ex[key]) for ex in examples])
        return batch


class PackedPairCollator:
    """The chosen and rejected sequences of a batch packed, without padding between them, into as
    few rows of at most ``capacity`` tokens as first-fit-decreasing finds.

    Returns ``input_ids``, ``labels``, ``position_ids`` of shape ``[R, L]`` (positions restart at 0
    for each sequence; the short tail of a row is filler that no real token attends to) and, per
    sequence (chosen rows first, then rejected), ``seq_rows``/``seq_starts``/``seq_lens``; no
    attention mask (see :mod:`lit_align.packing`). Bounded rows keep attention cost near that of
    the sequences themselves instead of growing with the square of the whole batch.

    Args:
        pad_token_id: filler token at row ends.
        capacity: tokens per row (at least the longest sequence); ``None`` = the longest sequence.
    """

    def __init__(self, pad_token_id: int = 0, capacity: int | None = None):
        self.pad_token_id, self.capacity = pad_token_id, capacity

    def __call__(self, examples: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        rows = _sequences(examples)
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
                input_ids[row, offset: offset + len(ids)] = torch.tensor(ids)
                labels[row, offset + len(prompt): offset + len(ids)] = torch.tensor(response)
                labels[row, offset] = IGNORE_INDEX  # a sequence's first token is never predicted
                positions[row, offset: offset + len(ids)] = torch.arange(len(ids))
                seq_rows[index], seq_starts[index] = row, offset
                offset += len(ids)
            positions[row, offset:] = torch.arange(width - offset)  # filler: a segment of its own
        batch = {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": positions,
            "seq_rows": torch.tensor(seq_rows),
            "seq_starts": torch.tensor(seq_starts),
            "seq_lens": torch.tensor(lengths),
        }
        _add_reference_logps(batch, examples)
        return batch


def _sequences(examples: Sequence[dict[str, list[int]]]) -> list[tuple[list[int], list[int]]]:
    """(prompt, response) of every sequence: all chosen first, then all rejected."""
    return [(ex["prompt"], ex["chosen"]) for ex in examples] + [(ex["prompt"], ex["rejected"]) for ex in examples]


def _add_reference_logps(batch: dict[str, torch.Tensor], examples: Sequence[dict]) -> None:
    """Cached per-token reference log-probs as ``[2B, T]`` in the padded layout the backbone
    returns (position t holds the log-prob of token t+1, zero off the response), placed on the
    same response positions the policy's log-probs will have."""
    if REFERENCE_FIELDS[0] not in examples[0]:
        return
    mask = response_mask(batch)
    values = [ex[REFERENCE_FIELDS[0]] for ex in examples] + [ex[REFERENCE_FIELDS[1]] for ex in examples]
    out = torch.zeros(mask.shape, dtype=torch.float32)
    for row, row_values in enumerate(values):
        out[row, mask[row]] = torch.as_tensor(row_values, dtype=torch.float32)
    batch[REFERENCE_LOGPS_KEY] = out
