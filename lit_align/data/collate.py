"""Collating tokenized pairs into one concatenated batch: chosen rows first, then rejected rows.

The policy runs once over ``2B`` rows; ``labels`` hold the response tokens and -100 on prompt and
padding positions, so the loss only ever sees response tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lit_align.logprobs import IGNORE_INDEX, shift_labels
from lit_align.reference import REFERENCE_LOGPS_KEY

REFERENCE_FIELDS = ("ref_chosen", "ref_rejected")  # per-token reference log-probs of each response


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


def _reference_logps(examples: Sequence[dict], labels: torch.Tensor) -> torch.Tensor:
    """``[2B, T]`` cached per-token reference log-probs, aligned like the backbone's log-probs
    (position t holds the log-prob of token t+1); zero off the response."""
    mask = shift_labels(labels) != IGNORE_INDEX
    values = [ex[REFERENCE_FIELDS[0]] for ex in examples] + [ex[REFERENCE_FIELDS[1]] for ex in examples]
    out = torch.zeros(labels.shape, dtype=torch.float32)
    for row, row_values in enumerate(values):
        out[row, mask[row]] = torch.as_tensor(row_values, dtype=torch.float32)
    return out
