"""Log-probs of responses that share a prompt, with the prompt run once (``model.prefix_sharing``).

A paired batch holds each prompt twice: row ``i`` is prompt + chosen, row ``i + B`` prompt +
rejected. The prompt tokens give the same hidden states, keys and values in both rows, so the
decoder can run the ``B`` prompts once, keep their key/value cache (with its autograd graph), and
run the ``2B`` responses as continuations that attend to it. The decoder's token work falls from
2(P + R) to P + 2R per pair (a quarter less at P = R; more for the long multi-turn prompts of chat
data), activations likewise, and the log-probs are the unshared ones up to float rounding (tested
to 1e-5, values and gradients): the gradient reaches the prompt's computation through the cached
keys and values.

The idea is Wang et al. 2024 ("Accelerating Direct Preference Optimization with Prefix
Sharing"), who pack [prompt, chosen, rejected] into one row with a custom attention mask. Here the
responses attend to a KV cache instead: a custom mask makes the fused attention kernels compute
every block of the row's scores (no causal skipping), while a cache keeps each attention causal
and uses transformers' own cache and mask code, for any decoder whose cache is a plain
:class:`transformers.DynamicCache` (sliding-window layers are refused).
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import torch
from torch import nn

from lit_align.data.labels import IGNORE_INDEX
from lit_align.model.sharding import decoder_of


class SharedPrompts(NamedTuple):
    """A padded batch of ``G`` rows per prompt, split into its prompts and its responses.

    ``prompt_ids``/``prompt_mask``: ``[B, P]`` the prompts (right-padded with 0); ``response_ids``,
    ``response_mask``, ``response_labels``, ``response_positions``: ``[G B, C]`` each row's tokens
    after its prompt (right-padded), their labels (``-100`` where the row's labels ignore them) and
    position ids (continuing the prompt's); ``prompt_lengths``: ``[B]``."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    prompt_lengths: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    response_labels: torch.Tensor
    response_positions: torch.Tensor

    @property
    def groups(self) -> int:
        return self.response_ids.shape[0] // self.prompt_ids.shape[0]


def split_shared_prompts(batch: dict[str, torch.Tensor], groups: int = 2) -> SharedPrompts:
    """The prompts and responses of a right-padded batch whose rows ``i, i + B, ..., i + (G-1) B``
    share a prompt (:class:`lit_align.data.collate.PairCollator`: G = 2). A row's prompt is its
    tokens before its first label; ValueError when the rows of a group do not share one, or a
    prompt is empty (its last token predicts each response's first)."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"].bool(), batch["labels"]
    rows, width = ids.shape
    if rows % groups:
        raise ValueError(f"prefix sharing: {rows} rows are not {groups} rows per prompt")
    prompts = rows // groups
    scored = labels != IGNORE_INDEX
    starts = torch.where(scored.any(1), scored.int().argmax(1), mask.sum(1))  # first label, or the row's end
    lengths = starts[:prompts]
    if bool((lengths == 0).any()):
        raise ValueError("prefix sharing: a row has no prompt tokens before its first label")
    columns = torch.arange(width, device=ids.device)
    prompt_mask = columns[None, :] < lengths[:, None]
    for k in range(1, groups):
        other = slice(k * prompts, (k + 1) * prompts)
        same = (starts[other] == lengths) & ((ids[other] == ids[:prompts]) | ~prompt_mask).all(1)
        if not bool(same.all()):
            raise ValueError(f"prefix sharing: rows {k * prompts}.. do not repeat the prompts of rows 0..{prompts - 1}")
    prompt_width = int(lengths.max())
    ends = mask.sum(1)
    response_width = max(1, int((ends - starts).max()))
    offsets = torch.arange(response_width, device=ids.device)
    source = (starts[:, None] + offsets[None, :]).clamp(max=width - 1)
    inside = offsets[None, :] < (ends - starts)[:, None]
    return SharedPrompts(
        prompt_ids=torch.where(prompt_mask, ids[:prompts], torch.zeros_like(ids[:prompts]))[:, :prompt_width],
        prompt_mask=prompt_mask[:, :prompt_width].long(),
        prompt_lengths=lengths,
        response_ids=torch.where(inside, ids.gather(1, source), torch.zeros_like(source)),
        response_mask=inside.long(),
        response_labels=torch.where(inside, labels.gather(1, source), torch.full_like(source, IGNORE_INDEX)),
        response_positions=starts[:, None] + offsets[None, :],
    )


def shared_prompt_hidden_states(model: nn.Module, shared: SharedPrompts) -> torch.Tensor:
    """``[G B, C, H]`` the hidden states that predict each response token of ``shared`` (the last
    prompt token's for the first, the previous response token's for the rest), from one decoder
    pass over the prompts and one over the responses attending to the prompts' key/value cache."""
    decoder = decoder_of(model)
    prompt_out = decoder(input_ids=shared.prompt_ids, attention_mask=shared.prompt_mask, use_cache=True)
    cache_name = _cache_argument(decoder)
    cache = getattr(prompt_out, cache_name)
    for layer in cache.layers:
        if getattr(layer, "is_sliding", False) or not hasattr(layer, "keys"):
            raise ValueError(
                f"prefix sharing: {type(layer).__name__} cache layers (sliding window or recurrent state) cannot be "
                "shared between responses"
            )
        # each response row attends to its own copy of its prompt's keys and values (repeat copies them;
        # the gradients of the copies sum back into the one prompt pass)
        layer.keys = layer.keys.repeat(shared.groups, 1, 1, 1)
        layer.values = layer.values.repeat(shared.groups, 1, 1, 1)
    response_out = decoder(
        input_ids=shared.response_ids,
        attention_mask=torch.cat([shared.prompt_mask.repeat(shared.groups, 1), shared.response_mask], 1),
        position_ids=shared.response_positions,
        use_cache=True,
        **{cache_name: cache},
    )
    rows = torch.arange(shared.prompt_ids.shape[0], device=shared.prompt_ids.device)
    last_prompt = prompt_out.last_hidden_state[rows, shared.prompt_lengths - 1]
    first = last_prompt.repeat(shared.groups, 1)[:, None, :]
    return torch.cat([first, response_out.last_hidden_state[:, :-1]], 1)


def _cache_argument(decoder: nn.Module) -> str:
    """The name a decoder's forward takes its KV cache by (and its output returns it by):
    ``cache`` from transformers 5.2x, ``past_key_values`` before."""
    forward = getattr(decoder, "module", decoder).forward  # an FSDP wrapper's forward takes **kwargs
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
