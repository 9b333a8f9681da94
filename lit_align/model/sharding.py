"""Reading a model's parts the same way whether FSDP shards it or not: its decoder stack and its
LM head's weights (gathered from their shards for the duration of a read)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from lit_align.model.logprobs import chunked_label_logps
from lit_align.runtime.strategies import decoder_layer_classes


def base_model_of(model: nn.Module) -> nn.Module:
    """The causal LM inside a peft wrapper (``get_base_model()``), or ``model`` itself when it is
    not wrapped."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder stack (embeddings, layers, final norm) of a plain or peft-wrapped causal LM,
    as its parent holds it: under FSDP that is the wrapper that gathers the stack's shards
    (``get_decoder()`` alone would reach past it to the bare module)."""
    base = base_model_of(model)
    decoder = base.get_decoder()
    for child in base.children():
        if child is not decoder and getattr(child, "module", None) is decoder:
            return child
    return decoder


@contextlib.contextmanager
def unsharded(model: nn.Module) -> Iterator[None]:
    """Inside the block, every FSDP2 unit of ``model`` holds its full parameters (all-gathered: a
    collective every process enters, in the same order), so code that reads or edits them as plain
    tensors, a LoRA merge included, sees the whole weights; after it each unit is sharded again.
    Edits are not written back to the shards (the gathered tensors are freed). No-op for a model
    FSDP2 does not shard."""
    from torch.distributed.fsdp import FSDPModule

    units = [module for module in model.modules() if isinstance(module, FSDPModule)]
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()


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


def fully_shard_on_policy(module: nn.Module, mesh) -> None:
    """Shard an on-policy module with FSDP2 over ``mesh``. Each model (the policy, a reference
    copy) gets a unit per decoder layer inside a unit for its decoder stack (embeddings, final
    norm), and a unit for its LM head; any other trainable module (a value head) is a unit of its
    own. Each of those is called as a module (its forward gathers and frees its shards; backward
    reduce-scatters its gradients), but the chunked log-probs read the LM head's weight directly:
    they run as the head's registered forward method ``fsdp_label_logps`` (so the same hooks run).

    A head tied to its input embeddings (SmolLM2, Qwen2.5's small models) is one weight that two
    units would each shard: there the whole causal LM is the unit around the layers' units
    (embeddings = head, final norm), and the decoder stack, the log-probs and the head's logits run
    as its registered forward methods ``fsdp_hidden_states``, ``fsdp_label_logps`` and
    ``fsdp_head_logits`` (:func:`hidden_states_of`, :func:`sharded_label_logps`,
    :func:`head_logits_of`); ``generate`` calls the causal LM itself, whose forward gathers it."""
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    if any(isinstance(m, FSDPModule) for m in module.modules()):
        return  # Lightning calls configure_model again for each later stage (validate after fit)

    def label_logps(unit, hidden, labels, chunk_size):
        head = head_of(unit)
        return chunked_label_logps(hidden, head.weight, labels, head.bias, chunk_size=chunk_size)

    def decoder_hidden_states(unit, **inputs):
        return unit.get_decoder()(**inputs).last_hidden_state

    def head_logits(unit, hidden):
        return head_of(unit)(hidden)

    backbone = module.backbone
    models = [backbone.policy] + ([backbone.reference] if getattr(backbone, "reference", None) is not None else [])
    covered: set[int] = set()
    for model in models:
        base = base_model_of(model)
        head = head_of(base)
        layers = decoder_layer_classes(model)
        for layer in [m for m in model.modules() if isinstance(m, layers)]:
            fully_shard(layer, mesh=mesh)
        if head.weight is base.get_input_embeddings().weight:
            fully_shard(base, mesh=mesh)
            base.fsdp_hidden_states = decoder_hidden_states.__get__(base)
            base.fsdp_head_logits = head_logits.__get__(base)
            register_fsdp_forward_method(base, "fsdp_hidden_states")
            register_fsdp_forward_method(base, "fsdp_head_logits")
            logps_unit = base
        else:
            fully_shard(decoder_of(model), mesh=mesh)
            fully_shard(head, mesh=mesh)
            logps_unit = head
        logps_unit.fsdp_label_logps = label_logps.__get__(logps_unit)
        register_fsdp_forward_method(logps_unit, "fsdp_label_logps")
        covered.update(id(p) for p in model.parameters())
    for child in module.children():
        if child is not backbone and any(p.requires_grad and id(p) not in covered for p in child.parameters()):
            fully_shard(child, mesh=mesh)


def head_of(model: nn.Module) -> nn.Module:
    """The output embedding (LM head) of a plain or peft-wrapped causal LM, or the module itself
    when it has none (it is a head)."""
    base = base_model_of(model)
    return base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else base


def _logps_unit(model: nn.Module) -> nn.Module | None:
    base = base_model_of(model)
    for unit in (base, head_of(base)):
        if hasattr(unit, "fsdp_label_logps"):
            return unit
    return None


def sharded_label_logps(model: nn.Module):
    """``(hidden, labels, chunk_size) -> log-probs`` through the FSDP2 unit that holds ``model``'s LM
    head (its own, or the causal LM's when the head is tied), so the unit's hooks gather the
    weight; None when FSDP2 does not shard ``model`` (read the head's weights directly)."""
    unit = _logps_unit(model)
    return None if unit is None else unit.fsdp_label_logps


def hidden_states_of(model: nn.Module, inputs: dict) -> torch.Tensor:
    """The last hidden states of the decoder stack of ``model`` (plain or peft-wrapped) for the
    forward ``inputs``: through the causal LM's registered forward method when FSDP2 shards it
    as one unit (tied head), else by calling the stack (its own unit, if any, gathers it)."""
    base = base_model_of(model)
    if hasattr(base, "fsdp_hidden_states"):
        return base.fsdp_hidden_states(**inputs)
    return decoder_of(model)(**inputs).last_hidden_state


def head_logits_of(model: nn.Module):
    """``hidden -> logits`` of ``model``'s LM head (plain or peft-wrapped): the head called as a
    module (an FSDP2 unit of its own gathers itself), or through the causal LM's registered forward
    method when FSDP2 shards the causal LM as one unit (tied head)."""
    base = base_model_of(model)
    return base.fsdp_head_logits if hasattr(base, "fsdp_head_logits") else head_of(base)
