"""Collating tokenized pairs into one concatenated batch: chosen rows first, then rejected rows.

The policy runs once over ``2B`` rows; ``labels`` hold the response tokens and -100 on prompt and
padding positions, so the loss only ever sees response tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lit_align.logprobs import IGNORE_INDEX, shift_labels

REFERENCE_FIELDS = ("ref_chosen", "ref_rejected")  # per-token reference log-probs of each response
REFERENCE_LOGPS_KEY = "reference_logps"  # their [2B, T] tensor in a batch


class PairCollator:
    """Pads ``[prompt + chosen, ...] + [prompt + rejected, ...]`` on the right to one length."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 1):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        rows = [(ex["prompt"], ex["chosen"]) for ex in examples] + [(ex["prompt"], ex["rejected"]) for ex in examples]
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
        if REFERENCE_FIELDS[0] in examples[0]:
            batch[REFERENCE_LOGPS_KEY] = _reference_logps(examples, labels)
        for key in examples[0]:
            if key not in ("prompt", "chosen", "rejected", *REFERENCE_FIELDS):
                batch[key] = torch.stack([torch.as_tensor(ex[key]) for ex in examples])
        return batch


class PackedPairCollator:
    """All chosen then all rejected sequences of a batch in one padding-free row.

    Returns ``input_ids``, ``labels``, ``position_ids`` of shape ``[1, L]`` and ``seq_lens``
    ``[2B]``; no attention mask (see :mod:`lit_align.packing`). The first token of each sequence is
    never a label, so no sequence is scored on the end of the previous one.
    """

    def __call__(self, examples: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        rows = [(ex["prompt"], ex["chosen"]) for ex in examples] + [(ex["prompt"], ex["rejected"]) for ex in examples]
        input_ids, labels, positions, lengths = [], [], [], []
        for prompt, response in rows:
            ids = prompt + response
            input_ids += ids
            labels += [IGNORE_INDEX] * len(prompt) + response
            labels[len(input_ids) - len(ids)] = IGNORE_INDEX
            positions += range(len(ids))
            lengths.append(len(ids))
        batch = {
            "input_ids": torch.tensor([input_ids]),
            "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([positions]),
            "seq_lens": torch.tensor(lengths),
        }
        if REFERENCE_FIELDS[0] in examples[0]:
            width = max(lengths)
            padded_labels = torch.full((len(rows), width), IGNORE_INDEX)
            for row, (prompt, response) in enumerate(rows):
                padded_labels[row, len(prompt): len(prompt) + len(response)] = torch.tensor(response)
            batch[REFERENCE_LOGPS_KEY] = _reference_logps(examples, padded_labels)
        return batch


def _reference_logps(examples: Sequence[dict], labels: torch.Tensor) -> torch.Tensor:
    """``[2B, T]`` cached per-token reference log-probs, aligned like the backbone's log-probs
    (position t holds the log-prob of token t+1); zero off the response."""
    mask = shift_labels(labels) != IGNORE_INDEX
    values = [ex[REFERENCE_FIELDS[0]] for ex in examples] + [ex[REFERENCE_FIELDS[1]] for ex in examples]
    out = torch.zeros(labels.shape, dtype=torch.float32)
    for row, row_values in enumerate(values):
        out[row, mask[row]] = torch.as_tensor(row_values, dtype=torch.float32)
    return out
