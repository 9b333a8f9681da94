"""Peak memory and step time of per-token log-probs: naive full logits vs chunked from hidden states.

Three variants of one fp32 training step (forward ``Backbone.logps(batch).sum.sum()``, backward):

* ``naive``          - ``logp_chunk_size=None``: ``model(...).logits`` then log-softmax ([N, T, V] logits)
* ``chunked``        - ``logp_chunk_size=1024``: lit_align.model.logprobs' chunked autograd function
* ``chunked+ckpt``   - chunked plus per-layer gradient checkpointing

Each (vocab, variant) runs in a fresh worker process (``--worker``), variants alternating
A/B/C, ``--repeats`` times. A worker builds the model and batch, then measures the RSS
high-water mark over 1 warm-up + ``--steps`` timed steps minus the RSS just before them
(see ``_common.PeakRSS``), the median step time, and finally (outside the measurement) the max
abs difference between chunked and naive log-probs. The parent prints a markdown table and
writes ``benchmarks/results/logits_vs_chunked.{csv,png}``.

    python benchmarks/logits_vs_chunked.py            # full run (~6 min on 2 idle cores)
    python benchmarks/logits_vs_chunked.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

from _common import (
    PeakRSS,
    emit,
    machine_summary,
    markdown_table,
    median,
    run_worker,
    wait_for_idle,
)

HERE = Path(__file__).resolve().parent
VARIANTS = ("naive", "chunked", "chunked+ckpt")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--vocabs", type=int, nargs="+", default=[32000, 128256], help="vocabulary sizes to compare")
    p.add_argument("--hidden", type=int, default=256, help="hidden size")
    p.add_argument("--layers", type=int, default=2, help="decoder layers")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--intermediate", type=int, default=512, help="MLP width")
    p.add_argument("--batch", type=int, default=8, help="rows per batch")
    p.add_argument("--seq", type=int, default=512, help="tokens per row")
    p.add_argument("--prompt-frac", type=float, default=0.25, help="leading fraction of each row masked out (-100)")
    p.add_argument("--chunk", type=int, default=1024, help="logp_chunk_size of the chunked variants")
    p.add_argument("--steps", type=int, default=5, help="timed steps per worker (after 1 warm-up)")
    p.add_argument("--repeats", type=int, default=2, help="fresh processes per (vocab, variant)")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the workers, unless already set")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=90.0,
        help="before each worker, wait (up to 10 min) until the host is this %% idle; 0 = don't",
    )
    p.add_argument("--out-dir", type=Path, default=HERE / "results", help="where the CSV and PNG go")
    p.add_argument("--quick", action="store_true", help="smoke run: small vocabs and model, 1 repeat")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.vocabs, args.hidden, args.intermediate = [4096, 16384], 64, 128
        args.batch, args.seq, args.chunk, args.steps, args.repeats = 2, 128, 64, 2, 1
    return args


# ----------------------------------------------------------------------------------------- worker
def make_batch(args, vocab: int):
    import torch

    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
    labels = input_ids.clone()
    labels[:, : int(args.seq * args.prompt_frac)] = -100  # the "prompt": no log-probs there
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def worker(args) -> dict:
    import torch

    from lit_align.model.backbone import Backbone
    from lit_align.settings import ModelSettings, TinyModel

    torch.manual_seed(0)
    tiny = TinyModel(
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        intermediate_size=args.intermediate,
        vocab_size=args.vocab,
        max_position_embeddings=max(512, args.seq),
    )
    settings = ModelSettings(
        tiny=tiny,
        dtype="float32",
        logp_chunk_size=None if args.variant == "naive" else args.chunk,
        gradient_checkpointing=args.variant == "chunked+ckpt",
    )
    backbone = Backbone(settings, needs_reference=False).train()
    batch = make_batch(args, args.vocab)

    def step() -> tuple[float, float]:
        """(wall s, process CPU s) of one step; CPU time is less sensitive to other load on the host."""
        backbone.zero_grad(set_to_none=True)  # as an optimizer would: grads are part of the step's memory
        wall, cpu = time.perf_counter(), time.process_time()
        backbone.logps(batch).sum.sum().backward()
        return time.perf_counter() - wall, time.process_time() - cpu

    with PeakRSS() as rss:  # warm-up + timed steps; the peak is over all of them
        step()
        times = [step() for _ in range(args.steps)]

    # correctness (outside the measurement): chunked vs naive log-probs on the same weights, fp32
    with torch.no_grad():
        backbone.settings.logp_chunk_size = None
        naive = backbone.logps(batch).tokens
        backbone.settings.logp_chunk_size = args.chunk
        chunked = backbone.logps(batch).tokens
    return {
        "vocab": args.vocab,
        "variant": args.variant,
        "peak_mib": rss.delta / 2**20,
        "ru_maxrss_mib": rss.ru_delta / 2**20,
        "hwm_reset": rss.resettable,
        "step_s": median(t[0] for t in times),
        "cpu_s": median(t[1] for t in times),
        "all_step_s": [round(t[0], 4) for t in times],
        "max_abs_diff": (naive - chunked).abs().max().item(),
        "params": sum(p.numel() for p in backbone.parameters()),
        "threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------------------- parent
def worker_args(args, vocab: int, variant: str) -> list[str]:
    return [
        "--worker",
        "--variant",
        variant,
        "--vocab",
        str(vocab),
        "--hidden",
        str(args.hidden),
        "--layers",
        str(args.layers),
        "--heads",
        str(args.heads),
        "--intermediate",
        str(args.intermediate),
        "--batch",
        str(args.batch),
        "--seq",
        str(args.seq),
        "--prompt-frac",
        str(args.prompt_frac),
        "--chunk",
        str(args.chunk),
        "--steps",
        str(args.steps),
    ]


def summarise(runs: list[dict], vocabs: list[int]) -> list[dict]:
    """Medians over the fresh processes of each (vocab, variant), with ratios to naive."""
    rows = []
    for vocab in vocabs:
        for variant in VARIANTS:
            mine = [r for r in runs if r["vocab"] == vocab and r["variant"] == variant]
            rows.append(
                {
                    "vocab": vocab,
                    "variant": variant,
                    "processes": len(mine),
                    "peak_mib": median(r["peak_mib"] for r in mine),
                    "ru_maxrss_mib": median(r["ru_maxrss_mib"] for r in mine),
                    "step_s": median(r["step_s"] for r in mine),
                    "cpu_s": median(r["cpu_s"] for r in mine),
                    "max_abs_diff": max(r["max_abs_diff"] for r in mine),
                }
            )
        naive = rows[-len(VARIANTS)]
        for row in rows[-len(VARIANTS) :]:
            row["mem_vs_naive_pct"] = 100.0 * (row["peak_mib"] / naive["peak_mib"] - 1.0)
            row["time_vs_naive_x"] = row["step_s"] / naive["step_s"]
            row["cpu_vs_naive_x"] = row["cpu_s"] / naive["cpu_s"]
    return rows


def plot(rows: list[dict], vocabs: list[int], path: Path, caption: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    width = 0.8 / len(VARIANTS)
    for i, variant in enumerate(VARIANTS):
        values = [next(r["peak_mib"] for r in rows if r["vocab"] == v and r["variant"] == variant) for v in vocabs]
        bars = ax.bar([x + (i - 1) * width for x in range(len(vocabs))], values, width, label=variant)
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks(range(len(vocabs)), [f"vocab {v:,}" for v in vocabs])
    ax.set_ylabel("peak step memory (RSS delta, MiB)")
    ax.set_title("Log-probs: naive logits vs chunked (fp32 train step)", fontsize=10)
    ax.text(0.0, -0.16, caption, transform=ax.transAxes, fontsize=7, va="top")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        emit(worker(args))
        return
    shape = (
        f"hidden {args.hidden}, {args.layers} layers, {args.heads} heads, MLP {args.intermediate}, "
        f"batch {args.batch}x{args.seq} tokens, chunk {args.chunk}, fp32"
    )
    print(f"# logits vs chunked log-probs: {shape}\n# machine: {machine_summary()}")
    print(f"# load average at the start: {os.getloadavg()}")
    runs = []
    for vocab in args.vocabs:
        for repeat in range(args.repeats):
            for variant in VARIANTS:  # A/B/C alternate, each in a fresh process
                idle = wait_for_idle(args.wait_idle) if args.wait_idle > 0 else None
                r = run_worker(__file__, worker_args(args, vocab, variant), threads=args.threads)
                idle_note = "" if idle is None else f" [host {idle:.0f}% idle before]"
                print(
                    f"  vocab {vocab:>6} {variant:<13} run {repeat + 1}{idle_note}: peak {r['peak_mib']:8.1f} MiB "
                    f"(ru_maxrss {r['ru_maxrss_mib']:8.1f}), step {r['step_s']:.3f} s (cpu {r['cpu_s']:.3f} s), "
                    f"max|chunked-naive| {r['max_abs_diff']:.2e}, steps {r['all_step_s']}",
                    flush=True,
                )
                runs.append(r)
    rows = summarise(runs, args.vocabs)
    print(f"# load average at the end (other work on the host skews wall times): {os.getloadavg()}")

    header = [
        "vocab",
        "variant",
        "peak step memory MiB",
        "memory vs naive %",
        "median step s",
        "time vs naive x",
        "CPU time vs naive x",
    ]
    table = [
        [
            f"{r['vocab']:,}",
            r["variant"],
            f"{r['peak_mib']:.0f}",
            f"{r['mem_vs_naive_pct']:+.1f}",
            f"{r['step_s']:.3f}",
            f"{r['time_vs_naive_x']:.2f}",
            f"{r['cpu_vs_naive_x']:.2f}",
        ]
        for r in rows
    ]
    print("\n" + markdown_table(header, table))
    print(f"\nmax |chunked - naive| log-prob over all workers (fp32): {max(r['max_abs_diff'] for r in rows):.2e}")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = args.out_dir / "logits_vs_chunked.csv", args.out_dir / "logits_vs_chunked.png"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args.vocabs, png_path, shape + f"; median of {args.repeats} fresh processes")
    print(f"wrote {csv_path} and {png_path}")


if __name__ == "__main__":
    main()
