"""Shared test fixtures, and the seed of the tests that assert learning."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test downloads; a hub lookup fails at once instead of timing out

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


@pytest.fixture
def measured(record_property):
    """``measured(name, values)``: keep the numbers a learning test asserts on (as a junit XML
    property, read by ``benchmarks/learning_spread.py``) and return them."""

    def record(name: str, values):
        record_property(name, json.dumps(values))
        return values

    return record


@pytest.fixture
def tokenizer():
    """The built-in byte-level tokenizer with a chat template (no download)."""
    return build_tiny_tokenizer()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Keep every test's tokenized cache in its own temporary folder, never ~/.cache."""
    monkeypatch.setenv("LIT_ALIGN_CACHE", str(tmp_path / "lit-align-cache"))


@pytest.fixture(scope="session")
def sft_policy(tmp_path_factory):
    """configs/sft.yaml run once per test session: the starting policy (outputs/sft) of every
    on-policy config. Its held-out NLL per completion token must fall by more than 3 nats
    (measured 5.5 -> 0.80-1.16 over seeds 0-5). Seeded by ``LIT_ALIGN_TEST_SEED`` (the run and the
    tiny model's initialisation)."""
    import csv
    from pathlib import Path

    from lit_align.cli import main

    folder = tmp_path_factory.mktemp("sft")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setenv("LIT_ALIGN_CACHE", str(folder / "lit-align-cache"))
        main(
            [
                "fit",
                "--config",
                str(Path(__file__).resolve().parents[1] / "configs" / "sft.yaml"),
                "--trainer.enable_checkpointing",
                "false",
                "--trainer.enable_progress_bar",
                "false",
                "--trainer.enable_model_summary",
                "false",
                "--seed_everything",
                str(LEARNING_SEED),
                "--model.init_args.model.tiny.seed",
                str(LEARNING_SEED),
            ]
        )
        (metrics,) = Path("runs").rglob("metrics.csv")
        with open(metrics) as handle:
            losses = [float(row["val/loss"]) for row in csv.DictReader(handle) if row.get("val/loss")]
    assert losses[-1] < losses[0] - 3.0, losses
    return folder / "outputs" / "sft"


@pytest.fixture
def in_sft_workdir(sft_policy, tmp_path, monkeypatch):
    """A fresh working directory whose outputs/sft is the SFT policy, as the on-policy configs expect."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "sft").symlink_to(sft_policy)
    return tmp_path
