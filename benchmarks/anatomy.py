"""Forward-pass anatomy: what each objective costs per step, side by side in one run.

    python benchmarks/anatomy.py            # full run, about 10 minutes on 2 CPU cores
    python benchmarks/anatomy.py --quick    # smoke run

Per variant (fresh process each, variants alternated over rounds, medians reported): sequence
forwards per pair (DPO with an online reference: 4 = chosen+rejected through the policy and
through the reference; ORPO: 2), model calls per step (the concatenated forward makes chosen and
rejected one call), analytic FLOPs per pair as run (LM head on response tokens only), the ratio of
FLOPs counted by torch's FlopCounterMode to the analytic count on the eager full-logits path
(where every matmul is visible to the counter), median step time, tokens/s and the peak RSS
growth of the training steps. Data: Anthropic HH pairs from ../shared/data (real lengths).
Writes benchmarks/results/anatomy.csv and anatomy.png; prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import median, run_worker  # noqa: E402
from _report import report  # noqa: E402

VARIANTS = [  # (label, method, reference, lora)
    ("DPO, frozen-copy reference", "DPO", "copy", False),
    ("DPO, cached reference", "DPO", "cached", False),
    ("IPO, frozen-copy reference", "IPO", "copy", False),
    ("ORPO", "ORPO", "none", False),
    ("SimPO", "SimPO", "none", False),
    ("CPO", "CPO", "none", False),
    ("DPO + LoRA, adapter reference", "DPO", "adapter", True),
    ("DPO + LoRA, cached reference", "DPO", "cached", True),
    ("ORPO + LoRA", "ORPO", "none", True),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    size = dict(
        hidden=512, layers=4, heads=8, intermediate=1376, vocab=32000, batch=4, steps=10, warmup=2, max_length=256
    )
    if args.quick:
        size = dict(
            hidden=64, layers=2, heads=4, intermediate=128, vocab=1000, batch=2, steps=3, warmup=1, max_length=64
        )
        args.rounds = 1
    results: dict[str, list[dict]] = {label: [] for label, *_ in VARIANTS}
    for round_index in range(args.rounds):
        order = VARIANTS if round_index % 2 == 0 else VARIANTS[::-1]
        for label, method, reference, lora in order:
            spec = dict(size, method=method, reference=reference, lora=lora, count_flops=round_index == 0)
            print(f"round {round_index + 1}: {label}", file=sys.stderr, flush=True)
            results[label].append(run_worker(HERE / "_steps.py", [__import__("json").dumps(spec)], timeout=1800))
    orpo = {
        False: median(r["step_s"] for r in results["ORPO"]),
        True: median(r["step_s"] for r in results["ORPO + LoRA"]),
    }
    header = [
        "variant",
        "seq. forwards / pair",
        "model calls / step",
        "GFLOPs / pair (analytic)",
        "counted / analytic",
        "step s (median)",
        "x ORPO",
        "tokens/s",
        "peak step MiB",
    ]
    rows = []
    for label, _method, _reference, lora in VARIANTS:
        runs = results[label]
        step = median(r["step_s"] for r in runs)
        rows.append(
            [
                label,
                runs[0]["sequence_forwards_per_pair"],
                runs[0]["model_calls_per_step"],
                f"{runs[0]['flops_per_pair'] / 1e9:.2f}",
                f"{runs[0]['counted_over_analytic']:.3f}",
                f"{step:.3f}",
                f"{step / orpo[lora]:.2f}",
                f"{median(r['tokens_per_s'] for r in runs):.0f}",
                f"{median(r['peak_step_mib'] for r in runs):.0f}",
            ]
        )
    report(
        args.out,
        "anatomy",
        header,
        rows,
        f"Model: tiny Llama hidden {size['hidden']}, {size['layers']} layers, vocab {size['vocab']}; "
        f"{size['batch']} HH pairs per step, max_length {size['max_length']}, fp32, {args.rounds} round(s).",
        plot,
    )


def plot(plt, rows: list[list]):
    labels = [row[0] for row in rows]
    ratios = [float(row[6]) for row in rows]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.barh(
        labels[::-1], ratios[::-1], color=["#4c72b0" if "LoRA" not in label else "#dd8452" for label in labels[::-1]]
    )
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("step time relative to ORPO (same fine-tuning mode)")
    ax.set_title("Cost of a preference step by objective and reference strategy")
    return fig


if __name__ == "__main__":
    main()
