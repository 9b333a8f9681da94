"""What an exported folder says about itself: ``README.md`` (a model card) and ``config.yaml``.

Every export (``lit-align export``, :class:`lit_align.callbacks.ExportHF`) writes, next to the
weights, the run's resolved configuration as ``config.yaml`` (LightningCLI's file of the run when
there is one: ``lit-align fit --config <export>/config.yaml`` trains the same run again; else
the method's and data module's settings rebuilt from the module) and a model card naming the base
model, the method and its paper, the data, LoRA, the final held-out metrics and the versions of
the libraries that trained it. The card's front matter is the Hugging Face hub's (``base_model``,
``library_name``, ``tags``).
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_FILE = "config.yaml"
CARD_FILE = "README.md"
METRICS_KEY = "lit_align_metrics"
"""Where a checkpoint keeps the metrics Lightning held when it was saved (for the card of an export
made later from it)."""
VERSIONED = ("lit-align", "torch", "transformers", "lightning", "peft", "datasets")


@dataclass
class RunRecord:
    """What is known of the run that trained a module: its configuration and final metrics."""

    config: dict[str, Any]
    """The resolved configuration (``model``, ``data``, ``trainer``, ... as in LightningCLI's file)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Final metric values by name (``val/rewards/accuracies``...)."""
    step: int | None = None
    """Optimizer steps taken."""


def plain(value: Any) -> Any:
    """``value`` as YAML-safe data: dataclasses, namespaces and mappings as dicts, tuples as lists,
    paths as strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {item.name: plain(getattr(value, item.name)) for item in dataclasses.fields(value)}
    if hasattr(value, "as_dict") and callable(value.as_dict):  # jsonargparse Namespace
        return plain(value.as_dict())
    if isinstance(value, Mapping):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def settings_config(module_class: type, hparams: Mapping[str, Any], data_hparams: Mapping[str, Any] | None) -> dict:
    """The ``model``/``data`` part of a configuration from saved hyper-parameters (LightningCLI's
    ``_class_path`` and other private entries dropped)."""
    config = {
        "model": {
            "class_path": f"{module_class.__module__}.{module_class.__qualname__}",
            "init_args": {key: plain(value) for key, value in hparams.items() if not key.startswith("_")},
        }
    }
    if data_hparams:
        config["data"] = {
            "class_path": data_hparams.get("_class_path", "lit_align.data.PreferenceDataModule"),
            "init_args": {key: plain(value) for key, value in data_hparams.items() if not key.startswith("_")},
        }
    return config


def record_from_trainer(trainer, module) -> RunRecord:
    """The run of a trainer that just fitted ``module``: LightningCLI's configuration when the CLI
    built it (its ``SaveConfigCallback``), else the settings of the module and data module."""
    from lightning.pytorch.cli import SaveConfigCallback

    saver = next((cb for cb in trainer.callbacks if isinstance(cb, SaveConfigCallback)), None)
    if saver is not None:
        config = yaml.safe_load(saver.parser.dump(saver.config, skip_none=False))
    else:
        datamodule = trainer.datamodule
        config = settings_config(type(module), module.hparams, getattr(datamodule, "hparams", None))
    return RunRecord(config, final_metrics(trainer.callback_metrics), trainer.global_step)


def record_from_checkpoint(checkpoint: Mapping[str, Any], module, ckpt_path: str | os.PathLike) -> RunRecord:
    """The run that wrote a checkpoint: the ``config.yaml`` LightningCLI wrote in its run folder
    (``<run>/checkpoints/<file>.ckpt`` -> ``<run>/config.yaml``) when it is there, else the
    checkpoint's hyper-parameters; the metrics it recorded when saved."""
    run_config = Path(ckpt_path).resolve().parent.parent / CONFIG_FILE
    if run_config.is_file():
        config = yaml.safe_load(run_config.read_text(encoding="utf-8"))
    else:
        config = settings_config(
            type(module), checkpoint.get("hyper_parameters") or {}, checkpoint.get("datamodule_hyper_parameters")
        )
    return RunRecord(config, dict(checkpoint.get(METRICS_KEY) or {}), checkpoint.get("global_step"))


def final_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The one-number metrics of ``metrics`` (Lightning's ``callback_metrics``) as floats."""
    values = {}
    for key, value in metrics.items():
        try:
            values[key] = float(value)
        except (TypeError, ValueError, RuntimeError):  # a tensor of several values
            continue
    return dict(sorted(values.items()))


def versions() -> dict[str, str]:
    found = {}
    for name in VERSIONED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def run_files(module, run: RunRecord, merged_lora: bool) -> dict[str, str]:
    """``config.yaml`` and ``README.md`` for the export of ``module`` trained by ``run``."""
    return {
        CONFIG_FILE: yaml.safe_dump(run.config, sort_keys=False, allow_unicode=True),
        CARD_FILE: model_card(module, run, merged_lora),
    }


def model_card(module, run: RunRecord, merged_lora: bool) -> str:
    """The model card (Markdown with the hub's YAML front matter)."""
    settings = module.model_settings
    method = type(module)
    summary = (method.__doc__ or method.__name__).strip().splitlines()[0]
    data = (run.config.get("data") or {}).get("init_args") or {}
    lora = settings.lora
    if lora is None:
        weights = "full fine-tuning"
    else:
        kind = "merged into the base weights" if merged_lora or not module.exports_lora_adapter else "adapter only"
        weights = f"LoRA r={lora.r}, alpha={lora.alpha}, targets {lora.target_modules}: {kind}"
    front = {"library_name": "transformers", "tags": ["lit-align", method.__name__.lower(), "alignment"]}
    if settings.name_or_path != "tiny":
        front["base_model"] = settings.name_or_path
    rows = [
        ("base model", f"`{settings.name_or_path}`"),
        ("method", f"`{method.__module__}.{method.__qualname__}`: {summary}"),
        ("training data", _source(data.get("train"), data.get("split"))),
        ("held-out data", _held_out(data)),
        ("weights", weights),
        ("steps", str(run.step) if run.step is not None else "unknown"),
        ("exported", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
    ]
    held_out = {key: value for key, value in run.metrics.items() if key.startswith("val/")}
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {method.__name__} of {settings.name_or_path}",
        "",
        f"Trained with lit-align {versions()['lit-align']}.",
        "",
        "| | |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in rows),
        "",
        "## Held-out metrics at the end of training",
        "",
    ]
    if held_out:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| `{key}` | {_number(value)} |" for key, value in held_out.items()]
    else:
        lines.append("None: the run ended without a validation after its last training step.")
    lines += [
        "",
        "## Use",
        "",
        "```bash",
        'lit-align generate --model <this folder> --prompt "..."',
        "```",
        "",
        "or load it with transformers (`AutoModelForCausalLM.from_pretrained`; a LoRA adapter folder with peft's "
        "`AutoPeftModelForCausalLM`).",
        "",
        "## Configuration",
        "",
        f"The resolved configuration of the run is in `{CONFIG_FILE}` next to the weights.",
        "",
        "## Versions",
        "",
        "| package | version |",
        "|---|---|",
        *(f"| {name} | {version} |" for name, version in versions().items()),
        "",
    ]
    return "\n".join(lines)


def _source(source: Any, split: Any) -> str:
    if source in (None, "builtin"):
        return "the built-in word-rules task" if source == "builtin" else "unknown"
    return f"`{source}`" + (f" (split `{split}`)" if split and split != "train" else "")


def _held_out(data: dict) -> str:
    if data.get("val"):
        return _source(data["val"], data.get("val_split"))
    if data.get("train") in (None, "builtin"):
        return "the built-in task's held-out split" if data.get("train") == "builtin" else "unknown"
    fraction, seed = data.get("val_fraction", 0.05), data.get("seed", 0)
    return f"a {fraction:g} fraction of the training data, split off with seed {seed}"


def _number(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else str(value)
