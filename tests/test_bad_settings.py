"""Settings out of their valid range stop at construction with one clear message (class 1); the CLI
shows that message first and alone, then a hint (class 2); errors lit-align raises on purpose end
the run without a traceback, other errors keep theirs (class 3)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest

import lit_align.callbacks as callbacks_package
import lit_align.data as data_package
import lit_align.methods as methods_package
from lit_align.cli import main
from lit_align.errors import SettingError
from lit_align.methods import DPO, GRPO, KTO, PPO, TRPO, OnlineDPO
from lit_align.online.kl_control import KLPenalty
from lit_align.online.reward_model import RewardModelReward
from lit_align.online.rewards import RewardFunction
from lit_align.online.rollout import GenerationSettings
from lit_align.settings import LoRA, ModelSettings, OptimizerSettings, Range, TinyModel, init_hints

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


# ---- hand-picked cases: the message names the class, the setting, the range and the value ---------
@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: DPO(beta=-0.1), "DPO: beta must be > 0, got -0.1"),
        (lambda: DPO(beta=0), "DPO: beta must be > 0, got 0"),  # zero: no gradient, trains silently
        (lambda: DPO(label_smoothing=0.5), "DPO: label_smoothing must be in [0, 0.5), got 0.5"),
        (lambda: DPO(beta=float("nan")), "DPO: beta must be > 0, got nan"),
        (lambda: DPO(beta="big"), "DPO: beta must be a number > 0, got 'big'"),
        (lambda: DPO(optimizer={"lr": -1e-3}), "DPO: optimizer.lr must be > 0, got -0.001"),
        (lambda: DPO(optimizer=OptimizerSettings(lr=0.0)), "DPO: optimizer.lr must be > 0, got 0.0"),
        (lambda: DPO(optimizer={"betas": (0.9, 1.0)}), "DPO: optimizer.betas[1] must be in [0, 1), got 1.0"),
        (lambda: DPO(optimizer={"warmup_ratio": 1.0}), "DPO: optimizer.warmup_ratio must be in [0, 1), got 1.0"),
        (lambda: DPO(optimizer={"weight_decay": -0.01}), "DPO: optimizer.weight_decay must be >= 0, got -0.01"),
        (lambda: DPO(model={"lora": {"r": 0}}), "DPO: model.lora.r must be >= 1, got 0"),
        (
            lambda: DPO(model=ModelSettings(lora=LoRA(dropout=1.0))),
            "DPO: model.lora.dropout must be in [0, 1), got 1.0",
        ),
        (
            lambda: DPO(model={"tiny": {"hidden_size": 2.5}}),
            "DPO: model.tiny.hidden_size must be a whole number >= 1, got 2.5",
        ),
        (
            lambda: DPO(model=ModelSettings(tiny=TinyModel(num_layers=0))),
            "DPO: model.tiny.num_layers must be >= 1, got 0",
        ),
        (lambda: DPO(model={"logp_chunk_size": 0}), "DPO: model.logp_chunk_size must be >= 1, got 0"),
        (lambda: KTO(desirable_weight=0), "KTO: desirable_weight must be > 0, got 0"),
        (lambda: PPO(gamma=1.5), "PPO: gamma must be in [0, 1], got 1.5"),
        (lambda: PPO(clip=0.0), "PPO: clip must be in (0, 1), got 0.0"),
        (lambda: PPO(epochs=0), "PPO: epochs must be >= 1, got 0"),
        (lambda: PPO(minibatch_size=0), "PPO: minibatch_size must be >= 1, got 0"),
        (lambda: PPO(max_grad_norm=-1.0), "PPO: max_grad_norm must be > 0, got -1.0"),
        (lambda: PPO(vf_coef=-0.1), "PPO: vf_coef must be >= 0, got -0.1"),
        (lambda: PPO(generation={"temperature": -1.0}), "PPO: generation.temperature must be >= 0, got -1.0"),
        (lambda: PPO(generation=GenerationSettings(top_p=0.0)), "PPO: generation.top_p must be in (0, 1], got 0.0"),
        (lambda: PPO(generation={"max_new_tokens": 0}), "PPO: generation.max_new_tokens must be >= 1, got 0"),
        (lambda: PPO(generation={"top_k": -5}), "PPO: generation.top_k must be >= 0, got -5"),
        (lambda: PPO(kl={"beta": -0.05}), "PPO: kl.beta must be >= 0, got -0.05"),
        (lambda: PPO(kl=KLPenalty(target=0.0)), "PPO: kl.target must be > 0, got 0.0"),
        (lambda: PPO(kl={"factor": 1.0}), "PPO: kl.factor must be > 1, got 1.0"),
        (lambda: GRPO(samples_per_prompt=1), "GRPO: samples_per_prompt must be >= 2, got 1"),
        (
            lambda: GRPO(loss_type="batch"),
            "GRPO: loss_type must be one of grpo, bnpo, dr_grpo, dapo, cispo, got 'batch'",
        ),
        (lambda: TRPO(backtrack_factor=1.0), "TRPO: backtrack_factor must be in (0, 1), got 1.0"),
        (
            lambda: OnlineDPO(generation={"temperature": 0.0}),
            "OnlineDPO: generation.temperature must be > 0: greedy samples",
        ),
        (
            lambda: data_package.PreferenceDataModule(batch_size=0),
            "PreferenceDataModule: batch_size must be >= 1, got 0",
        ),
        (
            lambda: data_package.PreferenceDataModule(batch_size=-8),
            "PreferenceDataModule: batch_size must be >= 1, got -8",
        ),
        (
            lambda: data_package.PreferenceDataModule(val_fraction=1.0),
            "PreferenceDataModule: val_fraction must be in (0, 1), got 1.0",
        ),
        (
            lambda: data_package.PreferenceDataModule(max_length=1),
            "PreferenceDataModule: max_length must be >= 2, got 1",
        ),
        (
            lambda: data_package.PreferenceDataModule(max_length=64, max_prompt_length=64),
            "PreferenceDataModule: max_prompt_length must be < max_length=64, got 64: responses need room",
        ),
        (
            lambda: data_package.PreferenceDataModule(num_workers=-1),
            "PreferenceDataModule: num_workers must be >= 0, got -1",
        ),
        (lambda: data_package.SFTDataModule(eval_batch_size=0), "SFTDataModule: eval_batch_size must be >= 1, got 0"),
        (lambda: data_package.ListwiseDataModule(list_size=1), "ListwiseDataModule: list_size must be >= 2, got 1"),
        (
            lambda: data_package.PromptDataModule(ptx_batch_size=0),
            "PromptDataModule: ptx_batch_size must be >= 1, got 0",
        ),
        (
            lambda: data_package.PreferenceDataModule(task=data_package.WordRulesTask(num_train=10), max_records=0),
            "PreferenceDataModule: max_records must be >= 1, got 0",
        ),
        (lambda: data_package.WordRulesTask(num_val=0), "WordRulesTask: num_val must be >= 1, got 0"),
        (
            lambda: data_package.PreferenceDataModule(columns={"promt": "question"}),
            "PreferenceDataModule: columns maps fields it does not read: promt; the keys are lit-align's field names "
            "(prompt, chosen, rejected, "
            "score_chosen, score_rejected, margin, system), the values the file's",
        ),
        (
            lambda: data_package.ListwiseDataModule(columns={"chosen": "best"}),
            "ListwiseDataModule: columns maps fields it does not read: chosen",
        ),
        (
            lambda: data_package.PromptDataModule(columns={"completion": "answer"}),
            "PromptDataModule: columns maps fields it does not read: completion",
        ),
        (
            lambda: data_package.WordRulesTask(min_word_length=5, max_word_length=4),
            "WordRulesTask: min_word_length must be <= max_word_length=4, got 5",
        ),
        (lambda: callbacks_package.ReferenceSync(alpha=1.5), "ReferenceSync: alpha must be in (0, 1], got 1.5"),
        (lambda: callbacks_package.StepwiseDPO(num_chunks=0), "StepwiseDPO: num_chunks must be >= 1, got 0"),
        (
            lambda: callbacks_package.NonFiniteLoss(action="ignore"),
            "NonFiniteLoss: action must be one of stop, skip, got 'ignore'",
        ),
        (lambda: callbacks_package.Throughput(window_size=1), "Throughput: window_size must be >= 2, got 1"),
        (lambda: RewardModelReward("unused", batch_size=0), "RewardModelReward: batch_size must be >= 1, got 0"),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_out_of_range_setting_is_named_with_its_range(build, message):
    with pytest.raises(SettingError, match="^" + re.escape(message)):
        build()


def test_a_valid_setting_on_the_edge_of_its_range_is_accepted():
    """Inclusive bounds are allowed: label smoothing 0, gamma 0 and 1, top_p 1, temperature 0, warm-up 0."""
    DPO(label_smoothing=0.0, optimizer={"warmup_ratio": 0.0, "weight_decay": 0.0, "betas": (0.0, 0.0)})
    PPO(gamma=0.0, lam=1.0, generation={"top_p": 1.0, "temperature": 0.0, "top_k": 0}, kl={"beta": 0.0})
    data_package.PreferenceDataModule(batch_size=1, max_length=2, num_workers=0)


# ---- every numeric setting of every class has a range, and the range is checked --------------------
def _public_classes() -> list[type]:
    """Every class a config can name: methods, data modules, callbacks, rewards, and the settings
    dataclasses nested in them."""
    classes = []
    for package in (methods_package, data_package, callbacks_package):
        for name in getattr(package, "__all__", dir(package)):
            value = getattr(package, name)
            if (
                inspect.isclass(value)
                and value.__module__.startswith("lit_align")
                and not issubclass(value, BaseException)
            ):
                classes.append(value)
    classes += [RewardModelReward, ModelSettings, TinyModel, LoRA, OptimizerSettings, GenerationSettings, KLPenalty]
    return sorted(set(classes), key=lambda cls: cls.__qualname__)


def _numeric_settings(cls: type) -> dict[str, typing.Any]:
    hints = typing.get_type_hints(cls, include_extras=True) if dataclasses.is_dataclass(cls) else init_hints(cls)
    numeric = {}
    for name, hint in hints.items():
        base = hint
        if typing.get_origin(base) is typing.Union:
            options = [arg for arg in typing.get_args(base) if arg is not type(None)]
            base = options[0] if len(options) == 1 else None
        inner = typing.get_args(base)[0] if typing.get_origin(base) is typing.Annotated else base
        if inner in (int, float):
            numeric[name] = base
    return numeric


def _outside(valid: Range, whole: bool) -> float | int:
    """A value just outside ``valid``."""
    step = 1 if whole else 0.5
    if valid.low is not None:
        value = valid.low if valid.low_open else valid.low - step
    elif valid.high is not None:
        value = valid.high if valid.high_open else valid.high + step
    else:
        value = math.inf
    return int(value) if whole and math.isfinite(value) else value


SETTINGS_CLASSES = [cls for cls in _public_classes() if _numeric_settings(cls)]


@pytest.mark.parametrize("cls", SETTINGS_CLASSES, ids=lambda cls: cls.__qualname__)
def test_every_numeric_setting_has_a_range(cls):
    unranged = [
        name
        for name, hint in _numeric_settings(cls).items()
        if typing.get_origin(hint) is not typing.Annotated
        or not any(isinstance(item, Range) for item in typing.get_args(hint)[1:])
    ]
    assert not unranged, f"{cls.__qualname__}: numeric settings without a Range annotation: {unranged}"


def _build(cls: type, name: str, value):
    """An instance of ``cls`` with ``name=value`` (settings dataclasses are checked through a method
    that holds them: DPO for model and optimizer settings, PPO for generation and KL)."""
    holders = {
        ModelSettings: (DPO, "model"),
        OptimizerSettings: (DPO, "optimizer"),
        GenerationSettings: (PPO, "generation"),
        KLPenalty: (PPO, "kl"),
        TinyModel: (DPO, "model.tiny"),
        LoRA: (DPO, "model.lora"),
    }
    if cls in holders:
        holder, path = holders[cls]
        settings: dict = {name: value}
        for part in reversed(path.split(".")):
            settings = {part: settings}
        return holder(**settings)
    if cls is RewardModelReward:
        return cls("unused", **{name: value})
    if issubclass(cls, RewardFunction) and "path" in init_hints(cls):
        return cls("unused", **{name: value})
    return cls(**{name: value})


RANGED = [
    (cls, name)
    for cls in SETTINGS_CLASSES
    for name in _numeric_settings(cls)
    if not (inspect.isabstract(cls) or cls.__qualname__ in {"AlignmentModule"})
]


@pytest.mark.parametrize("cls, name", RANGED, ids=[f"{cls.__qualname__}.{name}" for cls, name in RANGED])
def test_every_numeric_setting_is_checked_when_its_holder_is_built(cls, name):
    """A value just outside the annotated range stops construction with the setting's name (the
    dotted path from the holder for nested settings) and the range, before any model is loaded."""
    hint = _numeric_settings(cls)[name]
    base, *metadata = typing.get_args(hint)
    (valid,) = [item for item in metadata if isinstance(item, Range)]
    value = _outside(valid, whole=base is int)
    with pytest.raises(SettingError, match=rf"\b{re.escape(name)} must be {re.escape(repr(valid))}, got "):
        _build(cls, name, value)


# ---- the CLI: our message first and alone, then the hint -----------------------------------------
@pytest.mark.parametrize(
    "flags, message, key",
    [
        (["--model.init_args.beta", "-0.1"], "DPO: beta must be > 0, got -0.1", "model.init_args.beta"),
        (
            ["--model.init_args.optimizer.lr", "-1"],
            "DPO: optimizer.lr must be > 0, got -1.0",
            "model.init_args.optimizer.lr",
        ),
        (
            ["--data.init_args.batch_size", "0"],
            "PreferenceDataModule: batch_size must be >= 1, got 0",
            "data.init_args.batch_size",
        ),
        (
            ["--data.init_args.max_prompt_length", "900"],
            "PreferenceDataModule: max_prompt_length must be < max_length=64, got 900: responses need room",
            "data.init_args.max_prompt_length",
        ),
        (
            ["--data.init_args.task.min_word_length", "1"],
            "WordRulesTask: min_word_length must be >= 2, got 1",
            "data.init_args.task.min_word_length",
        ),
        (
            ["--model.init_args.model.reference", "none"],
            "DPO: model.reference=none, but this method needs a reference model; use copy, adapter or cached",
            "model.init_args.model.reference",
        ),
    ],
    ids=["beta", "lr", "batch-size", "prompt-length", "task", "reference"],
)
def test_cli_shows_the_constructor_message_first_and_alone_then_the_hint(flags, message, key, in_tmp, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(CONFIGS / "dpo.yaml"), *flags])
    text = str(stop.value.code)
    assert text == (
        f"lit-align fit: {message}\nhint: change {key} (in the YAML, or --{key} on the command line); "
        "LIT_ALIGN_DEBUG=1 shows the traceback"
    )
    captured = capsys.readouterr()
    assert "Union subtypes" not in captured.err + captured.out and "Namespace(" not in captured.err + captured.out
    assert not Path("runs").exists()


def test_a_setting_in_a_callback_list_is_named_by_its_yaml_path(in_tmp):
    config = in_tmp / "sync.yaml"
    config.write_text(
        "trainer:\n  callbacks:\n    - class_path: lit_align.callbacks.ReferenceSync\n      init_args: {alpha: 0}\n"
    )
    with pytest.raises(
        SystemExit,
        match=re.escape(
            "lit-align fit: ReferenceSync: alpha must be in (0, 1], got 0.0\n"
            "hint: change trainer.callbacks[0].init_args.alpha in the YAML"
        ),
    ):
        main(["fit", "--config", str(CONFIGS / "dpo.yaml"), "--config", str(config)])


def _lit_align(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """``lit-align ARGS`` as a user runs it (the console script's entry point, in a new process)."""
    environment = {key: value for key, value in os.environ.items() if key != "LIT_ALIGN_DEBUG"}
    environment.update(PYTHONPATH=str(ROOT), **env)
    command = [
        sys.executable,
        "-c",
        "import sys; from lit_align.cli import main; sys.argv[0] = 'lit-align'; main()",
        *args,
    ]
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_errors_of_ours_print_two_lines_and_no_traceback_unless_debugging(tmp_path):
    """A bad setting and a bad record, run as a user runs them: exit status 1, the last two lines
    of stderr are the message and the hint, no traceback; LIT_ALIGN_DEBUG=1 shows the traceback."""
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"})
        + "\n"
        + json.dumps({"prompt": "a", "chosen": 5, "rejected": "c"})
        + "\n"
    )
    cases = [
        (
            ["--model.init_args.beta", "-0.1"],
            [
                "lit-align fit: DPO: beta must be > 0, got -0.1",
                "hint: change model.init_args.beta (in the YAML, or --model.init_args.beta on the command line); "
                "LIT_ALIGN_DEBUG=1 shows the traceback",
            ],
        ),
        (
            ["--data.init_args.train", str(data), "--data.init_args.val", str(data)],
            [
                f"lit-align fit: {data}, record 1, field 'chosen': expected a string, got int",
                "(LIT_ALIGN_DEBUG=1 shows the traceback)",
            ],
        ),
    ]
    for flags, lines in cases:
        result = _lit_align("fit", "--config", str(CONFIGS / "dpo.yaml"), *flags, cwd=tmp_path)
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr, result.stderr
        assert result.stderr.strip().splitlines()[-2:] == lines, result.stderr
    debug = _lit_align(
        "fit",
        "--config",
        str(CONFIGS / "dpo.yaml"),
        "--model.init_args.beta",
        "-0.1",
        cwd=tmp_path,
        LIT_ALIGN_DEBUG="1",
    )
    assert (
        debug.returncode != 0
        and "Traceback" in debug.stderr
        and "SettingError: DPO: beta must be > 0, got -0.1" in debug.stderr
    )


def test_unexpected_errors_keep_their_traceback(in_tmp, monkeypatch):
    """Only errors lit-align raises on purpose become a one-line message; a bug stays a bug."""

    def broken(self, batch, stage):
        raise RuntimeError("a bug, not a user error")

    monkeypatch.setattr(methods_package.PairedPreferenceModule, "step", broken)
    with pytest.raises(RuntimeError, match="a bug, not a user error"):
        main(
            [
                "fit",
                "--config",
                str(CONFIGS / "dpo.yaml"),
                "--trainer.max_steps",
                "1",
                "--validate_before_fit",
                "false",
                "--trainer.enable_progress_bar",
                "false",
            ]
        )


def test_project_errors_during_fit_end_with_the_message(in_tmp):
    """An error raised on purpose after the classes are built (here: on-policy training without a
    reward) also ends as one message, not a Lightning stack trace."""
    with pytest.raises(SystemExit, match="^" + re.escape("lit-align fit: GRPO needs a reward")):
        main(
            [
                "fit",
                "--config",
                str(CONFIGS / "grpo.yaml"),
                "--model.init_args.reward",
                "null",
                "--model.init_args.model.name_or_path",
                "tiny",
                "--trainer.enable_progress_bar",
                "false",
            ]
        )


@pytest.mark.parametrize(
    "flags, lines",
    [
        (
            ["--trainer.accumulate_grad_batches", "0"],
            [
                "lit-align fit: Trainer: accumulate_grad_batches must be >= 1, got 0",
                "hint: change trainer.accumulate_grad_batches (in the YAML, or --trainer.accumulate_grad_batches",
            ],
        ),
        (
            ["--trainer.val_check_interval", "0"],
            [
                "lit-align fit: Trainer: val_check_interval must be > 0, got 0",
                "hint: change trainer.val_check_interval",
            ],
        ),
        (
            ["--trainer.gradient_clip_val", "-1"],
            [
                "lit-align fit: Trainer: gradient_clip_val must be >= 0, got -1",
                "hint: change trainer.gradient_clip_val",
            ],
        ),
        (
            ["--trainer.limit_val_batches", "-1"],
            [
                "lit-align fit: Lightning: You have passed invalid value -1 for limit_val_batches, it has to be in "
                "[0.0, 1.0] or an int.",
                "(LIT_ALIGN_DEBUG=1 shows the traceback)",
            ],
        ),
    ],
    ids=["accumulate-0", "val-interval-0", "negative-clip", "lightning-refusal"],
)
def test_trainer_settings_lightning_does_not_check_are_checked_and_its_own_refusals_printed(flags, lines, in_tmp):
    """Lightning divides by accumulate_grad_batches and val_check_interval mid-run and would flip
    gradients with a negative clip value; its own MisconfigurationException is a message too."""
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(CONFIGS / "dpo.yaml"), *flags])
    first, second = str(stop.value.code).splitlines()
    assert first == lines[0] and second.startswith(lines[1]), str(stop.value.code)


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--model.init_args.model.attn_implementation", "flash_attention_2"],
            "lit-align fit: cannot build model 'tiny' with these model settings: ImportError: FlashAttention2 has been "
            "toggled on",
        ),
        (
            ["--model.init_args.model.lora", "{target_modules: [no_such_layer]}"],
            "lit-align fit: cannot build model 'tiny' with these model.lora settings: ",
        ),
        (
            ["--model.init_args.model.tiny.num_heads", "3"],
            "lit-align fit: TinyModel: num_heads must divide hidden_size=64, got 3",
        ),
    ],
    ids=["attention-backend", "lora-target", "tiny-heads"],
)
def test_model_settings_the_libraries_refuse_are_named(flags, message, in_tmp):
    with pytest.raises(SystemExit, match="^" + re.escape(message)):
        main(["fit", "--config", str(CONFIGS / "dpo.yaml"), *flags])
    assert not Path("runs").exists()


def test_a_missing_reward_model_is_named_with_what_to_run_first(in_tmp):
    """Run where the configs are (as the docs do): the folder configs/reward.yaml exports to is
    named with the command that writes it, before any hub lookup."""
    (in_tmp / "configs").mkdir()
    shutil.copy(CONFIGS / "reward.yaml", in_tmp / "configs" / "reward.yaml")
    with pytest.raises(
        SystemExit,
        match="^"
        + re.escape(
            "lit-align fit: RewardModelReward: the reward model 'outputs/reward' does not exist yet: "
            "configs/reward.yaml writes it\nhint: run `lit-align fit --config configs/reward.yaml` first"
        ),
    ):
        main(
            [
                "fit",
                "--config",
                str(CONFIGS / "ppo.yaml"),
                "--config",
                str(CONFIGS / "pipeline" / "ppo_with_reward_model.yaml"),
                "--model.init_args.model.name_or_path",
                "tiny",
            ]
        )
