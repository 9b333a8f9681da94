"""Export a trained policy as a Hugging Face folder (full, adapter-only, or LoRA merged).

Every export is written to a temporary folder next to the target and renamed into place, so a
killed export never leaves a half-written folder and the previous export stays intact.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from lit_align.errors import SettingError
from lit_align.model.backbone import Backbone
from lit_align.model.reference import BASE_MOVING_INITS


def export_policy(
    backbone: Backbone,
    output_dir: str | os.PathLike,
    merge_lora: bool = False,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Write the policy and tokenizer to ``output_dir`` (and ``extra_files``: name -> text, e.g.
    the model card).

    Without LoRA the full model is saved (``AutoModelForCausalLM.from_pretrained`` loads it).
    With LoRA, ``merge_lora=False`` saves only the adapter (``PeftModel.from_pretrained(base,
    output_dir)``), ``merge_lora=True`` folds the adapter into a copy of the base weights and saves
    a plain model.
    """
    lora = backbone.settings.lora
    if backbone.is_peft and not merge_lora and lora.init_lora_weights in BASE_MOVING_INITS:
        raise SettingError(
            None,
            "merge_lora",
            f"an adapter-only export of a model.lora.init_lora_weights={lora.init_lora_weights} policy would load onto "
            f"{backbone.settings.name_or_path!r}, but its adapters were fitted to base weights that initialisation "
            "rewrote: export with merge_lora true",
        )
    with staged_folder(output_dir) as staging:
        model = backbone.policy
        if backbone.is_peft and merge_lora:
            model = copy.deepcopy(model).merge_and_unload()
        elif backbone.is_peft:
            model.peft_config["default"].base_model_name_or_path = backbone.settings.name_or_path
        with saved_as_floats(model):
            model.save_pretrained(staging)
        backbone.tokenizer.save_pretrained(staging)
        write_files(staging, extra_files)
    return Path(output_dir)


@contextmanager
def saved_as_floats(model) -> Iterator[None]:
    """Let ``save_pretrained`` write a model read from a GGUF file. Transformers dequantizes GGUF
    weights to floats when it loads them but still marks the model as quantized ("gguf") and then
    refuses to save it as "not serializable"; the weights are plain tensors, so for the save the
    marks are lifted (and put back after, the model may keep training)."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if str(getattr(method, "value", method)) != "gguf":
        yield
        return
    marks = {"hf_quantizer": quantizer, "is_quantized": getattr(model, "is_quantized", False)}
    config_mark = model.config.__dict__.pop("quantization_config", None)
    for name in marks:
        setattr(model, name, None if name == "hf_quantizer" else False)
    try:
        yield
    finally:
        for name, value in marks.items():
            setattr(model, name, value)
        if config_mark is not None:
            model.config.quantization_config = config_mark


def write_files(folder: Path, files: Mapping[str, str] | None) -> None:
    """Write each ``name -> text`` of ``files`` into ``folder`` (UTF-8)."""
    for name, text in (files or {}).items():
        (folder / name).write_text(text, encoding="utf-8")


@contextmanager
def staged_folder(output_dir: str | os.PathLike) -> Iterator[Path]:
    """A fresh temporary folder next to ``output_dir`` to write into; when the block ends without
    an error it replaces ``output_dir``, otherwise it is deleted and ``output_dir`` is untouched."""
    target = Path(output_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        _replace(staging, target)
    except OSError as error:  # e.g. disk full: say which export failed and that the old one is intact
        raise OSError(
            error.errno, f"export to {target} failed, its previous contents are unchanged: {error.strerror or error}"
        ) from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _replace(staging: Path, target: Path) -> None:
    """Move ``staging`` to ``target``; an existing ``target`` is swapped out, then deleted."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
