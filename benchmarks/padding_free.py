"""Padded vs padding-free (packed) batches on the length distribution of Anthropic HH pairs.

    python benchmarks/padding_free.py            # full run, a few minutes on 2 CPU cores
    python benchmarks/padding_free.py --quick    # smoke run

Same model, same pairs, same objective (ORPO and DPO with a cached reference, i.e. one model call
per step); the only difference is the collator. Each variant runs in a fresh process, alternated
over rounds; real (non-padding) tokens per second are compared. Writes
benchmarks/results/padding_free.csv and padding_free.png; prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import median, run_worker  # noqa: E402
from _report import report  # noqa: E402

VARIANTS = [("ORPO", "none"), ("DPO", "cached")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    size = dict(
        hidden=256,
        layers=4,
        heads=4,
        intermediate=688,
        vocab=32000,
        batch=8,
        steps=8,
        warmup=1,
        max_length=1024,
        lora=False,
    )
    if args.quick:
        size.update(hidden=64, layers=2, intermediate=128, vocab=1000, batch=2, steps=3, warmup=1, max_length=128)
        args.rounds = 1
    results: dict[tuple, list[dict]] = {}
    for round_index in range(args.rounds):
        for method, reference in VARIANTS:
            for packing in (False, True) if round_index % 2 == 0 else (True, False):
                spec = dict(size, method=method, reference=reference, packing=packing)
                print(f"round {round_index + 1}: {method} packing={packing}", file=sys.stderr, flush=True)
                results.setdefault((method, packing), []).append(
                    run_worker(HERE / "_steps.py", [json.dumps(spec)], timeout=1800)
                )
    header = ["objective", "batches", "tokens/s (median)", "x padded", "step s (median)", "peak step MiB"]
    rows = []
    for method, _ in VARIANTS:
        padded = median(r["tokens_per_s"] for r in results[(method, False)])
        for packing in (False, True):
            runs = results[(method, packing)]
            speed = median(r["tokens_per_s"] for r in runs)
            rows.append(
                [
                    method,
                    "packed" if packing else "padded",
                    f"{speed:.0f}",
                    f"{speed / padded:.2f}",
                    f"{median(r['step_s'] for r in runs):.3f}",
                    f"{median(r['peak_step_mib'] for r in runs):.0f}",
                ]
            )
    report(
        args.out,
        "padding_free",
        header,
        rows,
        f"Model: tiny Llama hidden {size['hidden']}, {size['layers']} layers, vocab {size['vocab']}; {size['batch']} "
        "HH pairs "
        f"per step, max_length {size['max_length']} (keep_end truncation), fp32, sdpa, {args.rounds} round(s).",
        plot,
    )


def plot(plt, rows: list[list]):
    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = [f"{row[0]}\n{row[1]}" for row in rows]
    ax.bar(labels, [float(row[2]) for row in rows], color=["#4c72b0", "#55a868"] * (len(rows) // 2))
    ax.set_ylabel("real tokens / s")
    ax.set_title("Padded vs padding-free batches (HH lengths)")
    return fig


if __name__ == "__main__":
    main()
