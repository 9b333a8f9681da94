"""lit-align GRPO against TRL's GRPOTrainer: numerical parity, then step time and peak memory.

1. Parity (fp32): lit-align's tiny Llama, saved with ``save_pretrained``, is loaded by TRL. One fixed
   rollout (word-rules prompts x ``--parity-samples``; random byte completions of mixed lengths, the
   shorter ones ended by EOS) goes through TRL's own ``_generate_and_score_completions`` (its
   generation replaced by the fixed ids: TRL tokenizes, decodes, scores and computes the advantages
   itself) and through lit-align's ``completion_batch`` / ``Rollout`` / ``GRPO.prepare``. Both
   policies then get the same perturbation; the "old" (sampling) and reference log-probs are each
   framework's own log-probs at the saved weights. Compared, for every loss type both define
   (``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``), beta 0 and ``--parity-beta``, on-policy (old =
   current, the timed setting) and off-policy (old = saved weights, so the clip acts): the per-token
   log-probs, the advantages, the loss (TRL's ``compute_loss``, lit-align's ``GRPO.loss``) and its
   gradients, each within 1e-5 of its scale (max(1, |value|)). TRL's KL term is run with
   ``use_bias_correction_kl=False``: its default multiplies the k3 term by the importance ratio
   (DeepSeek-V3.2), which changes the gradient even on-policy; lit-align's is GRPO's plain k3 (the
   difference is printed).
2. Speed/memory: fresh worker processes alternating lit-align / TRL (``--repeats``): same weights,
   word-rules prompts, ``--prompts`` per step x ``--samples`` completions (group size), plain HF
   ``generate`` (no vLLM), temperature 1, ``--max-new-tokens``, the same deterministic reward
   (share of lowercase letters), ``--loss-type``, ``--beta`` (0: KL-free, neither builds a
   reference), one optimizer step per rollout on all of its completions (lit-align: ``epochs`` 1,
   no ``minibatch_size``; TRL: ``num_iterations`` 1, gradient accumulation and
   ``steps_per_generation`` 1), torch AdamW, cosine schedule, clip 1.0, fp32, sdpa, no gradient
   checkpointing. Sampling differs between the two, so generation lengths would too: both generate
   with ``min_new_tokens = max_new_tokens`` (end-of-turn tokens suppressed), so every completion is
   exactly ``--max-new-tokens`` tokens in both (checked). lit-align: ``lightning.Trainer.fit``, TRL:
   ``GRPOTrainer.train``; a callback times each step (rollout generation, scoring and update: batch
   start -> after the optimizer step). Peak RSS: the worker's VmHWM over its whole life. Targets:
   lit-align step time <= 0.7x TRL's, peak memory <= 0.8x.
3. ``--device cuda``: the workers generate and train on the GPU (parity still runs on CPU); steps
   are timed between ``torch.cuda.synchronize()`` calls and memory is torch's peak allocated CUDA
   memory instead of RSS (benchmarks/gpu.sh runs it).

    python benchmarks/against_trl_grpo.py                  # full run (~15 min on 2 cores)
    python benchmarks/against_trl_grpo.py --quick          # smoke run (under 1 min)
    python benchmarks/against_trl_grpo.py --device cuda    # on a GPU

At the default shape (20.6M parameters, 32 completions of 64 tokens per step) one step takes ~30 s
in either framework on 2 busy cores; the full run is 2 x 2 workers x 6 steps plus start-up and parity.

Each worker first waits (at most 300 s) for the other processes to use at most ``--max-other-load``
cores, and a run that had company is repeated (twice at most); ``--quick`` neither waits nor
repeats. Writes ``benchmarks/results/against_trl_grpo.csv`` and ``.png``. Needs the benchmark
extra: ``pip install trl matplotlib``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import string
import sys
import tempfile
import time
from pathlib import Path

from _common import MIB, run_worker
from _report import report
from against_trl import (
    MODEL_SHAPE_ARGS,
    QUIET,
    StepTimer,
    add_int_args,
    add_run_args,
    device_caption,
    framework_medians,
    memory_label,
    report_worker,
    timed_trainer,
    timing_args,
    wait_for_quiet,
)

HERE = Path(__file__).resolve().parent
FRAMEWORKS = ("lit-align", "trl")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
"""The loss types both frameworks define, with the same normalisation (see the parity check)."""
TARGETS = {"step": 0.7, "peak": 0.8}
"""lit-align / TRL ratios to reach: median step time, peak RSS."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_int_args(
        p,
        (
            *MODEL_SHAPE_ARGS,
            ("prompts", 4, "prompts per step"),
            ("samples", 8, "completions per prompt (group size)"),
            ("max-new-tokens", 64, "completion length (every completion is exactly this long)"),
            ("parity-prompts", 3, "prompts of the parity rollout"),
            ("parity-samples", 4, "completions per prompt of the parity rollout"),
            *timing_args(warmup=1, steps=5),
        ),
    )
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--beta", type=float, default=0.0, help="KL coefficient of the timed runs (0: no reference)")
    p.add_argument("--epsilon", type=float, default=0.2, help="clip range of the ratio (both sides)")
    p.add_argument("--loss-type", choices=LOSS_TYPES, default="dapo", help="loss type of the timed runs")
    p.add_argument("--parity-beta", type=float, default=0.04, help="the KL coefficient parity also checks")
    p.add_argument("--parity-noise", type=float, default=0.02, help="std of the policies' parity perturbation")
    add_run_args(p, quick="smoke run: tiny shape, 2 timed steps, 1 repeat")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.intermediate, args.vocab = 64, 2, 128, 4096
        args.prompts, args.samples, args.max_new_tokens = 2, 4, 16
        args.parity_prompts, args.parity_samples = 2, 4
        args.warmup, args.steps, args.repeats = 1, 2, 1
    return args


# ---------------------------------------------------------------------------- data, reward, models
def lowercase_share(text: str) -> float:
    """The reward: share of the completion's characters that are a-z (0 when empty). Deterministic,
    and it spreads over a group's samples even for an untrained model."""
    return sum(c in string.ascii_lowercase for c in text) / max(1, len(text))


def trl_reward(prompts, completions, **_) -> list[float]:
    """:func:`lowercase_share` as a TRL reward function."""
    return [lowercase_share(c) for c in completions]


def lit_reward():
    """:func:`lowercase_share` as a lit-align reward."""
    from lit_align.online.rewards import RewardFunction

    class LowercaseShare(RewardFunction):
        def score(self, prompts, completions):
            return [lowercase_share(c) for c in completions]

    return LowercaseShare()


def full_length_generation(max_new_tokens: int):
    """lit-align's generation settings with ``min_new_tokens = max_new_tokens`` (as TRL's
    ``generation_kwargs``): end-of-turn tokens are suppressed until the limit."""
    from lit_align.online.rollout import GenerationSettings

    class FullLength(GenerationSettings):
        def config(self, tokenizer, samples, temperature):
            config = super().config(tokenizer, samples, temperature)
            config.min_new_tokens = self.max_new_tokens
            return config

    return FullLength(max_new_tokens=max_new_tokens, temperature=1.0)


def write_prompts(path: Path, n: int) -> None:
    """``n`` prompts of the built-in word-rules task as plain text records."""
    from lit_align.data import WordRulesTask

    records = WordRulesTask(num_train=n, num_val=1, seed=0).split("train")[:n]
    with open(path, "w") as f:
        f.writelines(json.dumps({"prompt": r["prompt"]}) + "\n" for r in records)


def read_prompts(workdir: Path) -> list[str]:
    with open(workdir / "prompts.jsonl") as f:
        return [json.loads(line)["prompt"] for line in f]


def lit_module(args, name_or_path: str = "tiny", beta: float | None = None, full_length: bool = True):
    from lit_align.methods import GRPO
    from lit_align.online.kl_control import KLPenalty
    from lit_align.online.rollout import GenerationSettings
    from lit_align.settings import ModelSettings, OptimizerSettings, TinyModel

    tiny = TinyModel(
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        intermediate_size=args.intermediate,
        max_position_embeddings=512,
        vocab_size=args.vocab,
        seed=0,
    )
    model = ModelSettings(
        name_or_path=name_or_path, tiny=tiny, dtype="float32", attn_implementation="sdpa", logp_chunk_size=args.chunk
    )
    generation = (
        full_length_generation(args.max_new_tokens)
        if full_length
        else GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=1.0)
    )
    return GRPO(
        reward=lit_reward(),
        generation=generation,
        samples_per_prompt=args.samples,
        loss_type=args.loss_type,
        scale_rewards="group",
        epsilon_low=args.epsilon,
        kl=KLPenalty(beta=args.beta if beta is None else beta),
        epochs=1,
        minibatch_size=None,
        max_grad_norm=1.0,
        model=model,
        optimizer=OptimizerSettings(lr=args.lr, warmup_ratio=0.1, schedule="cosine"),
    )


def trl_trainer(
    args,
    workdir: Path,
    max_steps: int,
    prompts: list[str],
    per_step: int,
    samples: int,
    beta: float,
    callbacks=(),
    device: str = "cpu",
):
    """TRL's trainer: ``per_step`` prompts x ``samples`` completions per optimizer step, all generated at once."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    # TRL defaults to gradient checkpointing and bf16; transformers 5 renamed the former
    no_ckpt = {
        "activation_checkpointing"
        if "activation_checkpointing" in GRPOConfig.__dataclass_fields__
        else "gradient_checkpointing": False
    }
    config = GRPOConfig(
        **no_ckpt,
        output_dir=str(workdir / "trl-out"),
        max_steps=max_steps,
        per_device_train_batch_size=per_step * samples,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_iterations=1,
        num_generations=samples,
        max_completion_length=args.max_new_tokens,
        generation_kwargs={"min_new_tokens": args.max_new_tokens},
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=beta,
        use_bias_correction_kl=False,  # lit-align's KL term is GRPO's plain k3 (see the docstring)
        epsilon=args.epsilon,
        loss_type=args.loss_type,
        scale_rewards="group",
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,
        optim="adamw_torch",
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=False,
        use_cpu=device == "cpu",  # parity stays on CPU also where a GPU is there (TRL would take it)
        model_init_kwargs={"dtype": "float32", "attn_implementation": "sdpa"},
        report_to="none",
        save_strategy="no",
        logging_steps=10_000,
        disable_tqdm=True,
        dataloader_num_workers=0,
        log_completions=False,
        seed=0,
    )
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    trainer = GRPOTrainer(
        model=str(workdir / "model"),
        reward_funcs=trl_reward,
        args=config,
        train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
    assert not trainer.args.gradient_checkpointing and trainer.model.dtype == torch.float32
    assert (trainer.ref_model is not None) == (beta != 0)
    return trainer


# ---------------------------------------------------------------------------- 1. parity
def fixed_completions(args, tokenizer, rows: int) -> list[list[int]]:
    """Random byte tokens (plus one id beyond the tokenizer per row when the vocabulary is padded: a
    sampled id that decodes to nothing), lengths 1..max_new_tokens, every third row full length. A
    completion shorter than the limit ends with EOS; a full-length one on odd rows only (truncated
    on even rows), as ``generate`` leaves them."""
    import torch

    gen, limit, out = torch.Generator().manual_seed(2), args.max_new_tokens, []
    for i in range(rows):
        n = limit if i % 3 == 0 else int(torch.randint(1, limit + 1, (1,), generator=gen))
        ids = torch.randint(0, 256, (n,), generator=gen).tolist()
        if args.vocab > len(tokenizer) and n > 1:
            ids[0] = len(tokenizer) + i % (args.vocab - len(tokenizer))
        if n < limit or i % 2 == 1:
            ids[-1] = tokenizer.eos_token_id
        out.append(ids)
    return out


def parity(args, workdir: Path, module) -> dict:
    import torch

    from lit_align.data.tokenize import end_of_turn_ids, tokenize_prompt
    from lit_align.online.rollout import Rollout, completion_batch

    tok, k, limit = module.tokenizer, args.parity_samples, args.max_new_tokens
    module.samples_per_prompt = k  # the parity rollout's group size
    prompts = read_prompts(workdir)[: args.parity_prompts]
    rows = [p for p in prompts for _ in range(k)]
    completions = fixed_completions(args, tok, len(rows))
    stops = end_of_turn_ids(tok)

    # lit-align: the layout its hf backend builds from generate's output (left-padded prompts, completions
    # padded on the right), through the same completion_batch
    ids = [tokenize_prompt(p, tok, 10_000) for p in prompts]
    width, pad = max(map(len, ids)), tok.pad_token_id
    prompt_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids]).repeat_interleave(k, 0)
    prompt_mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids]).repeat_interleave(k, 0)
    generated = torch.tensor([c + [pad] * (limit - len(c)) for c in completions])
    batch, ended = completion_batch(torch.cat([prompt_ids, generated], 1), prompt_mask, stops, pad)
    texts = module.decode(batch)
    scores = module.reward(rows, texts)

    # TRL: its own pipeline from the prompts on, with generate replaced by the fixed completions
    trainer = trl_trainer(args, workdir, max_steps=1, prompts=prompts, per_step=len(prompts), samples=k, beta=0.0)
    assert list(trainer.eos_token_ids) == list(stops), (trainer.eos_token_ids, stops)
    seen = {}

    def fixed_generation(prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        seen["prompt_ids"] = prompt_ids
        return [list(c) for c in completions], None

    trainer._generate_single_turn = fixed_generation
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop; compute_loss reads it
    inputs = trainer._generate_and_score_completions([{"prompt": p} for p in rows])
    assert [list(x) for x in seen["prompt_ids"]] == [x for x in ids for _ in range(k)], "prompt tokenization differs"
    assert torch.equal(inputs["prompt_ids"], prompt_ids) and torch.equal(inputs["prompt_mask"], prompt_mask)
    trl_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    trl_attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    keep = inputs["completion_ids"].shape[1]

    def trl_logps():
        return trainer._get_per_token_logps_and_entropies(trainer.model, trl_ids, trl_attention, keep)[0]

    lit_policy, trl_policy = module.backbone.policy, trainer.model
    with torch.no_grad():  # sampling policy and reference: the saved weights, each framework's own log-probs
        trl_old, lit_old = trl_logps(), module.backbone.logps(batch).tokens
        gen = torch.Generator().manual_seed(1)
        for (name, a), (other, b) in zip(lit_policy.named_parameters(), trl_policy.named_parameters(), strict=True):
            assert name == other and torch.equal(a, b), name
            noise = args.parity_noise * torch.randn(a.shape, generator=gen)
            a.add_(noise)
            b.add_(noise)
        trl_now, lit_pass = trl_logps(), module.forward_rollout(batch)
    lit_mask, trl_mask = lit_pass.logps.mask, inputs["completion_mask"].bool()
    assert torch.equal(lit_mask.sum(1), trl_mask.sum(1)), "completion masks differ"

    def diff(a, b):
        return float((a.detach().double() - b.detach().double()).abs().max())

    result = {
        "rows": len(rows),
        "completion_tokens": int(lit_mask.sum()),
        "token_abs": diff(lit_pass.logps.tokens[lit_mask], trl_now[trl_mask]),
        "token_scale": max(1.0, float(trl_now[trl_mask].abs().max())),
        "cases": [],
    }
    loss_type, trl_loss_type = module.loss_type, trainer.loss_type
    for lt in LOSS_TYPES:
        for beta in (0.0, args.parity_beta):
            for policy in ("on", "off"):
                for p in (*lit_policy.parameters(), *trl_policy.parameters()):
                    p.grad = None
                # lit-align: training_step's path (one update: the update's pass is the sampling pass)
                module.loss_type = lt
                module.kl_controller.beta_value.fill_(beta)
                rollout = Rollout(batch, rows, texts, ended, scores.clone(), ref_logps=lit_old if beta else None)
                current = module.forward_rollout(batch)
                rollout.take_sampling_pass(current)
                if policy == "off":
                    rollout.old_logps = lit_old
                module.prepare(rollout)
                lit_loss, metrics = module.loss(rollout, current)
                lit_loss.backward()
                # TRL: compute_loss on its own inputs
                trainer.loss_type, trainer.beta = lt, beta
                batch_inputs = dict(inputs)
                if policy == "off":
                    batch_inputs["old_per_token_logps"] = trl_old
                if beta:
                    batch_inputs["ref_per_token_logps"] = trl_old
                trl_loss = trainer.compute_loss(trl_policy, batch_inputs)
                trl_loss.backward()
                grads = [
                    (a.grad, b.grad) for a, b in zip(lit_policy.parameters(), trl_policy.parameters(), strict=True)
                ]
                advantages = (rollout.advantages * rollout.mask).sum(1) / rollout.mask.sum(1)
                case = {
                    "loss_type": lt,
                    "beta": beta,
                    "policy": policy,
                    "loss": trl_loss.item(),
                    "loss_abs": diff(lit_loss, trl_loss),
                    "grad_abs": max(diff(a, b) for a, b in grads),
                    "grad_max": max(float(b.abs().max()) for _, b in grads),
                    "advantage_abs": diff(advantages, inputs["advantages"]),
                    "advantage_scale": max(1.0, float(inputs["advantages"].abs().max())),
                    "clipfrac": float(metrics["policy/clipfrac"]),
                }
                case["loss_rel"] = case["loss_abs"] / max(1.0, abs(case["loss"]))
                case["grad_rel"] = case["grad_abs"] / max(1.0, case["grad_max"])
                case["advantage_rel"] = case["advantage_abs"] / case["advantage_scale"]
                result["cases"].append(case)
    # TRL's default KL term (k3 x importance ratio) on the last case (dapo, beta > 0, off-policy): how far
    # its gradient is from plain k3's
    for p in trl_policy.parameters():
        p.grad = None
    trainer.args.use_bias_correction_kl = True
    trainer.compute_loss(trl_policy, batch_inputs).backward()
    plain = [b for _, b in grads]
    result["bias_corrected_kl_grad_abs"] = max(
        diff(p.grad, b) for p, b in zip(trl_policy.parameters(), plain, strict=True)
    )
    trainer.args.use_bias_correction_kl = False
    module.loss_type, trainer.loss_type = loss_type, trl_loss_type

    # fp32: each difference against the scale of the values compared (at least 1); within 1e-5 is parity
    result["token_rel"] = result["token_abs"] / result["token_scale"]
    failed = [("token log-probs", result["token_rel"])] if result["token_rel"] > 1e-5 else []
    for case in result["cases"]:
        for key in ("loss_rel", "grad_rel", "advantage_rel"):
            if case[key] > 1e-5:
                failed.append((f"{case['loss_type']} beta={case['beta']} {case['policy']}-policy {key}", case[key]))
    if failed:
        raise SystemExit("parity FAILED (relative difference > 1e-5): " + "; ".join(f"{n}={v:.3g}" for n, v in failed))
    return result


def print_parity(r: dict) -> None:
    cases = r["cases"]
    print(
        f"parity (fp32, {r['rows']} rows, {r['completion_tokens']} completion tokens, the same token ids in both): "
        f"max |diff| per-token log-prob {r['token_abs']:.1e} (scale {r['token_scale']:.1f}); advantages "
        f"{max(c['advantage_abs'] for c in cases):.1e}; over {len(cases)} cases (loss types "
        f"{', '.join(LOSS_TYPES)} x beta 0 and {cases[-1]['beta']} x on-/off-policy, clipped fraction up to "
        f"{max(c['clipfrac'] for c in cases):.2f}): loss {max(c['loss_abs'] for c in cases):.1e} (rel "
        f"{max(c['loss_rel'] for c in cases):.1e}), gradients {max(c['grad_abs'] for c in cases):.1e} (rel "
        f"{max(c['grad_rel'] for c in cases):.1e}; max |grad| {max(c['grad_max'] for c in cases):.1e})",
        flush=True,
    )
    print("| loss type | beta | policy | TRL loss | loss abs diff | grad abs diff | max abs grad | clipped |")
    print("|---|---|---|---|---|---|---|---|")
    for c in cases:
        print(
            f"| {c['loss_type']} | {c['beta']} | {c['policy']} | {c['loss']:.6f} | {c['loss_abs']:.1e} | "
            f"{c['grad_abs']:.1e} | {c['grad_max']:.1e} | {c['clipfrac']:.2f} |"
        )
    print(
        f"TRL's default KL term (use_bias_correction_kl=True: k3 x ratio) moves the gradient of the last case by "
        f"{r['bias_corrected_kl_grad_abs']:.1e} (not a parity failure: a different objective)",
        flush=True,
    )


# ---------------------------------------------------------------------------- 2. workers
def worker(args) -> None:
    timer, total = StepTimer(args.device), args.warmup + args.steps
    completion_tokens: list[float] = []  # mean completion length of each step's rollout
    prompts = read_prompts(args.workdir)[: total * args.prompts]
    if args.worker == "lit-align":
        import lightning as L

        from lit_align.data import PromptDataModule

        def step_end(trainer, module, outputs, batch, batch_idx):
            timer.end()
            prompt_tokens = float(batch["prompt_mask"].sum()) * args.samples
            completion_tokens.append((module.batch_tokens(batch) - prompt_tokens) / module.batch_samples(batch))

        path = str(args.workdir / "prompts.jsonl")
        data = PromptDataModule(
            train=path, val=path, max_records=len(prompts), max_length=256, batch_size=args.prompts, use_cache=False
        )
        hooks = {"on_train_batch_start": timer.begin, "on_train_batch_end": staticmethod(step_end)}
        timing = type("Timing", (L.Callback,), hooks)()
        trainer = timed_trainer(total, timing, args.device)
        trainer.fit(lit_module(args, str(args.workdir / "model")), data)
    else:
        from transformers import TrainerCallback

        held = {}

        def step_end(*_, **__):
            timer.end()
            completion_tokens.append(held["trainer"]._metrics["train"]["completions/mean_length"][-1])

        timing = type("Timing", (TrainerCallback,), {"on_step_begin": timer.begin, "on_step_end": step_end})()
        held["trainer"] = trl_trainer(
            args, args.workdir, total, prompts, args.prompts, args.samples, args.beta, [timing], device=args.device
        )
        held["trainer"].train()
    assert all(n == args.max_new_tokens for n in completion_tokens), completion_tokens
    report_worker(args, timer, total, completion_tokens=statistics.mean(completion_tokens))


# ---------------------------------------------------------------------------- 3. report
def summarise(args, runs: list[dict]) -> list[dict]:
    out = []
    for row in framework_medians(runs):
        mine = [r for r in runs if r["framework"] == row["framework"]]
        out.append(
            {
                "framework": row["framework"],
                "memory": row["memory"],
                "step": row["median_step_s"],
                "peak": row["peak_rss_mib"],
                "train_peak": row["train_peak_above_first_step_mib"],
                "cpu": row["median_step_cpu_s"],
                "first_rss": row["rss_at_first_step_mib"],
                "tokens": statistics.median([r["completion_tokens"] for r in mine]),
                "runs_step": row["per_run_median_step_s"],
                "runs_peak": row["per_run_peak_rss_mib"],
                "runs_other": row["per_run_other_cores"],
            }
        )
    for row in out:
        for key in ("step", "peak", "train_peak", "cpu"):
            row[key + "_ratio"] = row[key] / out[-1][key]
    return out


def plot(args):
    def draw(plt, rows):
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
        for ax, (value, ratio, label, fmt, target) in zip(
            axes,
            (
                (2, 3, "median step time (s)", "{:.2f}", TARGETS["step"]),
                (4, 5, f"{memory_label(args.device)} (MiB)", "{:.0f}", TARGETS["peak"]),
            ),
            strict=True,
        ):
            values = [float(r[value]) for r in rows]
            bars = ax.bar([r[0] for r in rows], values, color=["tab:blue", "tab:orange"])
            ax.bar_label(
                bars, labels=[fmt.format(v) + f" ({float(r[ratio]):.2f}x)" for v, r in zip(values, rows, strict=True)]
            )
            ax.axhline(target * values[-1], color="gray", linestyle="--", linewidth=1)
            ax.text(0.5, target * values[-1], f"target {target}x TRL", ha="center", va="bottom", fontsize=8)
            ax.set_ylabel(label)
            ax.set_ylim(0, 1.15 * max(values))
        fig.suptitle(
            f"GRPO step (generate + update), fp32 {device_caption(args)}: hidden {args.hidden}, {args.layers} "
            f"layers, vocab {args.vocab}, {args.prompts} prompts x {args.samples} samples x {args.max_new_tokens} "
            f"new tokens, {args.loss_type}, beta {args.beta}",
            fontsize=8,
        )
        return fig

    return draw


def write_report(args, runs: list[dict], parity_line: str) -> list[dict]:
    rows = summarise(args, runs)
    header = [
        "framework",
        "memory",
        "median_step_s",
        "step_ratio_vs_trl",
        "peak_rss_mib",
        "peak_ratio_vs_trl",
        "train_peak_above_first_step_mib",
        "train_peak_ratio_vs_trl",
        "median_step_cpu_s",
        "rss_at_first_step_mib",
        "completion_tokens",
        "per_run_median_step_s",
        "per_run_peak_rss_mib",
        "per_run_other_cores",
    ]
    table = [
        [
            r["framework"],
            r["memory"],
            round(r["step"], 4),
            round(r["step_ratio"], 3),
            round(r["peak"], 1),
            round(r["peak_ratio"], 3),
            round(r["train_peak"], 1),
            round(r["train_peak_ratio"], 3),
            round(r["cpu"], 4),
            round(r["first_rss"], 1),
            round(r["tokens"], 1),
            r["runs_step"],
            r["runs_peak"],
            r["runs_other"],
        ]
        for r in rows
    ]
    import torch
    import trl

    caption = (
        f"GRPO against TRL {trl.__version__} (torch {torch.__version__}): {args.prompts} prompts x {args.samples} "
        f"samples x {args.max_new_tokens} new tokens per step, loss {args.loss_type}, beta {args.beta}, "
        f"{device_caption(args)}, "
        f"{args.steps} timed steps x {args.repeats} fresh processes each. {parity_line}"
    )
    report(args.out_dir, "against_trl_grpo", header, table, caption, plot(args))
    return rows


def verdict(rows: list[dict]) -> None:
    lit = rows[0]
    for key, name in (("step", "step time"), ("peak", "peak memory")):
        ratio, target = lit[key + "_ratio"], TARGETS[key]
        print(f"{name}: lit-align {ratio:.2f}x TRL's (target <= {target}x): {'met' if ratio <= target else 'MISSED'}")


def main() -> None:
    os.environ.update(QUIET)
    args = parse_args()
    if args.worker:
        return worker(args)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)  # the workers' threads
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="against_trl_grpo_") as tmp:
        workdir = Path(tmp)
        write_prompts(workdir / "prompts.jsonl", max(args.parity_prompts, (args.warmup + args.steps) * args.prompts))
        module = lit_module(args, beta=0.0)  # the weights both sides start from
        module.backbone.policy.save_pretrained(workdir / "model")
        module.tokenizer.save_pretrained(workdir / "model")
        result = parity(args, workdir, module)
        del module
        print_parity(result)
        parity_line = (
            f"Parity (fp32, {len(result['cases'])} cases): max |diff| loss "
            f"{max(c['loss_abs'] for c in result['cases']):.1e}, gradients "
            f"{max(c['grad_abs'] for c in result['cases']):.1e}."
        )
        runs = []
        wait = 0.0 if args.quick else 300.0
        for i in range(args.repeats):
            for fw in FRAMEWORKS:  # A/B/A/B
                for _ in range(1 if args.quick else 3):  # the machine may be shared: repeat a run that had company
                    wait_for_quiet(args.max_other_load, timeout=wait)
                    run = run_worker(
                        __file__, [*sys.argv[1:], "--worker", fw, "--workdir", str(workdir)], threads=args.threads
                    )
                    w = run["wall"]
                    print(
                        f"  run {i + 1} {fw}: median step {statistics.median(w):.3f} s (min {min(w):.3f}, max "
                        f"{max(w):.3f}), {run['memory']} {run['peak_rss'] / MIB:.0f} MiB, completions "
                        f"{run['completion_tokens']:.0f} tokens, other processes {run['other_cores']:.2f} cores",
                        flush=True,
                    )
                    if run["other_cores"] <= args.max_other_load:
                        break
                runs.append(run)
    rows = write_report(args, runs, parity_line)
    verdict(rows)
    print(f"\nwrote {args.out_dir / 'against_trl_grpo.csv'} and .png ({time.perf_counter() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
