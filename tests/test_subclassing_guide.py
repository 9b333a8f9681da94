"""docs/subclassing.md: each worked example (paired, unpaired, listwise) trains through the CLI as printed."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from conftest import QUIET_FLAGS, metric_rows, seed_flags, short_run_flags

from lit_align.cli import main

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "subclassing.md"


def example(heading: str) -> str:
    """The python block under the guide's ``## <heading>`` section."""
    return re.search(rf"## {heading}.*?```python\n(.*?)```", GUIDE.read_text(), re.S).group(1)


CASES = [
    ("Paired", "LengthNormalisedDPO", "dpo.yaml", "val/rewards/accuracies"),
    ("Unpaired", "RewardClassifier", "kto.yaml", "val/rewards/margins"),
    ("Listwise", "ListNet", "rrhf.yaml", "val/rewards/accuracies"),
]


@pytest.mark.parametrize("heading, name, config, metric", CASES, ids=[c[0] for c in CASES])
def test_the_guide_names_the_command_it_documents(heading, name, config, metric):
    text = GUIDE.read_text()
    assert f"lit-align fit --config configs/{config} --model my_objectives.{name}" in text
    assert f"class {name}(" in example(heading)
    assert (ROOT / "configs" / config).is_file()


@pytest.mark.slow
@pytest.mark.parametrize("heading, name, config, metric", CASES, ids=[c[0] for c in CASES])
def test_each_worked_example_learns_through_the_cli(heading, name, config, metric, tmp_path, monkeypatch, measured):
    (tmp_path / "my_objectives.py").write_text(example(heading))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("my_objectives", None)
    main(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / config),
            "--model",
            f"my_objectives.{name}",
            *short_run_flags(80),
            *QUIET_FLAGS,
            *seed_flags(),
        ]
    )
    values = measured(metric, metric_rows(metric))
    assert len(values) == 2, values
    if metric.endswith("accuracies"):
        assert values[0] <= 0.65 and values[-1] >= 0.8, values
    else:  # desirable minus undesirable implicit reward: 0 at the start, clearly positive after
        assert abs(values[0]) < 1e-6 and values[-1] > 0.2, values
