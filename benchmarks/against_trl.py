"""lit-align DPO against TRL's DPOTrainer: numerical parity, then step time and peak memory.

1. Parity: one tiny Llama (built by lit-align, saved with ``save_pretrained`` and loaded by TRL from
   that folder), the same preference pairs tokenized by TRL's own pipeline (``DPOTrainer`` dataset
   preparation + ``DataCollatorForPreference``) and fed as identical token ids to lit-align's
   ``PairCollator``. Compares per-token policy log-probs, summed policy/reference log-probs and the
   DPO loss, fp32, and asserts agreement (see ``check``). Also reports whether lit-align's own
   tokenizer pipeline produced the same ids.
2. Speed/memory: fresh worker processes alternating lit-align / TRL (``--repeats`` each). Both load
   the same saved weights and read the same pairs (every row exactly ``--seq`` tokens, so there is
   no padding and the work per step does not depend on shuffling), fp32, sdpa, AdamW (torch.optim),
   cosine schedule, grad-norm clipping at 1.0, batch ``--batch`` pairs, an online frozen reference
   copy, no gradient checkpointing. lit-align runs ``lightning.Trainer.fit(max_steps=...)``, TRL
   ``DPOTrainer.train()``; a callback in each times every optimizer step (batch start -> after the
   optimizer step); the first ``--warmup`` steps are dropped. Peak RSS: the process lifetime
   high-water mark (imports, model loading and training), plus the training-phase peak above the
   RSS at the first step.

    python benchmarks/against_trl.py            # full run (~5 min on 2 cores)
    python benchmarks/against_trl.py --quick    # smoke run

Needs the benchmark extra: ``pip install trl matplotlib``.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
MIB = 1024 * 1024
FRAMEWORKS = ("lit-align", "trl")


# ---------------------------------------------------------------------------- small helpers
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def rss_now() -> int:
    return _status_kib("VmRSS") * 1024


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:  # VmHWM := VmRSS (Linux)
        clear_refs.write("5")


def run_worker(args: argparse.Namespace, framework: str, workdir: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", framework, "--workdir", str(workdir), *sys.argv[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{framework} worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32000, help="padded vocabulary (TinyModel.vocab_size)")
    p.add_argument("--seq", type=int, default=256, help="tokens per row: seq/2 prompt + seq/2 response (incl. EOS)")
    p.add_argument("--batch", type=int, default=2, help="pairs per step (2x rows)")
    p.add_argument("--parity-pairs", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2, help="steps dropped before timing")
    p.add_argument("--steps", type=int, default=10, help="timed steps per worker")
    p.add_argument("--repeats", type=int, default=2, help="fresh processes per framework (alternating)")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--chunk", type=int, default=1024, help="lit-align logp_chunk_size")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the workers")
    p.add_argument("--out-dir", type=Path, default=HERE / "results")
    p.add_argument("--quick", action="store_true", help="smoke run: small model, few steps, 1 repeat")
    p.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.intermediate, args.vocab, args.seq = 64, 2, 128, 4096, 64
        args.warmup, args.steps, args.repeats = 1, 3, 1
    return args


# ---------------------------------------------------------------------------- data and model
def _cut(text: str, n_bytes: int, keep_end: bool) -> str:
    raw = text.encode()
    return (raw[-n_bytes:] if keep_end else raw[:n_bytes]).decode(errors="ignore")


def load_records(n: int, seq: int) -> list[dict[str, str]]:
    """``n`` explicit pairs whose prompt is exactly seq/2 bytes and responses seq/2 - 1 bytes (the
    tokenizer is byte-level, so with EOS every row is exactly ``seq`` tokens in both frameworks)."""
    from lit_align.data.formats import normalise_record

    half = seq // 2
    if HH.is_file():
        with gzip.open(HH, "rt") as f:
            raw = [json.loads(line) for line in f]
        pairs = []
        for i, record in enumerate(raw):
            try:
                pairs.append(normalise_record(record, "hh", i, "implicit"))
            except ValueError:
                continue
        pairs = [(p.prompt, p.chosen, p.rejected) for p in pairs]
    else:  # built-in task, texts repeated to length
        from lit_align.data import WordRulesTask

        pairs = [(r["prompt"] * seq, r["chosen"] * seq, r["rejected"] * seq) for r in WordRulesTask().split("train")]
    out = []
    for prompt, chosen, rejected in pairs:
        rec = {"prompt": _cut(prompt, half, True), "chosen": _cut(chosen, half - 1, False), "rejected": _cut(rejected, half - 1, False)}
        sizes = [len(rec[k].encode()) for k in ("prompt", "chosen", "rejected")]
        if sizes == [half, half - 1, half - 1] and rec["chosen"] != rec["rejected"] and "<|" not in "".join(rec.values()):
            out.append(rec)
        if len(out) == n:
            return out
    raise RuntimeError(f"only {len(out)} usable pairs for seq={seq}")


def model_settings(args, name_or_path: str = "tiny"):
    from lit_align.settings import ModelSettings, TinyModel

    tiny = TinyModel(hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads, intermediate_size=args.intermediate,
                     max_position_embeddings=max(512, args.seq), vocab_size=args.vocab, seed=0)
    return ModelSettings(name_or_path=name_or_path, tiny=tiny, dtype="float32", attn_implementation="sdpa", logp_chunk_size=args.chunk, reference="copy")


def lit_module(args, name_or_path: str = "tiny"):
    from lit_align.methods import DPO
    from lit_align.settings import OptimizerSettings

    return DPO(beta=args.beta, label_smoothing=0.0, model=model_settings(args, name_or_path), optimizer=OptimizerSettings(lr=args.lr, warmup_ratio=0.1, schedule="cosine"))


def trl_trainer(args, workdir: Path, max_steps: int, n_records: int, callbacks=()):
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    no_ckpt = {"activation_checkpointing" if "activation_checkpointing" in DPOConfig.__dataclass_fields__ else "gradient_checkpointing": False}
    config = DPOConfig(
        **no_ckpt, output_dir=str(workdir / "trl-out"), max_steps=max_steps, per_device_train_batch_size=args.batch, learning_rate=args.lr,
        lr_scheduler_type="cosine", warmup_steps=0.1, optim="adamw_torch", weight_decay=0.0, max_grad_norm=1.0,
        bf16=False, use_cpu=True, max_length=args.seq, beta=args.beta, loss_type=["sigmoid"],
        precompute_ref_log_probs=False, padding_free=False, model_init_kwargs={"dtype": "float32", "attn_implementation": "sdpa"},
        report_to="none", save_strategy="no", logging_steps=10_000, disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )
    records = [json.loads(line) for line in open(workdir / "pairs.jsonl")][:n_records]
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    trainer = DPOTrainer(model=str(workdir / "model"), args=config, train_dataset=Dataset.from_list(records), processing_class=tokenizer, callbacks=list(callbacks))
    assert not trainer.model.is_gradient_checkpointing and trainer.model.dtype == trainer.ref_model.dtype == torch.float32
    return trainer


# ---------------------------------------------------------------------------- 1. parity
def parity(args, workdir: Path, module) -> dict:
    import torch

    from lit_align.data.collate import PairCollator
    from lit_align.data.formats import PreferencePair
    from lit_align.data.tokenize import tokenize_pair

    n = args.parity_pairs
    trainer = trl_trainer(args, workdir, max_steps=1, n_records=n)
    examples = [trainer.train_dataset[i] for i in range(n)]
    trl_batch = trainer.data_collator(examples)
    records = [json.loads(line) for line in open(workdir / "pairs.jsonl")][:n]
    own = [tokenize_pair(PreferencePair(r["prompt"], r["chosen"], r["rejected"]), module.tokenizer, args.seq, args.seq // 2) for r in records]
    same_tokenization = all(o == {"prompt": e["prompt_ids"], "chosen": e["chosen_ids"], "rejected": e["rejected_ids"]} for o, e in zip(own, examples))
    lit_batch = PairCollator(module.tokenizer.pad_token_id)([{"prompt": e["prompt_ids"], "chosen": e["chosen_ids"], "rejected": e["rejected_ids"]} for e in examples])
    assert torch.equal(lit_batch["input_ids"], trl_batch["input_ids"]) and torch.equal(lit_batch["attention_mask"], trl_batch["attention_mask"])
    assert torch.equal(lit_batch["labels"] != -100, trl_batch["completion_mask"].bool())

    with torch.no_grad():  # TRL: its fused-LM-head forward (as in _compute_loss), compute_ref_log_probs, compute_loss
        labels = trl_batch["input_ids"].masked_fill(trl_batch["completion_mask"] == 0, -100)
        trl_tokens = trainer.model(input_ids=trl_batch["input_ids"], attention_mask=trl_batch["attention_mask"], labels=labels, use_cache=False, fused_lm_head=True).log_probs
        trl_policy = trl_tokens.sum(1)
        trl_ref = torch.cat(trainer.compute_ref_log_probs(trainer.ref_model, trl_batch))
        trl_loss = trainer.compute_loss(trainer.model, trl_batch)
        lit_tokens = module.backbone.logps(lit_batch).tokens[:, :-1]  # last position predicts nothing
        out = module.forward_pair(lit_batch)
        lit_policy = torch.cat([out.metrics["logps/chosen"], out.metrics["logps/rejected"]])
        lit_ref = module.reference_logps(lit_batch).sum
        lit_loss = out.losses.mean()
    diff = lambda a, b: float((a.double() - b.double()).abs().max())  # noqa: E731
    rel = lambda a, b: float(((a.double() - b.double()).abs() / b.double().abs().clamp(min=1)).max())  # noqa: E731
    result = {
        "pairs": n, "same_tokenization": same_tokenization, "rows_x_tokens": list(lit_batch["input_ids"].shape),
        "token_logp_max_abs": diff(lit_tokens, trl_tokens), "policy_sum_max_abs": diff(lit_policy, trl_policy),
        "policy_sum_max_rel": rel(lit_policy, trl_policy), "ref_sum_max_abs": diff(lit_ref, trl_ref), "ref_sum_max_rel": rel(lit_ref, trl_ref),
        "loss_abs": diff(lit_loss, trl_loss), "loss": float(lit_loss), "policy_sum_magnitude": float(lit_policy.abs().max()),
    }
    # fp32: per-token log-probs (|x| ~ ln V) and the loss are compared absolutely; sums of ~seq/2
    # tokens (|x| ~ seq/2 * ln V, whose fp32 ulp alone exceeds 1e-5) relatively
    for key in ("token_logp_max_abs", "loss_abs", "policy_sum_max_rel", "ref_sum_max_rel"):
        assert result[key] <= 1e-5, f"parity failed: {key}={result[key]:.3g}"
    return result


# ---------------------------------------------------------------------------- 2. workers
class StepTimer:
    def __init__(self):
        self.times, self.t0, self.setup_rss, self.setup_peak = [], None, None, None

    def begin(self):
        if self.setup_rss is None:
            self.setup_rss, self.setup_peak = rss_now(), _status_kib("VmHWM") * 1024
            reset_peak()
        self.t0 = time.perf_counter()

    def end(self):
        self.times.append(time.perf_counter() - self.t0)


def worker(args) -> None:
    timer, total = StepTimer(), args.warmup + args.steps
    if args.worker == "lit-align":
        import lightning as L

        from lit_align.data import PreferenceDataModule

        class Timing(L.Callback):
            def on_train_batch_start(self, *_):
                timer.begin()

            def on_train_batch_end(self, *_):
                timer.end()

        module = lit_module(args, str(args.workdir / "model"))
        data = PreferenceDataModule(train=str(args.workdir / "pairs.jsonl"), val=str(args.workdir / "pairs.jsonl"), format="explicit",
                                    max_length=args.seq, batch_size=args.batch, num_workers=0, use_cache=False)
        trainer = L.Trainer(accelerator="cpu", devices=1, precision="32-true", max_steps=total, gradient_clip_val=1.0, limit_val_batches=0,
                            num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=[Timing()])
        trainer.fit(module, data)
    else:
        from transformers import TrainerCallback

        class Timing(TrainerCallback):
            def on_step_begin(self, *_, **__):
                timer.begin()

            def on_step_end(self, *_, **__):
                timer.end()

        trl_trainer(args, args.workdir, max_steps=total, n_records=total * args.batch, callbacks=[Timing()]).train()
    assert len(timer.times) == total, timer.times
    steps = timer.times[args.warmup:]
    train_peak = _status_kib("VmHWM") * 1024  # since the first step; VmHWM before it covers set-up
    print(json.dumps({
        "framework": args.worker, "step_s": steps, "median_step_s": statistics.median(steps),
        "peak_rss": max(timer.setup_peak, train_peak), "setup_rss": timer.setup_rss, "train_peak_rss": train_peak,
    }), flush=True)


# ---------------------------------------------------------------------------- 3. report
def report(args, runs: list[dict]) -> list[dict]:
    rows = []
    for fw in FRAMEWORKS:
        mine = [r for r in runs if r["framework"] == fw]
        rows.append({
            "framework": fw, "median_step_s": statistics.median([s for r in mine for s in r["step_s"]]),
            "peak_rss_mib": statistics.median([r["peak_rss"] for r in mine]) / MIB,
            "setup_rss_mib": statistics.median([r["setup_rss"] for r in mine]) / MIB,
            "train_peak_above_setup_mib": statistics.median([r["train_peak_rss"] - r["setup_rss"] for r in mine]) / MIB,
            "per_run_median_step_s": " ".join(f"{r['median_step_s']:.3f}" for r in mine),
            "per_run_peak_rss_mib": " ".join(f"{r['peak_rss'] / MIB:.0f}" for r in mine),
        })
    trl = rows[-1]
    for row in rows:
        row["step_ratio_vs_trl"] = row["median_step_s"] / trl["median_step_s"]
        row["rss_ratio_vs_trl"] = row["peak_rss_mib"] / trl["peak_rss_mib"]
        row["train_mem_ratio_vs_trl"] = row["train_peak_above_setup_mib"] / trl["train_peak_above_setup_mib"]
    header = ["framework", "median step s", "ratio vs TRL", "peak RSS MiB", "ratio", "RSS at 1st step MiB", "training peak above it MiB", "ratio"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append(f"| {r['framework']} | {r['median_step_s']:.3f} | {r['step_ratio_vs_trl']:.2f}x | {r['peak_rss_mib']:.0f} | {r['rss_ratio_vs_trl']:.2f}x"
                     f" | {r['setup_rss_mib']:.0f} | {r['train_peak_above_setup_mib']:.0f} | {r['train_mem_ratio_vs_trl']:.2f}x |")
    print("\n".join(lines))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with open(args.out_dir / "against_trl.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no PNG (pip install matplotlib)")
        return rows
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, label in ((axes[0], "median_step_s", "median step time (s)"), (axes[1], "peak_rss_mib", "peak RSS (MiB)")):
        bars = ax.bar([r["framework"] for r in rows], [r[key] for r in rows], color=["tab:blue", "tab:orange"])
        ax.bar_label(bars, labels=[f"{r[key]:.2f}" if key == "median_step_s" else f"{r[key]:.0f}" for r in rows])
        ax.set_ylabel(label)
    fig.suptitle(f"DPO step, fp32 CPU ({args.threads} threads): hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
                 f"{args.batch} pairs x {args.seq} tokens", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out_dir / "against_trl.png", dpi=120)
    return rows


def main() -> None:
    os.environ.update(HF_DATASETS_DISABLE_PROGRESS_BARS="1", TQDM_DISABLE="1", TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")
    args = parse_args()
    if args.worker:
        return worker(args)
    import torch
    import trl

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="against_trl_") as tmp:
        workdir = Path(tmp)
        n = max(args.parity_pairs, (args.warmup + args.steps) * args.batch)
        with open(workdir / "pairs.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in load_records(n, args.seq))
        module = lit_module(args)  # the weights both sides use
        module.backbone.policy.save_pretrained(workdir / "model")
        module.tokenizer.save_pretrained(workdir / "model")
        result = parity(args, workdir, module)
        del module
        print(f"parity ({result['pairs']} pairs, {result['rows_x_tokens'][0]} rows x {result['rows_x_tokens'][1]} tokens, fp32): "
              f"per-token log-prob max|diff| {result['token_logp_max_abs']:.2e}; summed log-probs policy max|diff| {result['policy_sum_max_abs']:.2e} "
              f"(rel {result['policy_sum_max_rel']:.1e}, |sum| up to {result['policy_sum_magnitude']:.0f}), reference max|diff| {result['ref_sum_max_abs']:.2e} "
              f"(rel {result['ref_sum_max_rel']:.1e}); loss {result['loss']:.6f}, |diff| {result['loss_abs']:.2e}; "
              f"lit-align's own tokenization identical to TRL's: {result['same_tokenization']}")
        runs = []
        for i in range(args.repeats):
            for fw in FRAMEWORKS:
                runs.append(run_worker(args, fw, workdir))
                r = runs[-1]
                print(f"  run {i + 1} {fw}: median step {r['median_step_s']:.3f} s (min {min(r['step_s']):.3f}, max {max(r['step_s']):.3f}), "
                      f"peak RSS {r['peak_rss'] / MIB:.0f} MiB", flush=True)
    print(f"\nTRL {trl.__version__}, torch {torch.__version__}, {args.threads} threads\n")
    report(args, runs)
    print(f"\nwrote {args.out_dir / 'against_trl.csv'} and .png in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
