"""The ``lit-align`` CLI end to end: every method learns the built-in task; print_config, help,
validate/test, real HH data, and config/data errors before training."""

from __future__ import annotations

import json
import logging
import math
import re
import warnings
from pathlib import Path

import pytest
from conftest import QUIET_FLAGS, metric_rows, metrics_table, seed_flags, short_run_flags

from lit_align.cli import LIGHTNING_INFO_LOGGERS, main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
HH = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the CSV logger writes runs/ under the working directory


PAIRED_CONFIGS = [
    "dpo",
    "cdpo",
    "robust_dpo",
    "hinge",
    "ipo",
    "gpo",
    "rdpo",
    "dpop",
    "beta_dpo",
    "odpo",
    "exo",
    "nca",
    "apo_zero",
    "apo_down",
    "sppo_hard",
    "bco_pair",
    "aot",
    "orpo",
    "simpo",
    "cpo",
]
TRAINED_ELSEWHERE = {  # config -> the test file whose slow CLI test trains it
    "kto": "test_unpaired.py",
    "npo": "test_unpaired.py",
    "bco": "test_unpaired.py",
    "rrhf": "test_listwise.py",
    "pro": "test_listwise.py",
    "lipo": "test_listwise.py",
    "tdpo": "test_tdpo.py",
    "tr_dpo": "test_reference_sync.py",
    "sdpo": "test_reference_sync.py",
    "reward": "test_reward_model.py",
    "sft": "conftest.py",
    "sft_arithmetic": "conftest.py",
    "dpop_arithmetic": "test_arithmetic_task.py",
    "reinforce": "test_on_policy.py",
    "rloo": "test_on_policy.py",
    "grpo": "test_on_policy.py",
    "grpo_arithmetic": "test_on_policy.py",
    "grpo_dapo": "test_on_policy.py",
    "grpo_dr": "test_on_policy.py",
    "grpo_gspo": "test_on_policy.py",
    "grpo_cispo": "test_on_policy.py",
    "reinforce_pp": "test_on_policy.py",
    "ppo": "test_on_policy.py",
    "a2c": "test_on_policy.py",
    "trpo": "test_trpo.py",
    "online_dpo": "test_online_dpo.py",
}


def test_every_config_is_trained_by_a_test():
    configs = {path.stem for path in CONFIGS.glob("*.yaml")}
    assert configs == set(PAIRED_CONFIGS) | set(TRAINED_ELSEWHERE)
    for config, test_file in TRAINED_ELSEWHERE.items():
        assert (
            f'"{config}"' in (ROOT / "tests" / test_file).read_text()
            or f"{config}.yaml" in (ROOT / "tests" / test_file).read_text()
        )


@pytest.mark.slow
@pytest.mark.parametrize("method", PAIRED_CONFIGS)
def test_each_method_learns_the_builtin_task_through_the_cli(method, capsys, measured):
    """Held-out accuracy starts near chance (validated before fit) and ends >= 0.8."""
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / f"{method}.yaml"),
            *short_run_flags(80),
            *QUIET_FLAGS,
            *seed_flags(),
        ]
    )
    accuracies = measured("val/rewards/accuracies", metric_rows("val/rewards/accuracies"))
    assert len(accuracies) == 2, accuracies
    assert 0.35 <= accuracies[0] <= 0.65
    assert accuracies[-1] >= 0.8
    assert all(math.isfinite(v) for v in metric_rows("train/loss"))
    assert "held-out val/rewards/accuracies:" in capsys.readouterr().out


def test_print_config_reflects_overrides(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "dpo.yaml"), "--model.beta", "0.2", "--print_config"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "class_path: lit_align.methods.DPO" in out
    assert "beta: 0.2" in out
    assert "logp_chunk_size: 1024" in out


def test_help_documents_every_method_field(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / "orpo.yaml"), "--model.help", "lit_align.methods.ORPO"])
    out = capsys.readouterr().out
    assert "--model.lam" in out and "weight of the odds-ratio term" in out
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / "dpo.yaml"), "--model.help", "lit_align.methods.DPO"])
    out = capsys.readouterr().out
    for field, words in [
        ("reference", "no second copy"),
        ("logp_chunk_size", "never built"),
        ("name_or_path", "a hub id"),
    ]:
        assert f"--model.model.{field}" in out and words in " ".join(out.split())


def test_validate_and_test_subcommands_from_a_checkpoint(capsys):
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "simpo.yaml"),
            "--trainer.max_steps",
            "4",
            "--trainer.val_check_interval",
            "4",
            "--validate_before_fit",
            "false",
            *QUIET_FLAGS,
        ]
    )
    (checkpoint,) = Path("runs").rglob("*.ckpt")
    capsys.readouterr()
    main(["validate", "--config", str(CONFIGS / "simpo.yaml"), "--ckpt_path", str(checkpoint), *QUIET_FLAGS])
    assert "val/rewards/accuracies" in capsys.readouterr().out
    main(["test", "--config", str(CONFIGS / "simpo.yaml"), "--ckpt_path", str(checkpoint), *QUIET_FLAGS])
    assert "test/rewards/accuracies" in capsys.readouterr().out


def test_resuming_fit_does_not_report_the_fresh_models_score_as_its_start(capsys):
    """validate_before_fit would score the freshly built model, not the checkpoint's: when resuming
    it is skipped with a line saying so, and the end is printed alone (no misleading "before ->")."""
    flags = ["--config", str(CONFIGS / "simpo.yaml"), "--trainer.val_check_interval", "2", *QUIET_FLAGS]
    main(["fit", *flags, "--trainer.max_steps", "2"])
    first = capsys.readouterr().out
    assert re.search(r"held-out val/rewards/accuracies: 0\.\d+ -> \d\.\d+", first), first
    # the closing line says where to look, and names only what is there
    folder, named = re.search(r"run folder: (\S+) \((.+)\)\n", first).groups()
    assert Path(folder).resolve() == Path("runs/lightning_logs/version_0").resolve(), folder
    assert named.split(", ")[:1] == ["curves.png"] and "checkpoints/" in named.split(", "), named
    assert all((Path(folder) / name).exists() for name in named.split(", ")), named
    (checkpoint,) = Path("runs").rglob("*.ckpt")
    main(["fit", *flags, "--trainer.max_steps", "4", "--ckpt_path", str(checkpoint)])
    resumed = capsys.readouterr().out
    assert "validate_before_fit skipped when resuming from --ckpt_path" in resumed, resumed
    assert re.search(r"held-out val/rewards/accuracies: \d\.\d+\n", resumed), resumed
    resumed_steps = [
        int(row["step"])
        for row in metrics_table(sorted(Path("runs").rglob("version_1"))[0])
        if row.get("val/rewards/accuracies")
    ]
    assert resumed_steps == [3], resumed_steps


class Recorded(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_the_main_job_prints_no_warning_or_tip_meant_for_someone_else(capsys):
    """The README's main job (shortened): no Lightning warning about the frozen reference's eval
    mode (it is meant), no deprecation Lightning's own code triggers in torch, no Lightning tips to
    install its cloud products; other warnings and Lightning's other lines show."""
    recorded = Recorded()
    loggers = [logging.getLogger(name) for name in LIGHTNING_INFO_LOGGERS]
    for logger in loggers:
        logger.addHandler(recorded)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            main(["fit", "--config", str(CONFIGS / "dpo.yaml"), "--trainer.max_steps", "2", *QUIET_FLAGS])
            warnings.warn("a warning of the run's own", UserWarning, stacklevel=1)
    finally:
        for logger in loggers:
            logger.removeHandler(recorded)
    messages = [str(warning.message) for warning in caught]
    assert not [message for message in messages if "eval mode" in message or "LeafSpec" in message], messages
    assert "a warning of the run's own" in messages
    assert not [line for line in recorded.lines if "Tip" in line], recorded.lines
    assert any("max_steps=2" in line for line in recorded.lines), recorded.lines  # "`Trainer.fit` stopped: ..."
    assert "run folder:" in capsys.readouterr().out


@pytest.mark.skipif(not HH.exists(), reason="../shared/data is not next to the checkout")
def test_dpo_on_anthropic_hh_trains_with_finite_loss():
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "dpo.yaml"),
            "--data.init_args.train",
            str(HH),
            "--data.init_args.max_records",
            "48",
            "--data.init_args.max_length",
            "128",
            "--data.init_args.batch_size",
            "4",
            "--trainer.max_steps",
            "3",
            "--trainer.val_check_interval",
            "3",
            "--trainer.log_every_n_steps",
            "1",
            "--trainer.limit_val_batches",
            "2",
            "--validate_before_fit",
            "false",
            *QUIET_FLAGS,
        ]
    )
    losses = metric_rows("train/loss")
    assert losses and all(math.isfinite(v) for v in losses)
    assert math.isfinite(metric_rows("val/loss")[-1])


def test_unknown_config_key_is_named(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text((CONFIGS / "dpo.yaml").read_text().replace("    beta: 0.1\n", "    betta: 0.1\n"))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config)])
    assert exit_info.value.code != 0
    assert "betta" in capsys.readouterr().err


def test_wrong_type_and_unknown_choice_are_named(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / "dpo.yaml"), "--model.beta", "strong"])
    assert "beta" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / "dpo.yaml"), "--data.init_args.format", "xml"])
    err = capsys.readouterr().err
    assert "format" in err and "xml" in err


def test_bad_data_stops_before_any_training_step(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "\n".join(
            json.dumps(r) for r in [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "rejected": "c"}]
        )
    )
    with pytest.raises(SystemExit, match=r"lit-align fit: .*pairs\.jsonl, record 1, field 'chosen': missing"):
        main(
            [
                "fit",
                "--config",
                str(CONFIGS / "dpo.yaml"),
                "--data.init_args.train",
                str(data),
                "--data.init_args.val",
                str(data),
                *QUIET_FLAGS,
            ]
        )
    assert not list(Path("runs").rglob("*.ckpt"))
