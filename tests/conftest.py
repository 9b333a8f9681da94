"""Shared test fixtures and helpers, and the seed of the tests that assert learning."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test downloads; a hub lookup fails at once instead of timing out

import lightning  # noqa: E402
import pytest  # noqa: E402

from lit_align.model.tiny import build_tiny_tokenizer  # noqa: E402

LEARNING_SEED = int(os.environ.get("LIT_ALIGN_TEST_SEED", "0"))
"""Seed of every test that asserts learning: the run's ``seed_everything``, the data's shuffling
seed and the tiny model's initialisation. 0 (the configs' own seeds) unless ``LIT_ALIGN_TEST_SEED``
says otherwise; ``benchmarks/learning_spread.py`` runs the learning tests with several seeds and
reports the spread of what they assert on."""


def seed_flags(seed: int = LEARNING_SEED) -> list[str]:
    """CLI flags that give a run ``seed`` everywhere a config fixes a seed."""
    return [
        "--seed_everything",
        str(seed),
        "--data.init_args.seed",
        str(seed),
        "--model.init_args.model.tiny.seed",
        str(seed),
    ]


QUIET_FLAGS = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
"""CLI flags that turn off the progress bar and the model summary."""


def short_run_flags(steps: int) -> list[str]:
    """CLI flags of a run of ``steps`` training steps that validates after the last one and saves no
    checkpoint."""
    return [
        "--trainer.max_steps",
        str(steps),
        "--trainer.val_check_interval",
        str(steps),
        "--trainer.enable_checkpointing",
        "false",
    ]


QUIET_TRAINER = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}
"""``lightning.Trainer`` settings of a test run: no logger, no checkpoints, no progress bar, no model summary."""


def quiet_trainer(**settings) -> lightning.Trainer:
    """A ``lightning.Trainer`` with ``QUIET_TRAINER`` and ``settings`` (which win over it); every
    other argument keeps Lightning's default."""
    return lightning.Trainer(**{**QUIET_TRAINER, **settings})


def metrics_table(folder="runs") -> list[dict[str, str]]:
    """The rows of the one metrics.csv under ``folder`` (the CSV logger's, of a run in the working directory)."""
    (path,) = Path(folder).rglob("metrics.csv")
    with open(path) as handle:
        return list(csv.DictReader(handle))


def metric_rows(name: str, folder="runs") -> list[float]:
    """Values of one metric in the metrics.csv under ``folder``, in logged order."""
    return [float(row[name]) for row in metrics_table(folder) if row.get(name)]


@pytest.fixture
def measured(record_property):
    """``measured(name, values)``: keep the numbers a learning test asserts on (as a junit XML
    property, read by ``benchmarks/learning_spread.py``) and return them."""

    def record(name: str, values):
        record_property(name, json.dumps(values))
        return values

    return record


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """The test's temporary folder as the working directory (the CLI writes runs/ under it)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def tokenizer():
    """The built-in byte-level tokenizer with a chat template (no download)."""
    return build_tiny_tokenizer()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Keep every test's tokenized cache in its own temporary folder, never ~/.cache."""
    monkeypatch.setenv("LIT_ALIGN_CACHE", str(tmp_path / "lit-align-cache"))


def run_ddp_script(name: str, folder: Path, *arguments: str) -> subprocess.CompletedProcess:
    """``tests/scripts/<name>`` in a new process (it starts two DDP processes itself), one thread
    each, the project importable, ``folder`` (then ``arguments``) as its arguments; its output captured."""

    root = Path(__file__).resolve().parents[1]
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
    )
    script = Path(__file__).parent / "scripts" / name
    return subprocess.run(
        [sys.executable, str(script), str(folder), *arguments], env=env, capture_output=True, text=True, timeout=600
    )


def fit_in_folder(folder: Path, config: str, *flags: str) -> None:
    """``lit-align fit --config configs/<config>.yaml <flags>`` with ``folder`` as the working
    directory and its own tokenized cache (for the session fixtures, whose runs later tests read)."""
    from lit_align.cli import main

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setenv("LIT_ALIGN_CACHE", str(folder / "lit-align-cache"))
        main(["fit", "--config", str(Path(__file__).resolve().parents[1] / "configs" / f"{config}.yaml"), *flags])


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory):
    """configs/sft.yaml run once per test session, in the folder returned: its export
    (outputs/sft) is the starting policy of every on-policy config, its checkpoint
    (runs/lightning_logs/version_0/checkpoints/) and config.yaml are what ``lit-align generate``
    and ``eval`` read. Its held-out NLL per completion token must fall by more than 3 nats
    (measured 5.5 -> 0.80-1.16 over seeds 0-5). Seeded by ``LIT_ALIGN_TEST_SEED`` (the run and the
    tiny model's initialisation)."""
    folder = tmp_path_factory.mktemp("sft")
    seed = str(LEARNING_SEED)
    fit_in_folder(folder, "sft", *QUIET_FLAGS, "--seed_everything", seed, "--model.init_args.model.tiny.seed", seed)
    losses = metric_rows("val/loss", folder / "runs")
    assert losses[-1] < losses[0] - 3.0, losses
    return folder


@pytest.fixture(scope="session")
def dpo_run(tmp_path_factory):
    """configs/dpo.yaml trained briefly once per test session (40 steps, validating before
    training and every 20 steps, 16 held-out pairs, one checkpoint), in the folder returned: its
    run folder is runs/lightning_logs/version_0 (samples, curves, config.yaml, checkpoints/), and
    ``pairs.jsonl`` beside it holds the built-in task's first 32 held-out pairs."""
    from lit_align.data.tasks import WordRulesTask

    folder = tmp_path_factory.mktemp("dpo")
    steps = ["--trainer.max_steps", "40", "--trainer.val_check_interval", "20"]
    fit_in_folder(folder, "dpo", *steps, "--data.init_args.task.num_val", "16", *QUIET_FLAGS)
    records = WordRulesTask().split("val")[:32]
    (folder / "pairs.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    return folder


@pytest.fixture(scope="session")
def sft_policy(sft_run):
    """The export (outputs/sft) of :func:`sft_run`: the starting policy of every on-policy config."""
    return sft_run / "outputs" / "sft"


@pytest.fixture(scope="session")
def sft_arithmetic_policy(tmp_path_factory):
    """configs/sft_arithmetic.yaml (650 steps on worked solutions of the reasoning task) run once
    per test session; returns its export (outputs/sft_arithmetic), the starting policy of the
    reasoning configs. Its held-out NLL per completion token must fall by more than 4 nats
    (measured 5.59 -> 0.05 at seed 0). Seeded by ``LIT_ALIGN_TEST_SEED``."""
    folder = tmp_path_factory.mktemp("sft_arithmetic")
    seed = str(LEARNING_SEED)
    fit_in_folder(
        folder, "sft_arithmetic", *QUIET_FLAGS, "--seed_everything", seed, "--model.init_args.model.tiny.seed", seed
    )
    losses = metric_rows("val/loss", folder / "runs")
    assert losses[-1] < losses[0] - 4.0, losses
    return folder / "outputs" / "sft_arithmetic"


@pytest.fixture
def in_sft_arithmetic_workdir(sft_arithmetic_policy, tmp_path, monkeypatch):
    """A fresh working directory whose outputs/sft_arithmetic is the arithmetic SFT policy, as the
    reasoning configs (grpo_arithmetic, grpo_dapo, ...) expect."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "sft_arithmetic").symlink_to(sft_arithmetic_policy)
    return tmp_path


@pytest.fixture
def in_sft_workdir(sft_policy, tmp_path, monkeypatch):
    """A fresh working directory whose outputs/sft is the SFT policy, as the on-policy configs expect."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "sft").symlink_to(sft_policy)
    return tmp_path
