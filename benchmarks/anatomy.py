"""Forward-pass anatomy: what each objective costs per step, side by side in one run.

    python benchmarks/anatomy.py            # full run, about 10 minutes on 2 CPU cores
    python benchmarks/anatomy.py --quick    # smoke run
    python benchmarks/anatomy.py --device cuda --dtype bfloat16                  # on a GPU (benchmarks/gpu.sh)
    python benchmarks/anatomy.py --device cuda --dtype bfloat16 --shape 1b \
        --variants "DPO, cached reference" --peak-tflops 989 --name mfu_1b     # MFU at ~1B parameters

Per variant (fresh process each, variants alternated over rounds, medians reported): sequence
forwards per pair (DPO with an online reference: 4 = chosen+rejected through the policy and
through the reference; ORPO: 2), model calls per step (the concatenated forward makes chosen and
rejected one call), analytic FLOPs per pair as run (LM head on response tokens only), the ratio of
FLOPs counted by torch's FlopCounterMode to the analytic count on the eager full-logits path
(where every matmul is visible to the counter), median step time, tokens/s and the peak RSS
growth of the training steps (on CUDA: peak allocated device memory), model TFLOP/s (analytic
FLOPs over step time) and, given the device's peak (``--peak-tflops``, dense, in the run's dtype),
the model FLOPs utilisation. Data: Anthropic HH pairs from ../shared/data (real lengths).
Writes benchmarks/results/<name>.csv and <name>.png (name: anatomy); prints a markdown table.
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


SHAPES = {
    "small": dict(
        hidden=512, layers=4, heads=8, intermediate=1376, vocab=32000, batch=4, steps=10, warmup=2, max_length=256
    ),
    "quick": dict(
        hidden=64, layers=2, heads=4, intermediate=128, vocab=1000, batch=2, steps=3, warmup=1, max_length=64
    ),
    # a Llama of about 1B parameters (0.95B: 16 layers of width 2048, 32k vocabulary), for MFU on a GPU
    "1b": dict(
        hidden=2048, layers=16, heads=16, intermediate=5632, vocab=32000, batch=8, steps=10, warmup=3, max_length=512
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round (--shape quick)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small", help="model and batch shape")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--variants", nargs="+", help="labels of the variants to run (default: all)")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense peak in --dtype: adds an MFU column")
    parser.add_argument("--name", default="anatomy", help="results file name")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if args.quick:
        args.shape, args.rounds = "quick", 1
    size = dict(SHAPES[args.shape], device=args.device, dtype=args.dtype, peak_tflops=args.peak_tflops)
    variants = [v for v in VARIANTS if args.variants is None or v[0] in args.variants]
    unknown = set(args.variants or ()) - {v[0] for v in VARIANTS}
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {[v[0] for v in VARIANTS]}")
    results: dict[str, list[dict]] = {label: [] for label, *_ in variants}
    for round_index in range(args.rounds):
        order = variants if round_index % 2 == 0 else variants[::-1]
        for label, method, reference, lora in order:
            spec = dict(size, method=method, reference=reference, lora=lora, count_flops=round_index == 0)
            print(f"round {round_index + 1}: {label}", file=sys.stderr, flush=True)
            results[label].append(run_worker(HERE / "_steps.py", [__import__("json").dumps(spec)], timeout=1800))
    orpo = {
        lora: median(r["step_s"] for r in results[label])
        for label, lora in (("ORPO", False), ("ORPO + LoRA", True))
        if label in results
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
        "model TFLOP/s",
        *(["MFU"] if args.peak_tflops else []),
    ]
    rows = []
    for label, _method, _reference, lora in variants:
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
                f"{step / orpo[lora]:.2f}" if lora in orpo else "n/a",
                f"{median(r['tokens_per_s'] for r in runs):.0f}",
                f"{median(r['peak_step_mib'] for r in runs):.0f}",
                f"{median(r['model_tflops_per_s'] for r in runs):.3f}",
                *([f"{median(r['mfu'] for r in runs):.3f}"] if args.peak_tflops else []),
            ]
        )
    memory = "peak allocated device memory" if args.device == "cuda" else "peak RSS growth"
    report(
        args.out,
        args.name,
        header,
        rows,
        f"Model: Llama hidden {size['hidden']}, {size['layers']} layers, vocab {size['vocab']}; "
        f"{size['batch']} HH pairs per step, max_length {size['max_length']}, {args.dtype} on {args.device} "
        f"({memory}), {args.rounds} round(s).",
        plot,
    )


def plot(plt, rows: list[list]):
    """Step time relative to ORPO per variant; model TFLOP/s when ORPO was not run (--variants)."""
    relative = all(row[6] != "n/a" for row in rows)
    labels = [row[0] for row in rows][::-1]
    values = [float(row[6] if relative else row[9]) for row in rows][::-1]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.barh(labels, values, color=["#4c72b0" if "LoRA" not in label else "#dd8452" for label in labels])
    if relative:
        ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("step time relative to ORPO (same fine-tuning mode)" if relative else "model TFLOP/s")
    ax.set_title("Cost of a preference step by objective and reference strategy")
    return fig


if __name__ == "__main__":
    main()
