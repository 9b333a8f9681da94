"""A run's curves: the history file a run writes and the figure drawn from one run or several.

A run folder holds ``curves.jsonl`` (written by :class:`lit_align.callbacks.Curves`: one JSON
object per logged step, ``{"step": k, "train/loss": ..., "lr": ...}``, validations as their own
lines with ``val/...`` keys). A folder written by Lightning's ``CSVLogger`` alone (``metrics.csv``)
is read too. The figure has one panel per kind of curve the runs logged, in :data:`PANELS` order
(loss, preference accuracy, reward, margin, KL, learning rate, perplexity); each run is a colour,
training a thin line, held-out values a thicker line with markers.

matplotlib is a dependency of lit-align (the figure is part of every ``fit``); it draws with the
file-only ``Agg`` backend, so no display is needed.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from lit_align.errors import LitAlignError
from lit_align.runtime.atomic import atomic_write_bytes

HISTORY_FILE = "curves.jsonl"
FIGURE_FILE = "curves.png"
LIGHTNING_CSV = "metrics.csv"
STAGES = ("train", "val")

REWARD_CURVES = ("objective/scores", "objective/rlhf_reward", "rewards/chosen", "rewards/rejected", "rewards/mean")
PANELS: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("loss", lambda name: name == "loss"),
    ("preference accuracy", lambda name: name in ("rewards/accuracies", "accuracy")),
    ("reward", lambda name: name in REWARD_CURVES),
    ("margin", lambda name: name in ("rewards/margins", "margin")),
    ("KL", lambda name: name == "kl" or name.endswith("/kl")),
    ("learning rate", lambda name: name == "lr"),
    ("perplexity", lambda name: name == "perplexity"),
)
"""(panel title, which metric names it shows): a metric name without its ``train/``/``val/`` prefix."""

Record = dict[str, float]


class RunFolderError(LitAlignError):
    """A folder given to ``lit-align plot`` that holds no curves."""


def read_history(folder: str | os.PathLike) -> list[Record]:
    """The logged values of the run in ``folder``: its ``curves.jsonl``, else Lightning's
    ``metrics.csv``; :class:`RunFolderError` naming the folder when it has neither."""
    folder = Path(folder)
    history, metrics = folder / HISTORY_FILE, folder / LIGHTNING_CSV
    if history.is_file():
        with open(history, encoding="utf-8") as stream:
            return [json.loads(line) for line in stream if line.strip()]
    if metrics.is_file():
        with open(metrics, encoding="utf-8", newline="") as stream:
            return [
                {key: float(value) for key, value in row.items() if value not in ("", None)}
                for row in csv.DictReader(stream)
            ]
    error = RunFolderError(
        f"{str(folder)!r} holds no curves: neither {HISTORY_FILE} (written by lit-align fit) nor {LIGHTNING_CSV} "
        "(Lightning's CSVLogger)"
    )
    error.hint = "give a run folder, e.g. runs/lightning_logs/version_0"
    raise error


def series(history: Sequence[Record], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one metric, finite values only, in step order."""
    points = sorted(
        (record["step"], record[key])
        for record in history
        if key in record and "step" in record and math.isfinite(record[key])
    )
    return [step for step, _ in points], [value for _, value in points]


def panels_of(runs: Mapping[str, Sequence[Record]]) -> list[tuple[str, list[str]]]:
    """(title, metric keys) of each panel that has data in some run, in :data:`PANELS` order."""
    keys = sorted({key for history in runs.values() for record in history for key in record} - {"step", "epoch"})
    chosen = []
    for title, shows in PANELS:
        matching = [key for key in keys if shows(key.partition("/")[2] if key.startswith(STAGES) else key)]
        if matching:
            chosen.append((title, matching))
    return chosen


def draw(runs: Mapping[str, Sequence[Record]], path: str | os.PathLike, title: str | None = None) -> Path:
    """Draw the curves of ``runs`` (label -> history) into the PNG ``path`` (written atomically)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    panels = panels_of(runs)
    if not panels:
        raise RunFolderError(f"no curves to draw: the runs logged none of {', '.join(t for t, _ in PANELS)}")
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.8 * columns, 3.4 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axis, (panel, keys) in zip(axes.flat, panels, strict=False):
        for number, (label, history) in enumerate(runs.items()):
            for key in keys:
                steps, values = series(history, key)
                if not steps:
                    continue
                held_out = key.startswith("val/")
                axis.plot(
                    steps,
                    values,
                    color=colours[number % len(colours)],
                    linewidth=2.0 if held_out else 0.9,
                    alpha=1.0 if held_out else 0.6,
                    marker="o" if held_out else None,
                    markersize=3,
                    label=f"{label}: {key}" if len(runs) > 1 else key,
                )
        axis.set_title(panel)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(panels) :]:
        axis.set_visible(False)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    atomic_write_bytes(buffer.getvalue(), path)
    return Path(path)
