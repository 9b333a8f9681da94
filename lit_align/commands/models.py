"""What the commands load: a policy from any model source, and a method module with its run's
settings from a checkpoint or an exported folder.

Model sources (``--model``):

* a lit-align checkpoint (a ``.ckpt`` file or a sharded checkpoint folder): the module it
  recorded, rebuilt by :func:`lit_align.runtime.checkpoints.load_module_from_checkpoint`; its
  policy and tokenizer (with any ``model.chat_template`` override);
* an exported Hugging Face folder: a full model, or an adapter-only LoRA export
  (``adapter_config.json``), merged onto the base model it names;
* anything ``model.name_or_path`` takes: a hub id, a ``.gguf`` file, ``package://DIST/FILE``,
  ``tiny`` (loaded by lit-align's own model loading, with no reference).

A run's settings: a checkpoint holds its method's and data module's hyper-parameters; an export
folder holds the run's resolved configuration as ``config.yaml`` (``model``/``data`` entries with
``class_path`` and ``init_args``), as does a checkpoint's run folder
(``.../version_N/config.yaml`` beside ``.../version_N/checkpoints/``), which also gives the
rewards of on-policy runs (rewards are never stored in checkpoints).
"""

from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lit_align.commands import CommandError
from lit_align.errors import CheckpointError
from lit_align.methods.alignment import AlignmentModule
from lit_align.model.backbone import Backbone
from lit_align.model.loading import ModelLoadError
from lit_align.runtime.checkpoints import load_module_from_checkpoint, read_checkpoint
from lit_align.settings import ModelSettings, as_settings

CONFIG_FILE = "config.yaml"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class LoadedPolicy:
    """A causal LM to generate with (in eval mode: no dropout) and its tokenizer."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase

    def __post_init__(self) -> None:
        self.model.eval()


@dataclass
class RunConfig:
    """A run's method and data settings, each ``{"class_path": ..., "init_args": {...}}``."""

    model: dict[str, Any]
    data: dict[str, Any] | None
    source: str
    """Where they were read (for errors)."""

    def method_class(self) -> type:
        return import_class(self.model["class_path"], f"model.class_path of {self.source}")

    def reward_spec(self) -> dict[str, Any] | None:
        """The run's held-out reward (``eval_reward``, else ``reward``) as configured, or None."""
        args = self.model.get("init_args") or {}
        return args.get("eval_reward") or args.get("reward")

    def model_settings(self) -> dict[str, Any]:
        return dict((self.model.get("init_args") or {}).get("model") or {})


def is_checkpoint(source: str) -> bool:
    """Whether ``source`` names a lit-align checkpoint: a ``.ckpt`` file or a sharded folder."""
    path = Path(source).expanduser()
    return path.suffix == ".ckpt" or (path.is_dir() and (path / "meta.pt").is_file())


def load_policy(source: str) -> LoadedPolicy:
    """The policy and tokenizer of ``source`` (any model source, see the module's docstring)."""
    if is_checkpoint(source):
        module = load_module_from_checkpoint(source)
        return LoadedPolicy(module.backbone.policy, module.tokenizer)
    if (Path(source).expanduser() / ADAPTER_CONFIG).is_file():
        return _merged_adapter(source)
    backbone = Backbone(ModelSettings(name_or_path=source, reference="none"), needs_reference=False)
    return LoadedPolicy(backbone.policy, backbone.tokenizer)


def _merged_adapter(folder: str) -> LoadedPolicy:
    """An adapter-only export merged onto its base model: the base as the folder's ``config.yaml``
    configures it (LoRA removed), else the ``base_model_name_or_path`` its adapter names; the
    tokenizer is the folder's own."""
    import json

    from peft import PeftModel

    config = read_run_config_file(Path(folder) / CONFIG_FILE)
    if config is not None:
        settings = {**config.model_settings(), "lora": None, "quantization": None, "reference": "none"}
    else:
        base = json.loads((Path(folder) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        if not base:
            raise ModelLoadError(f"adapter folder {folder!r} names no base model (base_model_name_or_path)")
        settings = {"name_or_path": base, "reference": "none"}
    settings["tokenizer"] = str(folder)
    model_settings = _model_settings(settings)
    backbone = Backbone(model_settings, needs_reference=False)
    merged = PeftModel.from_pretrained(backbone.policy, folder).merge_and_unload()
    return LoadedPolicy(merged, backbone.tokenizer)


def _model_settings(values: dict[str, Any]) -> ModelSettings:
    return as_settings(values, ModelSettings)


# ---- a run's settings --------------------------------------------------------------------------------
def find_run_config(source: str) -> RunConfig | None:
    """The settings of the run that wrote ``source``: a checkpoint's hyper-parameters (rewards
    from its run folder's ``config.yaml`` when there is one), an export folder's ``config.yaml``;
    None when there are none (a plain model)."""
    if is_checkpoint(source):
        checkpoint = read_checkpoint(source, weights_only=not Path(source).is_dir())
        run_folder = Path(source).expanduser().resolve().parent.parent  # .../version_N/checkpoints/x.ckpt
        yaml_config = read_run_config_file(run_folder / CONFIG_FILE)
        model = _spec(checkpoint.get("hyper_parameters") or {}, checkpoint.get("lit_align_class", ""))
        data = checkpoint.get("datamodule_hyper_parameters")
        data = _spec(data) if data else yaml_config.data if yaml_config else None
        if yaml_config is not None:  # rewards are not hyper-parameters: they come from the config
            for name in ("reward", "eval_reward"):
                value = (yaml_config.model.get("init_args") or {}).get(name)
                if value is not None:
                    model["init_args"][name] = value
        return RunConfig(model, data, source)
    return read_run_config_file(Path(source).expanduser() / CONFIG_FILE)


def read_run_config_file(path: Path) -> RunConfig | None:
    """The ``model`` and ``data`` entries of a LightningCLI ``config.yaml``; None without the file."""
    if not path.is_file():
        return None
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise CommandError(f"{str(path)!r} cannot be read as a run's config.yaml ({error})") from None
    model = values.get("model") if isinstance(values, dict) else None
    if not isinstance(model, dict) or "class_path" not in model:
        raise CommandError(f"{str(path)!r} has no model.class_path: it is not the config.yaml of a lit-align run")
    data = values.get("data") if isinstance(values.get("data"), dict) else None
    return RunConfig(model, data, str(path))


def _spec(hyper_parameters: dict[str, Any], recorded: str = "") -> dict[str, Any]:
    """``{"class_path", "init_args"}`` of hyper-parameters saved by LightningCLI (``_class_path``
    added), or of the class a checkpoint recorded (``module:QualName``)."""
    class_path = hyper_parameters.get("_class_path") or recorded.replace(":", ".")
    init_args = {key: value for key, value in hyper_parameters.items() if not key.startswith("_")}
    return {"class_path": class_path, "init_args": copy.deepcopy(init_args)}


def import_class(class_path: str, what: str) -> Any:
    """The object a dotted ``class_path`` names, or a :class:`CommandError` naming ``what``."""
    module_name, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise CommandError(
            f"{what}: {class_path!r} cannot be imported ({error})",
            hint="give a dotted path such as lit_align.rewards.WordRulesReward, importable from this folder",
        ) from None


def instantiate(spec: dict[str, Any], base: type) -> Any:
    """An instance of ``spec`` (``{"class_path", "init_args"}``, a subclass of ``base``), its
    settings parsed and checked as the CLI parses the config (nested ``class_path`` entries too)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(base, "spec", required=True)
    config = parser.parse_object({"spec": spec})
    return parser.instantiate_classes(config).spec


# ---- a method module for evaluation -----------------------------------------------------------------
def load_method(source: str, config: RunConfig):
    """The method module of a checkpoint or an export, ready to validate.

    A checkpoint is loaded as ``lit-align validate --ckpt_path`` loads it, unless its reference
    was ``cached`` (no reference weights in it): then the module is built from its settings with
    ``model.reference: copy`` of the freshly built base model, and the checkpoint's policy weights
    are loaded. An export is built from its ``config.yaml`` with the base model as configured
    (``model.lora`` removed; ``model.reference: copy`` for a method that uses a reference), so
    the reference is the base model as in training, and the export's weights replace the policy's
    (an adapter-only export merged onto the base first)."""
    settings = config.model_settings()
    if is_checkpoint(source) and settings.get("reference") != "cached":
        return load_module_from_checkpoint(source)
    cls = config.method_class()
    overrides = {"reference": "copy"} if cls.needs_reference else {}
    if not is_checkpoint(source):
        overrides.update(lora=None, quantization=None)
    spec = copy.deepcopy(config.model)
    args = spec.setdefault("init_args", {})
    for name in getattr(cls, "hparams_ignore", ()):  # rewards: the commands score with their own
        args.pop(name, None)
    args["model"] = {**settings, **overrides}
    module = instantiate(spec, AlignmentModule)
    if is_checkpoint(source):
        _load_checkpoint_policy(module, source)
    else:
        _load_export_policy(module, source)
    module._policy_is_initial = False
    return module


def _load_checkpoint_policy(module, source: str) -> None:
    """The checkpoint's policy weights into ``module`` (everything else keeps its fresh values)."""
    prefix = "backbone.policy."
    state = read_checkpoint(source, weights_only=not Path(source).is_dir())["state_dict"]
    weights = {key: value for key, value in state.items() if key.startswith(prefix)}
    result = module.load_state_dict(weights, strict=False)
    missing = [key for key in result.missing_keys if key.startswith(prefix)]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"the policy weights of {source!r} do not fit the model its settings build "
            f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})"
        )


def _load_export_policy(module, folder: str) -> None:
    """The export's weights as ``module``'s policy: an adapter merged onto the policy (the base
    model), or a full model's state dict loaded into it."""
    path = Path(folder).expanduser()
    if (path / ADAPTER_CONFIG).is_file():
        from peft import PeftModel

        module.backbone.policy = PeftModel.from_pretrained(module.backbone.policy, str(path)).merge_and_unload()
        return
    exported = load_policy(str(path)).model
    try:
        module.backbone.policy.load_state_dict(exported.state_dict())
    except RuntimeError as error:
        detail = (str(error).strip().splitlines() or [""])[0]
        raise ModelLoadError(
            f"the weights of {folder!r} do not fit the model its config.yaml builds ({detail})"
        ) from None
