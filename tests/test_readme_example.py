"""The README's "write your own loss" example, run exactly as printed."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from conftest import metrics_table, seed_flags, short_run_flags

from lit_align.cli import main

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    return re.search(r"## Write your own loss.*?```python\n(.*?)```", text, re.S).group(1)


def test_example_is_at_most_20_lines():
    assert len(readme_example().strip().splitlines()) <= 20


@pytest.mark.slow
def test_example_trains_through_the_cli_as_the_readme_says(tmp_path, monkeypatch, measured):
    (tmp_path / "my_losses.py").write_text(readme_example())
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("my_losses", None)
    main(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "dpo.yaml"),
            "--model",
            "my_losses.MarginDPO",
            "--model.delta",
            "1.0",
            *short_run_flags(80),
            "--trainer.enable_progress_bar",
            "false",
            *seed_flags(),
        ]
    )
    import my_losses

    assert my_losses.MarginDPO.loss is not my_losses.PairedPreferenceModule.loss
    rows = metrics_table()
    accuracies = measured(
        "val/rewards/accuracies", [float(r["val/rewards/accuracies"]) for r in rows if r.get("val/rewards/accuracies")]
    )
    assert accuracies[0] <= 0.65 and accuracies[-1] >= 0.8
    (config,) = Path("runs").rglob("config.yaml")
    assert "class_path: my_losses.MarginDPO" in config.read_text() and "delta: 1.0" in config.read_text()
