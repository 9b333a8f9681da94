"""Reading a model's parts the same way whether FSDP shards it or not: its decoder stack and its
LM head's weights (gathered from their shards for the duration of a read)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder stack (embeddings, layers, final norm) of a plain or peft-wrapped causal LM,
    as its parent holds it: under FSDP that is the wrapper that gathers the stack's shards
    (``get_decoder()`` alone would reach past it to the bare module)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder()
    for child in base.children():
        if child is not decoder and getattr(child, "module", None) is decoder:
            return child
    return decoder


@contextlib.contextmanager
def gathered(module: nn.Module) -> Iterator[None]:
    """Inside the block, a module that FSDP wraps as a unit of its own (a frozen reference's LM
    head, see :mod:`lit_align.runtime.strategies`) has its full weights, for code that reads them directly
    instead of calling the module; anything else is left as it is. Only for reads without
    gradients: the gathered weights are freed when the block ends."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(module, FullyShardedDataParallel):
        with FullyShardedDataParallel.summon_full_params(module, recurse=False, writeback=False):
            yield
    else:
        yield


def head_parameters(module: nn.Module, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of an LM head for code that reads them directly. A head that FSDP shards as a
    unit of its own (a frozen reference's) gives copies of its gathered weights, in ``dtype`` when
    given (under FSDP mixed precision the hidden states are in the compute dtype, the gathered
    weights in full precision); any other head gives its own parameters, untouched."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if not isinstance(module, FullyShardedDataParallel):
        return module.weight, module.bias
    with gathered(module):
        weight, bias = module.weight.detach(), module.bias
        weight = weight.to(dtype, copy=True) if dtype is not None else weight.clone()
        if bias is not None:
            bias = bias.detach().to(dtype, copy=True) if dtype is not None else bias.detach().clone()
        return weight, bias
