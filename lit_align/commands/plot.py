"""``lit-align plot RUN_DIR [RUN_DIR ...]``: the curves of one or several runs on one figure."""

from __future__ import annotations

import os
from pathlib import Path

from lit_align.report.curves import FIGURE_FILE, draw, read_history


def run_labels(folders: list[str]) -> list[str]:
    """A short, distinct label per run folder: its name, or more of its path where names repeat
    (``version_0`` of two experiments becomes ``dpo/lightning_logs/version_0`` and ``ipo/...``)."""
    paths = [Path(os.path.normpath(folder)) for folder in folders]
    depth = 1
    while depth < max(len(path.parts) for path in paths):
        labels = ["/".join(path.parts[-depth:]) for path in paths]
        if len(set(labels)) == len(labels):
            return labels
        depth += 1
    return [str(path) for path in paths]


def plot_main(argv: list[str]) -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(
        prog="lit-align plot",
        description="Draw the curves (loss, accuracy or reward, margins, KL, learning rate) of one or more runs on "
        "one figure. A run folder is where fit wrote curves.jsonl (e.g. runs/lightning_logs/version_0); a folder "
        "with Lightning's metrics.csv works too.",
    )
    parser.add_argument("runs", type=str, nargs="+", help="Run folders.")
    parser.add_argument(
        "--output",
        type=str,
        default=None,
        help=f"PNG to write (default: {FIGURE_FILE} in the run folder for one run, ./{FIGURE_FILE} for several).",
    )
    parser.add_argument("--title", type=str, default=None, help="Title above the panels.")
    args = parser.parse_args(argv)
    folders = list(args.runs)
    histories = {label: read_history(folder) for label, folder in zip(run_labels(folders), folders, strict=True)}
    output = args.output or (os.path.join(folders[0], FIGURE_FILE) if len(folders) == 1 else FIGURE_FILE)
    path = draw(histories, output, title=args.title)
    print(f"wrote {path} ({len(folders)} run{'s' if len(folders) > 1 else ''})")
