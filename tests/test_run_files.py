"""Files and folders a run writes (class 8), checkpoints given to a run (class 9), and a user's own
classes found as the docs say (class 10)."""

from __future__ import annotations

import csv
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import QUIET_FLAGS, metrics_table

from lit_align.cli import main
from lit_align.runtime.atomic import unwritable

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SHORT = [
    "--trainer.max_steps",
    "2",
    "--trainer.val_check_interval",
    "2",
    "--trainer.limit_val_batches",
    "2",
    "--trainer.log_every_n_steps",
    "1",
    *QUIET_FLAGS,
]


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder no file can be created in: mode 0o555, and immutable (``chattr +i``) where the tests
    run as root, who ignores modes."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    immutable = (
        unwritable(folder) is None
        and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    )
    if unwritable(folder) is None:
        folder.chmod(0o755)
        pytest.skip("cannot make a read-only folder on this machine (root without chattr)")
    yield folder
    if immutable:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    folder.chmod(0o755)


# ---- class 8: folders the run cannot write ---------------------------------------------------------
@pytest.mark.parametrize("reference", ["auto", "cached"])
def test_read_only_cache_folder_trains_uncached_with_a_warning(
    reference, read_only_folder, in_tmp, monkeypatch, caplog
):
    monkeypatch.setenv("LIT_ALIGN_CACHE", str(read_only_folder))
    with caplog.at_level(logging.WARNING, logger="lit_align"):
        main(["fit", "--config", str(CONFIGS / "dpo.yaml"), "--model.init_args.model.reference", reference, *SHORT])
    assert f"cannot write the tokenized-data cache in {read_only_folder / 'tokenized'}" in caplog.text
    assert "continuing without it. Set data.init_args.cache_dir or $LIT_ALIGN_CACHE to a writable folder" in caplog.text
    if reference == "cached":
        assert f"cannot write the reference log-probs cache in {read_only_folder / 'reference'}" in caplog.text
        assert "keeping them in memory for this run only" in caplog.text
    assert any(row.get("train/loss") for row in metrics_table(in_tmp / "runs"))
    assert not list(read_only_folder.iterdir())


def test_default_root_dir_holds_the_run(in_tmp):
    main(["fit", "--config", str(CONFIGS / "dpo.yaml"), "--trainer.default_root_dir", "elsewhere", *SHORT])
    assert not Path("runs").exists()
    rows = metrics_table(in_tmp / "elsewhere")
    assert any(row.get("train/loss") for row in rows)
    assert list((in_tmp / "elsewhere").rglob("*.ckpt"))  # checkpoints follow the logger's folder


def test_a_logger_folder_given_explicitly_is_kept(in_tmp):
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "dpo.yaml"),
            "--trainer.default_root_dir",
            "root",
            "--trainer.logger.init_args.save_dir",
            "logs",
            *SHORT,
        ]
    )
    assert metrics_table(in_tmp / "logs") and not (in_tmp / "root").exists()


def test_the_step_that_ends_fit_is_validated_checkpointed_and_sampled(in_tmp, capsys):
    """3 steps validating every 2: Lightning alone validates step 2 and ends at step 3 with no score,
    checkpoint or samples of the final weights; the last step is validated too, once."""
    flags = ["--trainer.max_steps", "3", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1"]
    main(["fit", "--config", str(CONFIGS / "dpo.yaml"), *flags, *QUIET_FLAGS])
    validated = [int(row["step"]) for row in metrics_table() if row.get("val/rewards/accuracies")]
    assert validated == [0, 1, 2]  # before training, after step 2, after step 3 (the CSV counts from 0)
    (run,) = Path("runs/lightning_logs").iterdir()
    assert [path.name for path in (run / "checkpoints").iterdir()] == ["epoch=0-step=3.ckpt"]
    assert sorted(path.name for path in (run / "samples").iterdir()) == ["step_0.jsonl", "step_2.jsonl", "step_3.jsonl"]
    assert re.search(r"held-out val/rewards/accuracies: \d\.\d{3} -> \d\.\d{3}", capsys.readouterr().out)

    shutil.rmtree("runs")  # a validation due at the last step anyway runs once
    main(["fit", "--config", str(CONFIGS / "dpo.yaml"), *flags[:1], "4", *flags[2:], *QUIET_FLAGS])
    assert [int(row["step"]) for row in metrics_table() if row.get("val/rewards/accuracies")] == [0, 1, 3]


@pytest.mark.parametrize("flag", ["--trainer.default_root_dir", "--trainer.logger.init_args.save_dir"])
def test_a_run_folder_that_cannot_be_written_stops_before_anything_is_loaded(flag, read_only_folder, in_tmp):
    target = read_only_folder / "runs"
    setting = flag.removeprefix("--")
    with pytest.raises(
        SystemExit, match="^" + re.escape(f"lit-align fit: the run folder {str(target)!r} cannot be written (")
    ) as stop:
        main(["fit", "--config", str(CONFIGS / "dpo.yaml"), flag, str(target), *SHORT])
    assert f"; set {setting} to a folder you can write" in str(stop.value.code)
    assert not Path("runs").exists()


def test_an_export_folder_that_cannot_be_written_stops_before_training(read_only_folder, in_tmp):
    target = read_only_folder / "policy"
    with pytest.raises(
        SystemExit, match="^" + re.escape(f"lit-align fit: ExportHF: output_dir {str(target)!r} cannot be written (")
    ):
        main(
            [
                "fit",
                "--config",
                str(CONFIGS / "sft.yaml"),
                "--trainer.callbacks.init_args.output_dir",
                str(target),
                *SHORT,
            ]
        )
    logged = [row for path in in_tmp.rglob("metrics.csv") for row in csv.DictReader(open(path))]
    assert not [row for row in logged if row.get("train/loss")]  # no training step ran


# ---- class 9: resuming from a checkpoint -------------------------------------------------------------
@pytest.fixture
def dpo_checkpoint(in_tmp) -> Path:
    main(["fit", "--config", str(CONFIGS / "dpo.yaml"), *SHORT])
    (checkpoint,) = Path("runs").rglob("*.ckpt")
    shutil.move(str(checkpoint), "dpo.ckpt")
    shutil.rmtree("runs")
    return in_tmp / "dpo.ckpt"


@pytest.mark.parametrize("command", ["fit", "validate", "test"])
def test_a_checkpoint_of_another_method_is_refused_naming_both(command, dpo_checkpoint):
    with pytest.raises(SystemExit) as stop:
        main([command, "--config", str(CONFIGS / "orpo.yaml"), "--ckpt_path", str(dpo_checkpoint), *QUIET_FLAGS])
    message, hint = str(stop.value.code).splitlines()
    assert message == (
        f"lit-align {command}: checkpoint {str(dpo_checkpoint)!r} was written by lit_align.methods.dpo.DPO, but the "
        "config trains "
        "lit_align.methods.ORPO; resuming would run the checkpoint's method instead"
    )
    assert hint.startswith("hint: use the config of DPO with this checkpoint, or start without --ckpt_path")
    assert not Path("runs").exists()


def resume_dpo(checkpoint: Path, *overrides: str) -> None:
    """``lit-align fit`` of configs/dpo.yaml from ``checkpoint``, ``overrides`` before the trainer's
    flags: 3 steps in all, a validation batch after each."""
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "dpo.yaml"),
            "--ckpt_path",
            str(checkpoint),
            *overrides,
            "--trainer.max_steps",
            "3",
            "--trainer.val_check_interval",
            "1",
            "--trainer.limit_val_batches",
            "1",
            *QUIET_FLAGS,
        ]
    )


def test_settings_the_checkpoint_replaces_are_reported(dpo_checkpoint, caplog):
    with caplog.at_level(logging.WARNING, logger="lit_align.cli"):
        resume_dpo(dpo_checkpoint, "--model.init_args.beta", "0.3", "--model.init_args.optimizer.lr", "0.01")
    assert (
        f"resuming from {dpo_checkpoint}: the checkpoint's hyper-parameters replace 2 configured setting(s):"
        in caplog.text
    )
    assert "  model.init_args.beta: 0.3 configured, 0.1 from the checkpoint" in caplog.text
    assert "  model.init_args.optimizer.lr: 0.01 configured, 0.001 from the checkpoint" in caplog.text


def test_resuming_with_the_same_settings_reports_nothing(dpo_checkpoint, caplog):
    with caplog.at_level(logging.WARNING, logger="lit_align.cli"):
        resume_dpo(dpo_checkpoint)
    assert "resuming from" not in caplog.text


# ---- class 10: the README's own-loss command, exactly as printed ----------------------------------
def readme_text() -> str:
    return (ROOT / "README.md").read_text()


def readme_example_code() -> str:
    return re.search(r"## Write your own loss.*?```python\n(.*?)```", readme_text(), re.S).group(1)


def readme_train_command() -> str:
    return re.search(r"## Write your own loss.*?train it with\s+`(lit-align fit [^`]*)`", readme_text(), re.S).group(1)


def lit_align_command(words: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``lit-align WORDS`` as the installed console script runs it: no PYTHONPATH, started in ``cwd``."""
    environment = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "LIT_ALIGN_DEBUG")}
    script = shutil.which("lit-align")
    command = (
        [script, *words]
        if script
        else [
            sys.executable,
            "-c",
            "import sys; from lit_align.cli import main; sys.argv[0] = 'lit-align'; main()",
            *words,
        ]
    )
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_readme_own_loss_command_runs_as_printed_from_a_fresh_folder(tmp_path):
    """A new user's folder: the configs and my_losses.py saved from the README; the command typed
    exactly as the README prints it, with no PYTHONPATH. Then ``lit-align export`` of its checkpoint
    from another folder names the checkpoint and the module it cannot import."""
    folder = tmp_path / "fresh"
    shutil.copytree(CONFIGS, folder / "configs")
    (folder / "my_losses.py").write_text(readme_example_code())
    command = readme_train_command()
    assert command == "lit-align fit --config configs/dpo.yaml --model my_losses.MarginDPO --model.delta 1.0"
    result = lit_align_command(shlex.split(command)[1:], folder)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(
        r"held-out val/rewards/accuracies: 0\.\d+ -> (0\.[89]\d*|1\.000)", result.stdout + result.stderr
    ), result.stdout[-2000:]
    (checkpoint,) = (folder / "runs").rglob("*.ckpt")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    export = lit_align_command(["export", "--ckpt_path", str(checkpoint), "--output_dir", "out"], elsewhere)
    assert export.returncode == 1 and "Traceback" not in export.stderr
    message, hint = export.stderr.strip().splitlines()[-2:]
    assert message == (
        f"lit-align export: checkpoint {str(checkpoint)!r} was written by my_losses.MarginDPO, and it cannot be "
        "imported "
        "(No module named 'my_losses')"
    )
    assert hint.startswith(
        "hint: run lit-align from the folder that holds my_losses.py, or add that folder to PYTHONPATH"
    )
    assert not (elsewhere / "out").exists()
    exported = lit_align_command(["export", "--ckpt_path", str(checkpoint), "--output_dir", "out"], folder)
    assert exported.returncode == 0 and (folder / "out" / "config.json").is_file(), exported.stderr[-2000:]


def test_a_checkpoint_folder_that_cannot_be_written_stops_before_anything_is_loaded(read_only_folder, in_tmp):
    target = read_only_folder / "checkpoints"
    config = in_tmp / "checkpoints.yaml"
    config.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n      init_args: "
        f"{{dirpath: '{target}'}}\n"
    )
    with pytest.raises(
        SystemExit, match="^" + re.escape(f"lit-align fit: the checkpoint folder {str(target)!r} cannot be written (")
    ) as stop:
        main(["fit", "--config", str(CONFIGS / "dpo.yaml"), "--config", str(config), *SHORT])
    assert "set trainer.callbacks[0].init_args.dirpath to a folder you can write" in str(stop.value.code)
    assert not Path("runs").exists()
