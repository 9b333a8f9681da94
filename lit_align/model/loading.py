"""Loading a model from its settings: the tokenizer, the causal LM (hub id, local folder, GGUF
file or the built-in tiny model; optionally 4/8-bit quantised) and its LoRA adapters, with every
library refusal turned into one :class:`ModelLoadError` naming the model and the setting."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import jinja2
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lit_align.errors import LitAlignError, SettingError
from lit_align.model.tiny import build_tiny_tokenizer, tiny_llama_config
from lit_align.settings import ModelSettings

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "uint8": torch.uint8}


class ModelLoadError(LitAlignError, ValueError):
    """The configured model or tokenizer cannot be loaded; the message says which and why."""


@contextlib.contextmanager
def model_settings_named(settings: ModelSettings, part: str = "model") -> Iterator[None]:
    """Errors transformers or peft raise while building the model from the settings (an attention
    backend that is not installed, a LoRA target that does not exist, a shape they refuse) as one
    :class:`ModelLoadError` naming the model and the settings part, not a library traceback."""
    try:
        yield
    except (LitAlignError, MemoryError):
        raise
    except (ValueError, ImportError, TypeError, KeyError, RuntimeError) as error:
        detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ModelLoadError(
            f"cannot build model {settings.name_or_path!r} with these {part} settings: {type(error).__name__}: {detail}"
        ) from None


def resolve_model_path(settings: ModelSettings) -> tuple[str, str | None]:
    """(folder or hub id, gguf file name or None) for ``settings.name_or_path``."""
    name, gguf = settings.name_or_path, settings.gguf_file
    if name.startswith("package://"):
        dist, _, rel = name[len("package://") :].partition("/")
        spec = importlib.util.find_spec(dist)  # locates the package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(
                f"model.name_or_path={settings.name_or_path!r}: Python package {dist!r} is not installed"
            )
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
    writer = config_writing(name) if not path.exists() else None
    if writer is not None:
        error = ModelLoadError(f"model.name_or_path: {name!r} does not exist yet: {writer} writes it")
        error.hint = f"run `lit-align fit --config {writer}` first"
        raise error
    return name, gguf


def config_writing(folder: str) -> str | None:
    """The config under ``./configs`` whose run exports to ``folder`` (``output_dir: <folder>``),
    if any: such a folder is a previous stage's output, not a hub id, and is refused at once with
    the command that writes it (rather than after the hub's retries, a minute offline)."""
    configs = Path("configs")
    if not configs.is_dir():
        return None
    pattern = re.compile(rf"\boutput_dir:\s*['\"]?{re.escape(folder.rstrip('/'))}/?['\"]?\s*[,}}\n]")
    for config in sorted(configs.rglob("*.yaml")):
        try:
            if pattern.search(config.read_text(encoding="utf-8") + "\n"):
                return config.as_posix()
        except (OSError, UnicodeDecodeError):
            continue
    return None


def _not_local(source: str) -> str:
    """Why a load may have failed: a relative path such as ``outputs/sft`` that does not exist is
    taken for a hub id (only ``./``, ``/`` or ``~`` paths are known to be local)."""
    return "" if Path(source).expanduser().exists() else f"no local folder {source!r} exists, and as a hub id: "


def load_tokenizer(settings: ModelSettings) -> PreTrainedTokenizerBase:
    """The tokenizer of ``settings`` (with ``chat_template`` in place of its own when set), padding
    on the right with a pad token (EOS when it has none)."""
    if settings.name_or_path == "tiny" and settings.tokenizer is None:
        tokenizer = build_tiny_tokenizer()
        _set_chat_template(tokenizer, settings)
        return tokenizer
    if settings.tokenizer is not None:
        source, gguf = settings.tokenizer, None
    else:
        source, gguf = resolve_model_path(settings)
    revision = {"revision": settings.revision} if settings.revision and settings.tokenizer is None else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, gguf_file=gguf, trust_remote_code=settings.trust_remote_code, **revision
        )
    except Exception as error:
        raise ModelLoadError(f"cannot load tokenizer from {source!r}: {_not_local(source)}{error}") from None
    _set_chat_template(tokenizer, settings)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ModelLoadError(f"tokenizer {source!r} has neither a pad nor an eos token; set one")
        tokenizer.pad_token = tokenizer.eos_token
        log.info("tokenizer has no pad token; using eos %r for padding (padding is masked out)", tokenizer.eos_token)
    tokenizer.padding_side = "right"
    return tokenizer


def read_chat_template(value: str) -> str:
    """The template ``model.chat_template`` gives: the text itself when it holds Jinja tags
    (``{{`` or ``{%``), else the contents of the file it names."""
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise ModelLoadError(
            f"model.chat_template={value!r} is neither a Jinja template (no '{{{{' or '{{%' in it) nor an existing file"
        )
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ModelLoadError(f"model.chat_template: cannot read {value!r}: {error}") from None


def _set_chat_template(tokenizer: PreTrainedTokenizerBase, settings: ModelSettings) -> None:
    """Replace the tokenizer's chat template with ``settings.chat_template``, compiled first so a
    syntax error stops the run here, naming the setting and the line."""
    if settings.chat_template is None:
        return
    template = read_chat_template(settings.chat_template)
    try:  # transformers renders templates with the loop controls ({% break %}) on
        jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    except jinja2.TemplateSyntaxError as error:
        raise ModelLoadError(
            f"model.chat_template is not a valid Jinja template: line {error.lineno}: {error.message}"
        ) from None
    tokenizer.chat_template = template


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
        hidden_size=tiny.hidden_size,
        num_layers=tiny.num_layers,
        num_heads=tiny.num_heads,
        intermediate_size=tiny.intermediate_size,
        max_position_embeddings=tiny.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tiny.tie_word_embeddings,
    )
    config._attn_implementation = settings.attn_implementation or "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tiny.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def _from_pretrained(source, gguf, settings, dtype, quantization) -> PreTrainedModel:
    kwargs = {"dtype": dtype, "trust_remote_code": settings.trust_remote_code}
    if settings.revision:
        kwargs["revision"] = settings.revision
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
        raise SettingError(
            None,
            "model.quantization",
            "model.quantization (4-bit) needs model.lora: quantized base weights cannot be trained directly",
        )
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


def trained_module_names(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``weights`` named as in the plain model: for a module in LoRA's ``modules_to_save``, peft keeps
    the original (``X.original_module.*``) beside the trained copy (``X.modules_to_save.default.*``);
    the trained copy takes the plain name ``X.*`` and the original is left out."""
    return {
        re.sub(r"\.modules_to_save\.[^.]+\.", ".", name): value
        for name, value in weights.items()
        if ".original_module." not in name
    }


def add_lora(model: PreTrainedModel, settings: ModelSettings):
    from peft import LoraConfig, get_peft_model

    lora = settings.lora
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        modules_to_save=lora.modules_to_save,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        init_lora_weights=lora.init_lora_weights,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)
