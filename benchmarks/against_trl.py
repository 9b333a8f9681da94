"""lit-align DPO against TRL's DPOTrainer: numerical parity, then step time and peak memory.

1. Parity (fp32): lit-align's tiny Llama, saved with ``save_pretrained``, is loaded by TRL; both
   policies get the same small perturbation (so policy != reference). TRL's own pipeline tokenizes
   the pairs and the identical ids go through lit-align's ``PairCollator``. Compared: per-token and
   summed log-probs (policy, reference), the DPO loss and its gradients.
2. Speed/memory: fresh worker processes alternating lit-align / TRL: same weights and pairs (rows
   exactly ``--seq`` tokens, no padding), fp32, sdpa, torch AdamW, cosine schedule, clip 1.0, online
   frozen reference copy, no gradient checkpointing. lit-align: ``lightning.Trainer.fit``, TRL:
   ``DPOTrainer.train``; a callback times each step (batch start -> after the optimizer step).
   Peak RSS: the worker's VmHWM over its whole life.
3. ``--device cuda``: the workers train on the GPU (parity still runs on CPU, fp32); a step is
   timed between ``torch.cuda.synchronize()`` calls and memory is torch's peak allocated CUDA
   memory (``torch.cuda.max_memory_allocated``) instead of RSS. Both sides stay fp32 (TF32 off, the
   default for matmuls), so the ratio compares the same arithmetic; benchmarks/gpu.sh runs it.
4. ``--prefix-sharing``: a third worker kind, lit-align with ``model.prefix_sharing`` (each prompt
   run once, both responses continuing its KV cache), alternating with the other two; parity also
   checks its per-token log-probs against TRL's.
5. ``--floor``: one more worker kind, the decoder alone in a hand-written loop: the same rows
   through the same layers (the policy forward and backward, the reference's forward: a frozen
   copy, or with ``--lora`` the same adapters disabled), the same clipping and AdamW step, but no
   LM head, log-probs or loss (the sum of the last hidden states at response positions is what it
   differentiates). A DPO step that runs whole rows through
   these layers with the same eager kernels cannot take less: the floor under the step-time ratio
   (a time floor; the loop takes no care where its memory peaks).

    python benchmarks/against_trl.py                  # full run (~3 min on 2 idle cores)
    python benchmarks/against_trl.py --quick          # smoke run
    python benchmarks/against_trl.py --device cuda    # on a GPU
    python benchmarks/against_trl.py --lora 16        # both sides train rank-16 LoRA adapters
    python benchmarks/against_trl.py --prefix-sharing # and lit-align with model.prefix_sharing
    python benchmarks/against_trl.py --floor          # and the decoder-only floor

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
SHARED = "lit-align, prefix sharing"
FLOOR = "decoder alone (floor)"
FRAMEWORKS = ("lit-align", SHARED, FLOOR, "trl")
"""Worker kinds; the prefix-sharing one runs with ``--prefix-sharing`` only, the floor with ``--floor``."""
QUIET = {
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_int_args(
        p,
        (
            *MODEL_SHAPE_ARGS,
            ("seq", 256, "tokens per row: seq/2 prompt + seq/2 response incl. EOS"),
            ("batch", 4, "pairs per step (2x rows)"),
            ("parity-pairs", 8, "pairs in the parity batch"),
            *timing_args(warmup=2, steps=10),
        ),
    )
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument(
        "--lora",
        type=int,
        default=0,
        help="LoRA rank of the timed runs (0: full fine-tuning): peft adapters on every linear layer but the head, "
        "alpha 2 x rank, the reference = the same weights with adapters disabled, on both sides (parity runs at full "
        "fine-tuning)",
    )
    p.add_argument(
        "--prefix-sharing",
        action="store_true",
        help="also time lit-align with model.prefix_sharing (each prompt run once; its own fresh processes, "
        "alternating with the other two) and check its log-probs in the parity step",
    )
    p.add_argument(
        "--floor",
        action="store_true",
        help="also time the decoder alone (whole rows through the layers, the reference's forward, AdamW; no LM "
        "head or loss): the least a DPO step over whole rows can take with the same kernels",
    )
    add_run_args(p, quick="smoke run: small model, few steps, 1 repeat")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.intermediate, args.vocab, args.seq = 64, 2, 128, 4096, 64
        args.warmup, args.steps, args.repeats = 1, 3, 1
    return args


MODEL_SHAPE_ARGS = (
    ("hidden", 256, "hidden size"),
    ("layers", 4, "decoder layers"),
    ("heads", 4, "attention heads"),
    ("intermediate", 1024, "MLP width"),
    ("vocab", 32000, "padded vocabulary (TinyModel.vocab_size)"),
)
"""(option, default, help) of the model's shape, the same in every against-TRL benchmark."""


def timing_args(warmup: int, steps: int) -> tuple[tuple[str, int, str], ...]:
    """(option, default, help) of how a worker is timed and run, with this benchmark's defaults."""
    return (
        ("warmup", warmup, "steps dropped before timing"),
        ("steps", steps, "timed steps per worker"),
        ("repeats", 2, "fresh processes per framework, alternating"),
        ("chunk", 1024, "lit-align logp_chunk_size (its default)"),
        ("threads", 2, "OMP_NUM_THREADS of the workers"),
    )


def add_int_args(p: argparse.ArgumentParser, rows) -> None:
    """One integer option per (name, default, help) row."""
    for name, default, text in rows:
        p.add_argument(f"--{name}", type=int, default=default, help=text)


def add_run_args(p: argparse.ArgumentParser, quick: str) -> None:
    """The options every against-TRL benchmark takes: how quiet the machine must be, where results
    go, ``--quick`` (``quick``: what it does), and the hidden ones of its worker processes."""
    p.add_argument(
        "--max-other-load",
        type=float,
        default=0.2,
        help="wait for, and repeat a run (twice at most) if other processes use more CPU cores than this",
    )
    p.add_argument("--out-dir", type=Path, default=HERE / "results")
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the timed workers train (parity runs on CPU); cuda: memory is peak allocated CUDA memory",
    )
    p.add_argument("--quick", action="store_true", help=quick)
    p.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)


def status_bytes(field: str) -> int:
    """VmRSS / VmHWM (Linux); unlike ru_maxrss, VmHWM does not inherit the parent's peak via fork."""
    with open("/proc/self/status") as status:
        return 1024 * next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def busy_seconds() -> float:
    """CPU seconds all processes on the machine have used (/proc/stat, Linux)."""
    with open("/proc/stat") as stat:
        ticks = [int(x) for x in stat.readline().split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


# ---------------------------------------------------------------------------- data and models
def _cut(text: str, n_bytes: int, keep_end: bool) -> str:
    raw = text.encode()
    return (raw[-n_bytes:] if keep_end else raw[:n_bytes]).decode(errors="ignore")


def load_records(n: int, seq: int) -> list[dict[str, str]]:
    """``n`` explicit pairs from Anthropic HH (split at the last "\\n\\nAssistant:" by lit-align):
    prompt exactly seq/2 bytes, responses seq/2 - 1 bytes. The tokenizer is byte-level, so with EOS
    every row is exactly ``seq`` tokens and neither framework truncates."""
    from lit_align.data.formats import normalise_record

    with gzip.open(HH, "rt") as f:
        raw = [json.loads(line) for line in f]
    half, out = seq // 2, []
    for i, record in enumerate(raw):
        try:
            pair = normalise_record(record, "hh", i, "implicit")
        except ValueError:
            continue
        rec = {
            "prompt": _cut(pair.prompt, half, True),
            "chosen": _cut(pair.chosen, half - 1, False),
            "rejected": _cut(pair.rejected, half - 1, False),
        }
        if (
            [len(v.encode()) for v in rec.values()] == [half, half - 1, half - 1]
            and rec["chosen"] != rec["rejected"]
            and "<|" not in str(rec)
        ):
            out.append(rec)
        if len(out) == n:
            return out
    raise RuntimeError(f"only {len(out)} usable pairs for seq={seq}")


def read_pairs(workdir: Path) -> list[dict[str, str]]:
    with open(workdir / "pairs.jsonl") as f:
        return [json.loads(line) for line in f]


def lit_module(args, name_or_path: str = "tiny", lora: bool = False, prefix_sharing: bool = False):
    """lit-align's DPO module: full fine-tuning with a frozen-copy reference, or (``lora``) rank
    ``args.lora`` adapters with the adapter-disabled weights as the reference; ``prefix_sharing``:
    each prompt run once (``model.prefix_sharing``)."""
    from lit_align.methods import DPO
    from lit_align.settings import LoRA, ModelSettings, OptimizerSettings, TinyModel

    tiny = TinyModel(
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        intermediate_size=args.intermediate,
        max_position_embeddings=max(512, args.seq),
        vocab_size=args.vocab,
        seed=0,
    )
    model = ModelSettings(
        name_or_path=name_or_path,
        tiny=tiny,
        dtype="float32",
        attn_implementation="sdpa",
        logp_chunk_size=args.chunk,
        reference="adapter" if lora else "copy",
        lora=LoRA(r=args.lora, alpha=2 * args.lora, dropout=0.0, target_modules="all-linear") if lora else None,
        prefix_sharing=prefix_sharing,
    )
    return DPO(
        beta=args.beta,
        label_smoothing=0.0,
        model=model,
        optimizer=OptimizerSettings(lr=args.lr, warmup_ratio=0.1, schedule="cosine"),
    )


def trl_trainer(
    args, workdir: Path, max_steps: int, n_records: int, callbacks=(), lora: bool = False, device: str = "cpu"
):
    """TRL's DPOTrainer on the saved model: full fine-tuning with a frozen reference copy, or (``lora``)
    peft adapters as :func:`lit_module` makes them, the reference being the adapters disabled."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    # TRL defaults to gradient checkpointing and bf16; transformers 5 renamed the former
    no_ckpt = {
        "activation_checkpointing"
        if "activation_checkpointing" in DPOConfig.__dataclass_fields__
        else "gradient_checkpointing": False
    }
    config = DPOConfig(
        **no_ckpt,
        output_dir=str(workdir / "trl-out"),
        max_steps=max_steps,
        per_device_train_batch_size=args.batch,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,
        optim="adamw_torch",
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=False,
        use_cpu=device == "cpu",  # parity stays on CPU also where a GPU is there (TRL would take it)
        max_length=args.seq,
        beta=args.beta,
        loss_type=["sigmoid"],
        precompute_ref_log_probs=False,
        padding_free=False,
        model_init_kwargs={"dtype": "float32", "attn_implementation": "sdpa"},
        report_to="none",
        save_strategy="no",
        logging_steps=10_000,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    records = read_pairs(workdir)[:n_records]
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    trainer = DPOTrainer(
        model=str(workdir / "model"),
        args=config,
        train_dataset=Dataset.from_list(records),
        processing_class=tokenizer,
        callbacks=list(callbacks),
        peft_config=trl_lora(args) if lora else None,
    )
    assert not trainer.args.gradient_checkpointing and trainer.model.dtype == torch.float32
    assert (trainer.ref_model is None) == lora  # with peft, TRL's reference is the adapters disabled
    return trainer


def trl_lora(args):
    """peft's LoraConfig matching lit-align's ``LoRA(r, alpha=2r, target_modules="all-linear")``."""
    from peft import LoraConfig

    return LoraConfig(
        r=args.lora, lora_alpha=2 * args.lora, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )


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
    own = [
        tokenize_pair(
            PreferencePair(r["prompt"], r["chosen"], r["rejected"]), module.tokenizer, args.seq, args.seq // 2
        )
        for r in read_pairs(workdir)[:n]
    ]
    ids = [{"prompt": e["prompt_ids"], "chosen": e["chosen_ids"], "rejected": e["rejected_ids"]} for e in examples]
    lit_batch = PairCollator(module.tokenizer.pad_token_id)(ids)
    assert torch.equal(lit_batch["input_ids"], trl_batch["input_ids"]) and torch.equal(
        lit_batch["attention_mask"], trl_batch["attention_mask"]
    )
    assert torch.equal(lit_batch["labels"] != -100, trl_batch["completion_mask"].bool())

    lit_policy, trl_policy = module.backbone.policy, trainer.model
    with torch.no_grad():  # the same perturbation of both policies; the references stay at the saved weights
        gen = torch.Generator().manual_seed(1)
        for (name, a), (other, b) in zip(lit_policy.named_parameters(), trl_policy.named_parameters(), strict=True):
            assert name == other and torch.equal(a, b), name
            noise = 0.002 * torch.randn(a.shape, generator=gen)
            a.add_(noise)
            b.add_(noise)
        # TRL: the fused-LM-head forward _compute_loss uses, compute_ref_log_probs; lit-align: Backbone.logps
        labels = trl_batch["input_ids"].masked_fill(trl_batch["completion_mask"] == 0, -100)
        trl_tokens = trl_policy(
            input_ids=trl_batch["input_ids"],
            attention_mask=trl_batch["attention_mask"],
            labels=labels,
            use_cache=False,
            fused_lm_head=True,
        ).log_probs
        trl_ref = torch.cat(trainer.compute_ref_log_probs(trainer.ref_model, trl_batch))
        lit_tokens = module.backbone.logps(lit_batch).tokens[:, :-1]  # the last position predicts nothing
        shared_tokens = module.backbone.shared_prompt_logps(lit_batch, lit_policy).tokens[:, :-1]
        lit_ref = module.reference_logps(lit_batch).sum
    trl_loss = trainer.compute_loss(trl_policy, trl_batch)  # TRL's DPO loss (sigmoid), with its metrics
    trl_loss.backward()
    out = module.forward_pair(lit_batch)
    lit_loss = out.losses.mean()
    lit_loss.backward()
    lit_sums = torch.cat([out.metrics["logps/chosen"], out.metrics["logps/rejected"]])

    def diff(a, b, rel=False):
        a, b = a.detach().double(), b.detach().double()
        d = (a - b).abs()
        return float((d / b.abs().clamp(min=1) if rel else d).max())

    grads = [(a.grad, b.grad) for a, b in zip(lit_policy.parameters(), trl_policy.parameters(), strict=True)]
    result = {
        "pairs": n,
        "shape": list(lit_batch["input_ids"].shape),
        "same_tokenization": own == ids,
        "token_abs": diff(lit_tokens, trl_tokens),
        "shared_token_abs": diff(shared_tokens, trl_tokens),
        "policy_sum_abs": diff(lit_sums, trl_tokens.sum(1)),
        "policy_sum_rel": diff(lit_sums, trl_tokens.sum(1), rel=True),
        "sum_magnitude": float(lit_sums.abs().max()),
        "ref_sum_abs": diff(lit_ref, trl_ref),
        "ref_sum_rel": diff(lit_ref, trl_ref, rel=True),
        "loss": trl_loss.item(),
        "loss_abs": diff(lit_loss, trl_loss),
        "grad_abs": max(diff(a, b) for a, b in grads),
        "grad_max": max(float(b.abs().max()) for _, b in grads),
    }
    # fp32, each difference against the scale of the values compared (at least 1): per-token
    # log-probs (|x| ~ ln V), the gradients (the largest |grad|: a model with 30 layers has
    # gradients of 10 and more, where one fp32 ulp is ~1e-6) and the sums of seq/2 tokens (|x| ~
    # 1e3, one ulp ~1e-4). The loss is -log sigmoid(beta x margin) of those sums, so its rounding
    # is the sums' times beta (its slope is at most beta): its scale is beta x the largest sum
    # (measured at SmolLM2's shape, 256 response tokens: 2.3e-5 of a loss of 0.69, while the sums
    # agree to 1e-6 of their size). Within 1e-5 of the scale is parity.
    scales = {
        "token_abs": max(1.0, float(trl_tokens.abs().max())),
        "shared_token_abs": max(1.0, float(trl_tokens.abs().max())),
        "loss_abs": max(1.0, abs(result["loss"]), args.beta * result["sum_magnitude"]),
        "grad_abs": max(1.0, result["grad_max"]),
    }
    for key, scale in scales.items():
        result[key.replace("_abs", "_rel")] = result[key] / scale
    # the gradient is sigmoid(-beta x margin) x beta x grad(margin): the sigmoid's relative rounding
    # is that of beta x margin, up to 4 sums' rounding (4 x beta x |sum| x fp32 eps: 6.7e-5 at
    # SmolLM2's shape, measured 1.2e-5), on top of the matmuls' 1e-5
    slope = 4 * args.beta * result["sum_magnitude"] * torch.finfo(torch.float32).eps
    limits = {"grad_rel": 1e-5 + slope}
    for key in ("token_rel", "shared_token_rel", "loss_rel", "grad_rel", "policy_sum_rel", "ref_sum_rel"):
        limit = limits.get(key, 1e-5)
        assert result[key] <= limit, f"parity failed: {key}={result[key]:.3g} (limit {limit:.3g})"
    return result


# ---------------------------------------------------------------------------- 2. workers
def memory_label(device: str) -> str:
    """What the tables call the memory a worker reports on ``device``."""
    return {"cpu": "peak RSS", "cuda": "peak CUDA memory"}[device]


class StepTimer:
    """Times each training step of a worker and measures memory: on ``cpu`` the process's RSS
    (VmRSS when the first step begins, VmHWM for peaks), on ``cuda`` torch's allocated CUDA
    memory (the kernels are asynchronous, so each step is timed between synchronisations)."""

    def __init__(self, device: str = "cpu"):
        import torch

        self.cuda = torch.cuda if device == "cuda" else None  # None: measure the process's RSS
        self.wall, self.cpu, self.busy, self.setup_peak = [], [], [], None

    def synchronize(self) -> None:
        if self.cuda:
            self.cuda.synchronize()

    def begin(self, *_, **__):  # also a callback hook: the arguments are ignored
        self.synchronize()
        if self.setup_peak is None:
            if self.cuda:
                self.setup_rss, self.setup_peak = self.cuda.memory_allocated(), self.cuda.max_memory_allocated()
                self.cuda.reset_peak_memory_stats()  # from here: the training-phase peak
            else:
                self.setup_rss, self.setup_peak = status_bytes("VmRSS"), status_bytes("VmHWM")
                with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to VmRSS: the training-phase peak
                    f.write("5")
        self.t0, self.c0, self.b0 = time.perf_counter(), time.process_time(), busy_seconds()

    def training_peak(self) -> int:
        """Peak memory since the first step began (bytes)."""
        return self.cuda.max_memory_allocated() if self.cuda else status_bytes("VmHWM")

    def end(self, *_, **__):
        self.synchronize()
        self.wall.append(time.perf_counter() - self.t0)
        self.cpu.append(time.process_time() - self.c0)  # this process, all threads
        self.busy.append(busy_seconds() - self.b0)  # every process on the machine


def worker(args) -> None:
    timer, total = StepTimer(args.device), args.warmup + args.steps
    if args.worker == FLOOR:
        from transformers import AutoModelForCausalLM

        policy = AutoModelForCausalLM.from_pretrained(
            args.workdir / "model", dtype="float32", attn_implementation="sdpa"
        )
        decoder_floor(args, policy.to(args.device), timer, total)
    elif args.worker != "trl":
        import lightning as L

        from lit_align.data import PreferenceDataModule

        pairs = str(args.workdir / "pairs.jsonl")
        data = PreferenceDataModule(
            train=pairs, val=pairs, format="explicit", max_length=args.seq, batch_size=args.batch, use_cache=False
        )
        timing = type("Timing", (L.Callback,), {"on_train_batch_start": timer.begin, "on_train_batch_end": timer.end})()
        trainer = timed_trainer(total, timing, args.device, gradient_clip_val=1.0)
        module = lit_module(args, str(args.workdir / "model"), lora=args.lora > 0, prefix_sharing=args.worker == SHARED)
        trainer.fit(module, data)
        policy = module.backbone.policy
    else:
        from transformers import TrainerCallback

        timing = type("Timing", (TrainerCallback,), {"on_step_begin": timer.begin, "on_step_end": timer.end})()
        trainer = trl_trainer(
            args,
            args.workdir,
            max_steps=total,
            n_records=total * args.batch,
            callbacks=[timing],
            lora=args.lora > 0,
            device=args.device,
        )
        trainer.train()
        policy = trainer.model
    # the parameters each side trains (the same count: full fine-tuning, or the same adapters)
    report_worker(args, timer, total, trained=sum(p.numel() for p in policy.parameters() if p.requires_grad))


def decoder_floor(args, policy, timer: "StepTimer", total: int) -> None:
    """``total`` steps of the decoder alone (``--floor``): each step, ``args.batch`` pairs of rows of
    ``args.seq`` tokens (token values do not change the arithmetic) through the reference's layers
    without gradients and the policy's with, the sum of the policy's last hidden states at response
    positions (the second half of each row) as the loss, clipping to norm 1 and an AdamW step. Full
    fine-tuning: the reference is a frozen copy; with ``--lora``: peft adapters as both sides train
    them (:func:`trl_lora`), the reference the adapters disabled. What it leaves out, against a DPO
    step over the same rows, is the LM head, the log-probs and the loss: a floor, not a DPO
    implementation."""
    import contextlib
    import copy

    import torch

    if args.lora:
        from peft import get_peft_model

        model = get_peft_model(policy, trl_lora(args))  # wraps the linear layers of ``policy`` in place
        reference, reference_off = policy.model, model.disable_adapter
    else:
        reference, reference_off = copy.deepcopy(policy).eval().requires_grad_(False).model, contextlib.nullcontext
    trained = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=args.lr)
    rows = torch.randint(
        0, policy.config.vocab_size, (2 * args.batch, args.seq), generator=torch.Generator().manual_seed(0)
    )
    rows, response = rows.to(policy.device), slice(args.seq // 2 - 1, -1)
    for _ in range(total):
        timer.begin()
        with torch.no_grad(), reference_off():
            reference(input_ids=rows).last_hidden_state[:, response].sum()
        loss = policy.model(input_ids=rows).last_hidden_state[:, response].sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timer.end()


def timed_trainer(total: int, timing, device: str = "cpu", **settings):
    """The Lightning trainer a lit-align worker times: ``total`` steps in one process on ``device``
    (cpu or cuda), fp32, nothing logged, validated or saved; ``timing`` the callback that times each step."""
    import lightning as L

    return L.Trainer(
        accelerator=device,
        devices=1,
        precision="32-true",
        max_steps=total,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timing],
        **settings,
    )


def report_worker(args, timer: "StepTimer", total: int, **extra) -> None:
    """Print a worker's result as one JSON line: the timed steps (after ``args.warmup``), the load
    other processes put on the machine meanwhile, and peak memory (``extra`` added)."""
    assert len(timer.wall) == total, timer.wall
    train_peak, timed = timer.training_peak(), slice(args.warmup, None)
    other_cores = (sum(timer.busy[timed]) - sum(timer.cpu[timed])) / sum(timer.wall[timed])  # load from other processes
    result = {
        "framework": args.worker,
        "memory": memory_label(args.device),
        "wall": timer.wall[timed],
        "cpu": timer.cpu[timed],
        "other_cores": max(0.0, other_cores),
        "peak_rss": max(timer.setup_peak, train_peak),
        "setup_rss": timer.setup_rss,
        "train_peak": train_peak,
        **extra,
    }
    print(json.dumps(result))


def wait_for_quiet(max_cores: float, timeout: float = 300.0) -> None:
    """Wait (at most ``timeout`` s) until other processes use at most ``max_cores`` for 3 s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        start = busy_seconds()
        time.sleep(3)
        if (busy_seconds() - start) / 3 <= max_cores:
            return


def run_worker(args, framework: str, workdir: Path) -> dict:
    wait_for_quiet(args.max_other_load)
    cmd = [sys.executable, __file__, *sys.argv[1:], "--worker", framework, "--workdir", str(workdir)]
    proc = subprocess.run(
        cmd,
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, **QUIET, "OMP_NUM_THREADS": str(args.threads)},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{framework} worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- 3. report
def framework_medians(runs: list[dict]) -> list[dict]:
    """Per framework (in the order of ``runs``: lit-align first, TRL last), the medians of its
    workers' results (``report_worker`` lines): step time, peak RSS, training peak above the first
    step, CPU time, and per-run values."""
    med, rows = statistics.median, []
    for fw in dict.fromkeys(r["framework"] for r in runs):
        mine = [r for r in runs if r["framework"] == fw]
        rows.append(
            {
                "framework": fw,
                "memory": mine[0]["memory"],
                "median_step_s": med([s for r in mine for s in r["wall"]]),
                "peak_rss_mib": med([r["peak_rss"] for r in mine]) / MIB,
                "train_peak_above_first_step_mib": med([r["train_peak"] - r["setup_rss"] for r in mine]) / MIB,
                "median_step_cpu_s": med([s for r in mine for s in r["cpu"]]),
                "rss_at_first_step_mib": med([r["setup_rss"] for r in mine]) / MIB,
                "per_run_median_step_s": " ".join(f"{med(r['wall']):.3f}" for r in mine),
                "per_run_peak_rss_mib": " ".join(f"{r['peak_rss'] / MIB:.0f}" for r in mine),
                "per_run_other_cores": " ".join(f"{r['other_cores']:.2f}" for r in mine),
            }
        )
    return rows


def report(args, runs: list[dict]) -> None:
    rows = framework_medians(runs)
    for row, key in (
        (row, key)
        for row in rows
        for key in ("median_step_s", "peak_rss_mib", "train_peak_above_first_step_mib", "median_step_cpu_s")
    ):
        row[key + "_ratio_vs_trl"] = row[key] / rows[-1][key]
    print(
        f"| framework | median step s | ratio vs TRL | {memory_label(args.device)} MiB | ratio | training peak "
        "above the memory at the 1st step MiB | ratio |\n|---|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['framework']} | {r['median_step_s']:.3f} | {r['median_step_s_ratio_vs_trl']:.2f}x | "
            f"{r['peak_rss_mib']:.0f} | {r['peak_rss_mib_ratio_vs_trl']:.2f}x"
            f" | {r['train_peak_above_first_step_mib']:.0f} | {r['train_peak_above_first_step_mib_ratio_vs_trl']:.2f}x "
            "|"
        )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with open(args.out_dir / "against_trl.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()} for row in rows)
    plot(args, rows)


def plot(args, rows: list[dict]) -> None:
    """Bars of median step time and peak memory per framework (``report``'s rows, ratios to TRL's
    included): ``args.out_dir``/against_trl.png."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, label, fmt in (
        (axes[0], "median_step_s", "median step time (s)", "{:.2f}"),
        (axes[1], "peak_rss_mib", f"{memory_label(args.device)} (MiB)", "{:.0f}"),
    ):
        bars = ax.bar(
            [textwrap.fill(r["framework"], 14) for r in rows],
            [r[key] for r in rows],
            color=[COLORS[r["framework"]] for r in rows],
        )
        ax.bar_label(bars, labels=[fmt.format(r[key]) + f" ({r[key + '_ratio_vs_trl']:.2f}x)" for r in rows])
        ax.set_ylabel(label)
        ax.set_ylim(0, 1.15 * max(r[key] for r in rows))
    fig.suptitle(
        f"DPO training step ({tuning(args)}), fp32 {device_caption(args)}: hidden {args.hidden}, "
        f"{args.layers} layers, vocab {args.vocab}, {args.batch} pairs x {args.seq} tokens",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(args.out_dir / "against_trl.png", dpi=120)


COLORS = {"lit-align": "tab:blue", SHARED: "tab:green", FLOOR: "tab:gray", "trl": "tab:orange"}


def timed_frameworks(args) -> tuple[str, ...]:
    """The workers a run alternates: lit-align (and with ``--prefix-sharing`` lit-align sharing
    prompts, with ``--floor`` the decoder alone), then TRL."""
    asked = {SHARED: args.prefix_sharing, FLOOR: args.floor}
    return tuple(fw for fw in FRAMEWORKS if asked.get(fw, True))


def tuning(args) -> str:
    """Full fine-tuning or LoRA, as the captions say it."""
    return f"LoRA r={args.lora}" if args.lora else "full fine-tuning"


def device_caption(args) -> str:
    """The hardware a figure's title names: the CPU threads, or the GPU's name."""
    if args.device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    return f"CPU, {args.threads} threads"


def main() -> None:
    os.environ.update(QUIET)
    args = parse_args()
    if args.worker:
        return worker(args)
    import torch
    import trl

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="against_trl_") as tmp:
        workdir = Path(tmp)
        with open(workdir / "pairs.jsonl", "w") as f:
            f.writelines(
                json.dumps(r) + "\n"
                for r in load_records(max(args.parity_pairs, (args.warmup + args.steps) * args.batch), args.seq)
            )
        module = lit_module(args)  # the weights both sides start from
        module.backbone.policy.save_pretrained(workdir / "model")
        module.tokenizer.save_pretrained(workdir / "model")
        r = parity(args, workdir, module)
        del module
        print(
            f"parity ({r['pairs']} pairs = {r['shape'][0]} rows x {r['shape'][1]} tokens, fp32, TRL's token ids): max "
            "|diff| per-token policy "
            f"log-prob {r['token_abs']:.1e}; summed policy log-prob {r['policy_sum_abs']:.1e} (rel "
            f"{r['policy_sum_rel']:.0e}; |sum| up to "
            f"{r['sum_magnitude']:.0f}); summed reference log-prob {r['ref_sum_abs']:.1e} (rel "
            f"{r['ref_sum_rel']:.0e}); per-token policy log-prob with prefix sharing "
            f"{r['shared_token_abs']:.1e}; DPO loss {r['loss']:.6f}, "
            f"|diff| {r['loss_abs']:.1e}; gradients {r['grad_abs']:.1e} (max |grad| {r['grad_max']:.1e}). "
            f"lit-align's own tokenization gives the same ids: {r['same_tokenization']}",
            flush=True,
        )
        runs = []
        for i in range(args.repeats):
            for fw in timed_frameworks(args):  # A/B/A/B
                for _ in range(3):  # the machine may be shared: repeat a run that had company
                    run = run_worker(args, fw, workdir)
                    w = run["wall"]
                    print(
                        f"  run {i + 1} {fw}: median step {statistics.median(w):.3f} s (min {min(w):.3f}, max "
                        f"{max(w):.3f}), {run['trained']:,} parameters trained, {run['memory']} "
                        f"{run['peak_rss'] / MIB:.0f} MiB, other processes {run['other_cores']:.2f} cores",
                        flush=True,
                    )
                    if run["other_cores"] <= args.max_other_load:
                        break
                runs.append(run)
    print(
        f"\n{tuning(args)}; TRL {trl.__version__}, torch {torch.__version__}, {device_caption(args)}, "
        f"{os.cpu_count()} logical CPUs\n"
    )
    report(args, runs)
    print(f"\nwrote {args.out_dir / 'against_trl.csv'} and .png ({time.perf_counter() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
