"""Worker for the step benchmarks: build one method variant, time training steps on real data.

Run by anatomy.py and padding_free.py in a fresh process per variant:

    python benchmarks/_steps.py '{"method": "DPO", "reference": "copy", ...}'

prints one JSON line: median step time, tokens/s, peak memory of the steps (RSS on CPU, allocated
device memory on CUDA), analytic FLOPs per pair and per second (with "peak_tflops": the model FLOPs
utilisation, MFU), and (with "count_flops") FLOPs counted by torch's FlopCounterMode under eager
attention. "device" (cpu | cuda) and "dtype" (float32 | bfloat16) say where and in what the model
runs (default cpu, float32).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PeakRSS, emit, median  # noqa: E402

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
METHOD_ARGS = {"DPO": {"beta": 0.1}, "IPO": {"beta": 0.1}, "ORPO": {"lam": 0.1}, "SimPO": {}, "CPO": {}}


def build(spec: dict, attn: str = "sdpa"):
    import lit_align.methods as methods
    from lit_align.settings import LoRA, ModelSettings, OptimizerSettings, TinyModel

    tiny = TinyModel(
        hidden_size=spec["hidden"],
        num_layers=spec["layers"],
        num_heads=spec["heads"],
        intermediate_size=spec["intermediate"],
        vocab_size=spec["vocab"],
        max_position_embeddings=4096,
    )
    settings = ModelSettings(
        tiny=tiny,
        dtype=spec.get("dtype", "float32"),
        reference=spec["reference"],
        attn_implementation=attn,
        lora=LoRA(r=16, alpha=32) if spec.get("lora") else None,
    )
    cls = getattr(methods, spec["method"])
    return cls(model=settings, optimizer=OptimizerSettings(lr=1e-5), **METHOD_ARGS[spec["method"]])


def batches(module, spec: dict, cache_dir: str) -> list[dict]:
    from lit_align.data import PreferenceDataModule
    from lit_align.model.reference_cache import attach_reference_logps

    pairs = spec["batch"] * (spec["steps"] + spec["warmup"])
    data = PreferenceDataModule(
        train=str(HH),
        val=str(HH),
        max_records=pairs,
        max_length=spec["max_length"],
        batch_size=spec["batch"],
        packing=spec.get("packing", False),
        cache_dir=cache_dir,
    )
    data.tokenizer = module.tokenizer
    data.setup("fit")
    if module.backbone.reference_source.precomputed:
        attach_reference_logps(module.backbone, data, policy_is_initial=True, device=device_of(spec))
    examples = data.datasets["train"]
    return [
        data.collate(examples[i : i + spec["batch"]])
        for i in range(0, len(examples) - spec["batch"] + 1, spec["batch"])
    ]


def device_of(spec: dict) -> torch.device:
    return torch.device(spec.get("device", "cpu"))


def on_device(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}


class PeakDeviceMemory:
    """Context manager: ``.delta`` = peak allocated CUDA memory inside the block minus that on entry."""

    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.start = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.synchronize()
        self.delta = torch.cuda.max_memory_allocated() - self.start


def count_flops(spec: dict, batch: dict) -> tuple[int, int]:
    """(counted, analytic) FLOPs of one training step on the eager-attention, full-logits path,
    where every matmul is an aten op that FlopCounterMode sees (the chunked path's backward
    recompute of the LM head would be counted too, though it is not model FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    module = build(spec, attn="eager").to(batch["input_ids"].device)
    module.backbone.settings.logp_chunk_size = None
    with FlopCounterMode(display=False) as counter:
        module.forward_pair(batch).losses.mean().backward()
    return counter.get_total_flops(), module.backbone.step_flops(batch, train=True)


def main(spec: dict) -> dict:
    torch.manual_seed(0)
    device = device_of(spec)
    module = build(spec).to(device)
    with tempfile.TemporaryDirectory() as cache_dir:
        data = [on_device(batch, device) for batch in batches(module, spec, cache_dir)]
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-5)
    module.train()
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(batch):
        optimizer.zero_grad(set_to_none=True)
        module.forward_pair(batch).losses.mean().backward()
        optimizer.step()

    for batch in data[: spec["warmup"]]:
        step(batch)
    times, tokens = [], []
    with PeakDeviceMemory() if device.type == "cuda" else PeakRSS() as peak:
        for batch in data[spec["warmup"] :]:
            synchronize()
            start = time.perf_counter()
            step(batch)
            synchronize()
            times.append(time.perf_counter() - start)
            tokens.append(int(batch["seq_lens"].sum()) if "seq_lens" in batch else int(batch["attention_mask"].sum()))
    pairs = spec["batch"]
    flops_per_step = module.backbone.step_flops(data[0], train=True)
    result = {
        **spec,
        "step_s": median(times),
        # the median step's rate, like step_s: one slow step (a GPU's first large allocation) does not move it
        "tokens_per_s": median(n / t for n, t in zip(tokens, times, strict=True)),
        "peak_step_mib": peak.delta / 2**20,
        "flops_per_pair": flops_per_step / pairs,
        "model_tflops_per_s": flops_per_step / median(times) / 1e12,
        "sequence_forwards_per_pair": 2 * (1 + int(module.backbone.reference_source.runs_forward)),
        "model_calls_per_step": 1 + int(module.backbone.reference_source.runs_forward),
    }
    if spec.get("peak_tflops"):
        result["mfu"] = result["model_tflops_per_s"] / spec["peak_tflops"]
    if spec.get("count_flops"):
        counted, analytic = count_flops(spec, data[0])
        result["counted_over_analytic"] = counted / analytic
    return result


if __name__ == "__main__":
    emit(main(json.loads(sys.argv[1])))
