"""Writing benchmark results: CSV next to the plot, and matplotlib when it is installed."""

from __future__ import annotations

import csv
import sys
from pathlib import Path


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])


def pyplot():
    """matplotlib.pyplot with a file backend, or None (a note is printed) when not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: pip install -e '.[bench]' for plots)", file=sys.stderr)
        return None
    return plt


def report(out: Path, name: str, header: list[str], rows: list[list], caption: str, plot) -> None:
    """Write ``out/name.csv``, print the caption, the machine and a markdown table, then save
    the figure that ``plot(plt, rows)`` returns as ``out/name.png`` if matplotlib is there."""
    from _common import machine_summary, markdown_table

    write_csv(out / f"{name}.csv", header, rows)
    print(f"\n{caption}\nMachine: {machine_summary()}\n")
    print(markdown_table(header, rows))
    plt = pyplot()
    if plt is not None:
        figure = plot(plt, rows)
        figure.tight_layout()
        figure.savefig(out / f"{name}.png", dpi=120)
