"""What a run leaves for a person to look at: held-out samples, curves, `lit-align plot`, the model
card of an export, progress of long phases."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import QUIET_FLAGS

from lit_align.callbacks import Samples
from lit_align.cli import main
from lit_align.data.tasks import WordRulesTask
from lit_align.errors import SettingError
from lit_align.report.curves import draw, panels_of, read_history, series
from lit_align.runtime.progress import progress

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_folder(root: Path = Path("runs")) -> Path:
    (folder,) = {path.parent for path in root.rglob("config.yaml")}
    return folder


@pytest.fixture
def dpo_folder(dpo_run) -> Path:
    """The run folder of the session's configs/dpo.yaml run (40 steps, validating every 20)."""
    return run_folder(dpo_run / "runs")


# ---- samples -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_dpo_config_writes_samples_of_the_held_out_pairs_at_every_validation(dpo_folder):
    files = sorted((dpo_folder / "samples").iterdir(), key=lambda path: int(path.stem.split("_")[1]))
    assert [path.name for path in files] == ["step_0.jsonl", "step_20.jsonl", "step_40.jsonl"]
    held_out = WordRulesTask().split("val")
    for path in files:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(rows) == 8
        for row in rows:  # the decoded example is the record it came from, beside the model's completion
            record = held_out[row["record"]]
            assert row["prompt"] == record["prompt"]
            assert (row["chosen"], row["rejected"]) == (record["chosen"], record["rejected"])
            assert row["score_chosen"] == record["score_chosen"]
            assert isinstance(row["completion"], str)
        assert [row["record"] for row in rows] == list(range(8))  # the same prompts every time


@pytest.mark.slow
def test_samples_of_the_trained_sft_policy_mostly_answer_its_task(sft_policy):
    """The session's configs/sft.yaml run (greedy answers right 80-90% of the time after training):
    its last samples are completions of the trained policy, scored by the task's own verifier."""
    run = sft_policy.parents[1] / "runs"
    last = max(run.rglob("step_*.jsonl"), key=lambda path: int(path.stem.split("_")[1]))
    first = run_folder(run) / "samples" / "step_0.jsonl"
    rows = [json.loads(line) for line in last.read_text().splitlines()]
    assert all(set(row) >= {"prompt", "reference", "completion"} for row in rows)
    correct = [WordRulesTask.is_correct(row["prompt"], row["completion"]) for row in rows]
    before = [WordRulesTask.is_correct(r["prompt"], r["completion"]) for r in map(json.loads, first.open())]
    assert sum(correct) >= 5 and sum(before) <= 1, (correct, before)


@pytest.mark.slow
def test_on_policy_samples_are_the_scored_held_out_completions(in_sft_workdir):
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "grpo.yaml"),
            "--trainer.max_steps",
            "1",
            "--trainer.val_check_interval",
            "1",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.enable_checkpointing",
            "false",
            "--samples",
            "3",
            *QUIET_FLAGS,
        ]
    )
    rows = [json.loads(line) for line in (run_folder() / "samples" / "step_1.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for row in rows:  # the score the method's eval reward gave (first-letter verifier) to that completion
        assert row["score"] == WordRulesTask.score(row["prompt"], row["completion"])


def test_samples_zero_writes_none_and_curves_false_draws_none(in_tmp):
    main(["fit", "--config", str(CONFIGS / "dpo.yaml"), "--trainer.max_steps", "2", "--samples", "0"])
    main(["fit", "--config", str(CONFIGS / "dpo.yaml"), "--trainer.max_steps", "2", "--curves", "false"])
    first, second = sorted(Path("runs/lightning_logs").iterdir())
    assert not (first / "samples").exists() and (first / "curves.png").is_file()
    assert (second / "samples").is_dir() and not (second / "curves.png").exists()


def test_samples_settings_out_of_range_are_refused_by_name():
    with pytest.raises(SettingError, match="Samples: count must be >= 0, got -1"):
        Samples(count=-1)
    with pytest.raises(SettingError, match="Samples: max_new_tokens must be >= 1, got 0"):
        Samples(max_new_tokens=0)


@pytest.mark.slow
def test_tensorboard_gets_the_samples_as_text(in_tmp):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "dpo.yaml"),
            "--trainer.max_steps",
            "2",
            "--trainer.logger",
            "lightning.pytorch.loggers.TensorBoardLogger",
            "--trainer.logger.save_dir",
            "runs",
            *QUIET_FLAGS,
        ]
    )
    folder = run_folder()
    events = EventAccumulator(str(folder), size_guidance={"tensors": 0})
    events.Reload()
    (tag,) = [tag for tag in events.Tags()["tensors"] if tag.startswith("samples")]
    text = events.Tensors(tag)[0].tensor_proto.string_val[0].decode()
    first = json.loads((folder / "samples" / "step_0.jsonl").read_text().splitlines()[0])
    assert "| record | prompt | chosen | rejected |" in text and json.dumps(first["chosen"]) in text
    assert (folder / "curves.png").read_bytes()[:8] == PNG_MAGIC  # the curves do not need the CSV logger


# ---- curves and lit-align plot ------------------------------------------------------------------------
@pytest.mark.slow
def test_dpo_config_draws_its_curves_and_keeps_their_values(dpo_folder):
    assert (dpo_folder / "curves.png").read_bytes()[:8] == PNG_MAGIC
    history = read_history(dpo_folder)
    assert series(history, "val/rewards/accuracies")[0] == [0, 20, 40]
    assert series(history, "train/loss")[0] == [10, 20, 30, 40]  # every log_every_n_steps=10 steps
    steps, rates = series(history, "lr")
    assert rates[0] > rates[len(rates) // 2] > rates[-1]  # the cosine schedule, decaying
    csv_losses = [float(row) for row in _csv_column(dpo_folder, "val/loss")]
    assert series(history, "val/loss")[1] == pytest.approx(csv_losses)  # the same values the logger wrote
    titles = [title for title, _ in panels_of({"run": history})]
    assert titles == ["loss", "preference accuracy", "reward", "margin", "learning rate"]


def _csv_column(folder: Path, name: str) -> list[str]:
    import csv

    with open(folder / "metrics.csv") as stream:
        return [row[name] for row in csv.DictReader(stream) if row.get(name)]


def test_panels_follow_the_metrics_a_run_logged():
    on_policy = [{"step": 1, "train/objective/scores": 0.3, "train/objective/kl": 0.01, "val/objective/scores": 0.4}]
    sft = [{"step": 1, "train/loss": 2.0, "val/perplexity": 7.0}]
    assert panels_of({"a": on_policy}) == [
        ("reward", ["train/objective/scores", "val/objective/scores"]),
        ("KL", ["train/objective/kl"]),
    ]
    assert [title for title, _ in panels_of({"a": on_policy, "b": sft})] == ["loss", "reward", "KL", "perplexity"]


def test_draw_refuses_runs_without_any_known_curve(tmp_path):
    with pytest.raises(Exception, match="no curves to draw"):
        draw({"a": [{"step": 1, "val/custom": 1.0}]}, tmp_path / "x.png")


def test_read_history_takes_lightning_metrics_csv(tmp_path):
    (tmp_path / "metrics.csv").write_text("epoch,step,train/loss,val/loss\n0,9,0.5,\n0,9,,0.4\n")
    history = read_history(tmp_path)
    assert series(history, "train/loss") == ([9.0], [0.5]) and series(history, "val/loss") == ([9.0], [0.4])


@pytest.mark.slow
def test_plot_draws_several_runs_on_one_figure(dpo_folder, in_tmp, capsys):
    first, second = Path("one/version_0"), Path("two/version_0")
    shutil.copytree(dpo_folder, first)
    shutil.copytree(dpo_folder, second)
    (second / "curves.png").unlink()
    main(["plot", str(first), str(second), "--output", "both.png", "--title", "two runs"])
    assert Path("both.png").read_bytes()[:8] == PNG_MAGIC
    assert "wrote both.png (2 runs)" in capsys.readouterr().out
    from lit_align.commands.plot import run_labels

    assert run_labels([str(first), str(second)]) == [str(first), str(second)]  # same names: longer paths
    assert run_labels(["a/version_0", "b/version_1"]) == ["version_0", "version_1"]


def test_plot_of_a_folder_without_curves_names_it(in_tmp):
    Path("empty").mkdir()
    with pytest.raises(SystemExit) as stop:
        main(["plot", "empty"])
    message, hint = str(stop.value).splitlines()
    assert message == (
        "lit-align plot: 'empty' holds no curves: neither curves.jsonl (written by lit-align fit) nor metrics.csv "
        "(Lightning's CSVLogger)"
    )
    assert hint.startswith("hint: give a run folder, e.g. runs/lightning_logs/version_0")


# ---- the model card and config.yaml of an export -------------------------------------------------------
@pytest.mark.slow
def test_export_of_a_checkpoint_carries_its_card_and_run_config(dpo_folder, in_tmp):
    (checkpoint,) = dpo_folder.rglob("*.ckpt")
    main(["export", "--ckpt_path", str(checkpoint), "--output_dir", "exported"])
    card = Path("exported/README.md").read_text()
    config = yaml.safe_load(Path("exported/config.yaml").read_text())
    assert config == yaml.safe_load((dpo_folder / "config.yaml").read_text())  # the run's own file
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "# DPO of tiny" in card
    assert "| method | `lit_align.methods.dpo.DPO`: Direct Preference Optimization (Rafailov et al. 2023)" in card
    assert "| training data | the built-in word-rules task |" in card
    assert "| held-out data | the built-in task's held-out split |" in card and "| steps | 40 |" in card
    accuracy = _csv_column(dpo_folder, "val/rewards/accuracies")[-1]
    assert f"| `val/rewards/accuracies` | {float(accuracy):.4g} |" in card  # the metric when it was saved
    import torch
    import transformers

    assert f"| torch | {torch.__version__} |" in card and f"| transformers | {transformers.__version__} |" in card
    with pytest.raises(SystemExit):  # the saved configuration is one lit-align fit reads as it is
        main(["fit", "--config", "exported/config.yaml", "--print_config"])


@pytest.mark.slow
def test_export_at_the_end_of_fit_carries_its_card(sft_policy):
    card = (sft_policy / "README.md").read_text()
    config = yaml.safe_load((sft_policy / "config.yaml").read_text())
    assert config["model"]["class_path"] == "lit_align.methods.SFT"
    assert "# SFT of tiny" in card and "| weights | full fine-tuning |" in card
    assert "| `val/loss` |" in card and "| `val/perplexity` |" in card


# ---- progress of long phases ----------------------------------------------------------------------------
def test_progress_without_a_terminal_logs_a_start_and_an_end_line(caplog):
    with caplog.at_level(logging.INFO, logger="lit_align"), progress(3, "reference log-probs", "examples") as bar:
        bar.update(3)
    lines = [record.getMessage() for record in caplog.records]
    assert lines[0] == "reference log-probs: 3 examples"
    assert lines[1].startswith("reference log-probs: done in ") and lines[1].endswith(" s")
    assert bar.disable  # not drawn: stderr is not a terminal under pytest
