"""Padding-free batches: sequences packed side by side into rows, separated by ``position_ids``.

A packed batch has ``input_ids``/``labels``/``position_ids`` of shape ``[R, L]`` (sequences
back to back, positions restarting at 0 for each) and per sequence ``seq_rows``, ``seq_starts``,
``seq_lens``; it has no ``attention_mask``. transformers then
builds a block-diagonal causal mask from the position resets (sdpa, eager) or runs variable-length
kernels (flash attention). Passing an attention mask, or using the KV cache, would let sequences
attend to each other silently, so neither is ever passed with a packed batch; the backbone checks
once per model that packed and padded log-probs agree before packing is used (else: padding).

Per-token values come back in the padded layout ``[R, max_len]``, so objectives never see packing.
"""

from __future__ import annotations

import torch

from lit_align.data.labels import IGNORE_INDEX, shift_labels


def is_packed(batch: dict[str, torch.Tensor]) -> bool:
    return "seq_lens" in batch


def unpack_rows(values: torch.Tensor, batch: dict[str, torch.Tensor], fill: float | int = 0) -> torch.Tensor:
    """``[R, L]`` packed values -> ``[S, max(seq_lens)]``, one row per sequence, ``fill`` past its end."""
    seq_lens = batch["seq_lens"].to(values.device)
    rows = batch["seq_rows"].to(values.device)
    starts = batch["seq_starts"].to(values.device)
    offsets = torch.arange(int(seq_lens.max()), device=values.device)
    columns = (starts[:, None] + offsets[None, :]).clamp(max=values.shape[1] - 1)
    inside = offsets[None, :] < seq_lens[:, None]
    unpacked = values[rows[:, None], columns]
    return torch.where(inside, unpacked, torch.full_like(unpacked, fill))


def at_positions(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like the bool ``positions`` holding ``values`` (one per True entry, in
    order) where it is True and 0 elsewhere: the inverse of ``tensor[positions]``."""
    return torch.zeros(positions.shape, dtype=values.dtype, device=values.device).masked_scatter(positions, values)


def padded_layout(
    values: torch.Tensor, batch: dict[str, torch.Tensor], positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token ``values`` of a padded or packed batch in the padded layout (``[S, T]``, as
    :func:`response_mask`). ``values`` is ``[R, L]`` in the batch's own layout or, with a bool
    ``[R, L]`` ``positions``, holds the values at those positions only (in order; 0 elsewhere)."""
    if positions is not None:
        values = at_positions(values, positions)
    return unpack_rows(values, batch) if is_packed(batch) else values


def response_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[R, T]`` True where the (shifted) label is a response token, in the padded layout."""
    labels = shift_labels(batch["labels"])
    if is_packed(batch):
        labels = unpack_rows(labels, batch, fill=IGNORE_INDEX)
    return labels != IGNORE_INDEX


def token_count(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-padding) tokens in a padded or packed batch."""
    return int(batch["seq_lens"].sum()) if is_packed(batch) else int(batch["attention_mask"].sum())


def row_count(batch: dict[str, torch.Tensor]) -> int:
    """Sequences in a padded or packed batch (2 per pair)."""
    return int(batch["seq_lens"].shape[0]) if is_packed(batch) else int(batch["input_ids"].shape[0])
