"""The backbone every method shares: tokenizer, policy, reference, and log-probs from hidden states."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lit_align.errors import LitAlignError, SettingError
from lit_align.flops import flops_per_token
from lit_align.logprobs import (
    IGNORE_INDEX,
    chunked_label_logps,
    naive_label_logps,
    shift_labels,
)
from lit_align.packing import is_packed, response_mask, unpack_rows
from lit_align.reference import STRATEGIES
from lit_align.settings import ModelSettings
from lit_align.tiny import build_tiny_tokenizer, tiny_llama_config

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "uint8": torch.uint8}


class ModelLoadError(LitAlignError, ValueError):
    """The configured model or tokenizer cannot be loaded; the message says which and why."""


@dataclass
class SequenceLogps:
    """Log-probs of the response tokens of each row.

    Attributes:
        tokens: ``[B, T]`` per-token log-probs aligned with the labels (0 off the response).
        mask: ``[B, T]`` True on response tokens.
        sum: ``[B]`` summed log-prob of each response, log pi(y|x).
        count: ``[B]`` number of response tokens |y|.
    """

    tokens: torch.Tensor
    mask: torch.Tensor

    @property
    def sum(self) -> torch.Tensor:
        return self.tokens.sum(-1)

    @property
    def count(self) -> torch.Tensor:
        return self.mask.sum(-1)

    @property
    def mean(self) -> torch.Tensor:
        """Length-normalised log-prob, log pi(y|x) / |y|."""
        return self.sum / self.count.clamp(min=1)

    def split(self) -> tuple["SequenceLogps", "SequenceLogps"]:
        """(first half, second half) of the rows: chosen and rejected of a concatenated batch."""
        half = self.tokens.shape[0] // 2
        return SequenceLogps(self.tokens[:half], self.mask[:half]), SequenceLogps(self.tokens[half:], self.mask[half:])


class Backbone(nn.Module):
    """Policy (optionally LoRA / QLoRA), tokenizer and reference strategy for one method.

    Args:
        settings: what to load and how (see :class:`ModelSettings`).
        needs_reference: whether the method uses reference log-probs; ``reference="auto"``
            resolves to ``none`` when it does not, so reference-free methods never build one.
    """

    def __init__(self, settings: ModelSettings, needs_reference: bool):
        super().__init__()
        self.settings = settings
        self.strategy = STRATEGIES[_resolve_reference(settings, needs_reference)]()
        self.tokenizer = load_tokenizer(settings)
        with _model_settings_named(settings):
            model = load_causal_lm(settings, self.tokenizer)
        self.reference: PreTrainedModel | None = None
        if self.strategy.builds_copy:
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        if settings.lora is not None:
            with _model_settings_named(settings, "model.lora"):
                model = _add_lora(model, settings)
        if settings.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        self.policy = model
        self._flops = None

    @property
    def reference_strategy(self) -> str:
        """Name of the resolved reference strategy: copy, adapter, cached or none."""
        return self.strategy.name

    @property
    def is_peft(self) -> bool:
        return hasattr(self.policy, "disable_adapter")

    def train(self, mode: bool = True) -> "Backbone":
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()
        return self

    def logps(self, batch: dict[str, torch.Tensor], model: nn.Module | None = None, hidden: torch.Tensor | None = None) -> SequenceLogps:
        """Per-token log-probs of ``batch["labels"]`` under ``model`` (default: the policy).

        Padded batches pass their attention mask; packed batches (:mod:`lit_align.packing`) pass
        ``position_ids`` and no mask, and their values come back in the padded layout.
        ``hidden``: the batch's :meth:`hidden_states` under ``model`` when the caller already has
        them (a value head reads the same pass); only the LM head then runs.
        """
        model = model if model is not None else self.policy
        labels = shift_labels(batch["labels"])
        chunk = self.settings.logp_chunk_size
        if chunk is None and hidden is None:
            tokens = naive_label_logps(model(**_model_inputs(batch)).logits, labels)
        else:
            hidden = self.hidden_states(batch, model) if hidden is None else hidden
            chunk = chunk or hidden.shape[0] * hidden.shape[1]
            head = self.lm_head(model)
            # only response positions go through the LM head: prompt and padding rows are skipped
            scored = labels != IGNORE_INDEX
            weight, bias = head_parameters(head, hidden.dtype)
            values = chunked_label_logps(hidden[scored], weight, labels[scored], bias, chunk_size=chunk)
            tokens = torch.zeros(labels.shape, dtype=values.dtype, device=values.device).masked_scatter(scored, values)
        if is_packed(batch):
            tokens = unpack_rows(tokens, batch)
        return SequenceLogps(tokens, response_mask(batch))

    def hidden_states(self, batch: dict[str, torch.Tensor], model: nn.Module | None = None) -> torch.Tensor:
        """``[R, L, H]`` last decoder hidden states of ``batch`` under ``model`` (default: the policy),
        before the LM head, in the batch's own layout (packed rows stay packed).

        Padded batches pass their attention mask, packed batches their ``position_ids``; LoRA
        adapters take part unless the caller disabled them.
        """
        model = model if model is not None else self.policy
        return decoder_of(model)(**_model_inputs(batch)).last_hidden_state

    @staticmethod
    def lm_head(model: nn.Module) -> nn.Module:
        """The output embedding (LM head) of a plain or peft-wrapped causal LM."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        return base.get_output_embeddings()

    @torch.no_grad()
    def packing_isolates_sequences(self, device: torch.device | None = None, tolerance: float = 1e-4) -> tuple[bool, float]:
        """Whether packed sequences stay isolated under this model's attention implementation:
        log-probs of two short random sequences packed into one row vs each alone."""
        from lit_align.data.collate import PackedPairCollator, PairCollator

        generator = torch.Generator().manual_seed(0)
        vocab = min(self.policy.get_input_embeddings().num_embeddings, len(self.tokenizer))
        ids = torch.randint(0, vocab, (17,), generator=generator).tolist()
        examples = [{"prompt": ids[:4], "chosen": ids[4:9], "rejected": ids[9:17]}]
        was_training = self.training
        self.eval()
        try:
            padded = self.logps({k: v.to(device) for k, v in PairCollator(self.tokenizer.pad_token_id)(examples).items()})
            packed = self.logps({k: v.to(device) for k, v in PackedPairCollator(capacity=64)(examples).items()})
        finally:
            self.train(was_training)
        difference = float((padded.tokens - packed.tokens).abs().max())
        return difference <= tolerance, difference

    def step_flops(self, batch: dict[str, torch.Tensor], train: bool) -> int:
        """Analytic FLOPs of one step on ``batch``: policy forward (+ backward when training)
        plus a reference forward when the strategy runs one (see :mod:`lit_align.flops`)."""
        if self._flops is None:
            self._flops = flops_per_token(self.policy)
        rows, seq_len = batch["input_ids"].shape  # packed rows: attention runs over the whole row
        tokens = rows * seq_len
        head_tokens = None if self.settings.logp_chunk_size is None else int((shift_labels(batch["labels"]) != IGNORE_INDEX).sum())
        policy = self._flops.forward_backward if train else self._flops.forward
        total = policy(tokens, seq_len, head_tokens)
        if self.strategy.runs_forward:  # the reference has the policy's architecture
            total += self._flops.forward(tokens, seq_len, head_tokens)
        return total

    @torch.no_grad()
    def reference_logps(self, batch: dict[str, torch.Tensor]) -> SequenceLogps:
        """Reference log-probs under the configured strategy (no gradients)."""
        return self.strategy.logps(self, batch)


def _model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | bool]:
    """Forward inputs: the attention mask of a padded batch, the ``position_ids`` of a packed one."""
    inputs = {"input_ids": batch["input_ids"], "use_cache": False}
    if is_packed(batch):
        inputs["position_ids"] = batch["position_ids"]
    else:
        inputs["attention_mask"] = batch["attention_mask"]
    return inputs


@contextlib.contextmanager
def _model_settings_named(settings: ModelSettings, part: str = "model") -> Iterator[None]:
    """Errors transformers or peft raise while building the model from the settings (an attention
    backend that is not installed, a LoRA target that does not exist, a shape they refuse) as one
    :class:`ModelLoadError` naming the model and the settings part, not a library traceback."""
    try:
        yield
    except (LitAlignError, MemoryError):
        raise
    except (ValueError, ImportError, TypeError, KeyError, RuntimeError) as error:
        detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ModelLoadError(f"cannot build model {settings.name_or_path!r} with these {part} settings: {type(error).__name__}: {detail}") from None


def _resolve_reference(settings: ModelSettings, needs_reference: bool) -> str:
    strategy = settings.reference
    if not needs_reference:
        if strategy not in ("auto", "none"):
            log.info("reference=%s ignored: this method is reference-free", strategy)
        return "none"
    if strategy == "auto":
        return "adapter" if settings.lora is not None else "copy"
    if strategy == "none":
        raise SettingError(None, "model.reference", "model.reference=none, but this method needs a reference model; use copy, adapter or cached")
    if strategy == "adapter" and settings.lora is None:
        raise SettingError(None, "model.reference", "model.reference=adapter needs model.lora (the reference is the policy with its LoRA adapters disabled)")
    return strategy


def resolve_model_path(settings: ModelSettings) -> tuple[str, str | None]:
    """(folder or hub id, gguf file name or None) for ``settings.name_or_path``."""
    name, gguf = settings.name_or_path, settings.gguf_file
    if name.startswith("package://"):
        dist, _, rel = name[len("package://"):].partition("/")
        spec = importlib.util.find_spec(dist)  # locates the package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(f"model.name_or_path={settings.name_or_path!r}: Python package {dist!r} is not installed")
        name = str(Path(list(spec.submodule_search_locations)[0]) / rel)
        if not Path(name).exists():
            raise ModelLoadError(f"model.name_or_path={settings.name_or_path!r}: package {dist!r} has no file {rel!r}")
    path = Path(name).expanduser()
    if name.lower().endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"model.name_or_path: GGUF file {name!r} does not exist")
        return str(path.parent), path.name
    if name.startswith((".", "/", "~")) and not path.exists():
        raise ModelLoadError(f"model.name_or_path: local model folder {name!r} does not exist")
    return name, gguf


def _not_local(source: str) -> str:
    """Why a load may have failed: a relative path such as ``outputs/sft`` that does not exist is
    taken for a hub id (only ``./``, ``/`` or ``~`` paths are known to be local)."""
    return "" if Path(source).expanduser().exists() else f"no local folder {source!r} exists, and as a hub id: "


def load_tokenizer(settings: ModelSettings) -> PreTrainedTokenizerBase:
    if settings.name_or_path == "tiny" and settings.tokenizer is None:
        return build_tiny_tokenizer()
    if settings.tokenizer is not None:
        source, gguf = settings.tokenizer, None
    else:
        source, gguf = resolve_model_path(settings)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf, trust_remote_code=settings.trust_remote_code)
    except Exception as error:
        raise ModelLoadError(f"cannot load tokenizer from {source!r}: {_not_local(source)}{error}") from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ModelLoadError(f"tokenizer {source!r} has neither a pad nor an eos token; set one")
        tokenizer.pad_token = tokenizer.eos_token
        log.info("tokenizer has no pad token; using eos %r for padding (padding is masked out)", tokenizer.eos_token)
    tokenizer.padding_side = "right"
    return tokenizer


def load_causal_lm(settings: ModelSettings, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    dtype = DTYPES[settings.dtype]
    quantization = _bnb_config(settings)
    if settings.name_or_path == "tiny":
        model = _build_tiny(settings, tokenizer, dtype)
        if quantization is None:
            return model
        with tempfile.TemporaryDirectory() as folder:  # from_pretrained is the path that quantizes
            model.save_pretrained(folder)
            return _from_pretrained(folder, None, settings, dtype, quantization)
    source, gguf = resolve_model_path(settings)
    return _from_pretrained(source, gguf, settings, dtype, quantization)


def _build_tiny(settings: ModelSettings, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype) -> PreTrainedModel:
    tiny = settings.tiny
    config = tiny_llama_config(
        vocab_size=max(tiny.vocab_size or 0, len(tokenizer)),
        hidden_size=tiny.hidden_size, num_layers=tiny.num_layers, num_heads=tiny.num_heads,
        intermediate_size=tiny.intermediate_size, max_position_embeddings=tiny.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    config._attn_implementation = settings.attn_implementation or "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tiny.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def _from_pretrained(source, gguf, settings, dtype, quantization) -> PreTrainedModel:
    kwargs = {"dtype": dtype, "trust_remote_code": settings.trust_remote_code}
    if gguf:
        kwargs["gguf_file"] = gguf
    if settings.attn_implementation:
        kwargs["attn_implementation"] = settings.attn_implementation
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot load model {settings.name_or_path!r}: {_not_local(source)}{error}") from None
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=settings.gradient_checkpointing)
    return model


def _bnb_config(settings: ModelSettings):
    q = settings.quantization
    if q is None:
        return None
    if settings.lora is None:
        raise SettingError(None, "model.quantization", "model.quantization (4-bit) needs model.lora: quantized base weights cannot be trained directly")
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise ModelLoadError("model.quantization needs bitsandbytes: pip install 'lit-align[qlora]'") from None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=DTYPES[q.compute_dtype],
        bnb_4bit_quant_storage=DTYPES[q.quant_storage or "uint8"],
    )


def _add_lora(model: PreTrainedModel, settings: ModelSettings):
    from peft import LoraConfig, get_peft_model

    lora = settings.lora
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


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
    head, see :mod:`lit_align.strategies`) has its full weights, for code that reads them directly
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
