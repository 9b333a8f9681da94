"""What LoRA adds to a decoder's forward and backward, and how much of it is peft's wrapper.

A randomly initialised Llama (SmolLM2-135M's shape by default), rows of ``--seq`` tokens, fp32,
sdpa; each variant times the decoder's forward and backward (the sum of the last hidden states
as the loss, no LM head), in one process, the variants alternating round by round:

- ``frozen``: peft's model with its adapters disabled (``disable_adapter()``): the backward
  computes input gradients only, no weight gradients: the least a LoRA step could cost;
- ``peft LoRA``: rank ``--rank`` adapters on every linear layer (alpha 2 x rank, no dropout) as
  peft runs them: ``base(x) + lora_B(lora_A(x)) * scaling``, two output-sized temporaries;
- ``in-place LoRA``: the same adapters and arithmetic, the adapter's product added into the base
  layer's output in place (``addmm_`` with alpha = scaling), no temporaries: what a leaner wrapper
  than peft's would save.

The inputs are embeddings that require gradients, so every variant runs the backward through every
layer. lit-align trains with peft's wrapper; this measures whether replacing it would pay.

    python benchmarks/lora_overhead.py            # SmolLM2-135M's shape, 4 rows of 512 tokens (~4 min)
    python benchmarks/lora_overhead.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default, text in (
        ("hidden", 576, "hidden size"),
        ("layers", 30, "decoder layers"),
        ("heads", 9, "attention heads"),
        ("kv-heads", 3, "key/value heads"),
        ("intermediate", 1536, "MLP width"),
        ("rows", 4, "rows per step"),
        ("seq", 512, "tokens per row"),
        ("rank", 16, "LoRA rank"),
        ("rounds", 9, "rounds (each times every variant once; the first is warm-up)"),
        ("threads", 2, "torch threads"),
    ):
        p.add_argument(f"--{name}", type=int, default=default, help=text)
    p.add_argument("--out-dir", type=Path, default=HERE / "results")
    p.add_argument("--quick", action="store_true", help="smoke run: small model, 2 rounds")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate, args.seq, args.rounds = (
            64,
            2,
            4,
            2,
            128,
            64,
            2,
        )
    return args


def in_place_lora_forward(self, x, *args, **kwargs):
    """peft's ``lora.Linear.forward`` for one active vanilla adapter, with the adapter's product
    added into the base layer's output in place (the base linear's backward does not need its
    output, so autograd allows it); anything else goes to peft's own forward."""
    from peft.tuners.lora import layer

    if self.disable_adapters or self.merged or list(self.active_adapters) != ["default"] or self.lora_variant:
        return layer.Linear._peft_forward(self, x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    down = self.lora_A["default"](x)
    result.view(-1, result.shape[-1]).addmm_(
        down.view(-1, down.shape[-1]), self.lora_B["default"].weight.t(), alpha=self.scaling["default"]
    )
    return result


def main() -> None:
    args = parse_args()
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import layer
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        intermediate_size=args.intermediate,
        vocab_size=1024,  # no LM head runs: the vocabulary only sizes the unused embedding
        max_position_embeddings=args.seq,
        attn_implementation="sdpa",
    )
    model = get_peft_model(
        LlamaForCausalLM(config),
        LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules="all-linear"),
    )
    wrappers = [m for m in model.modules() if isinstance(m, layer.Linear)]
    for m in wrappers:  # B = 0 at peft's initialisation: give the adapters a value to add
        torch.nn.init.normal_(m.lora_B["default"].weight, std=0.01)
    decoder = model.base_model.model.model
    embeds = torch.randn(args.rows, args.seq, args.hidden, requires_grad=True)
    layer.Linear._peft_forward = layer.Linear.forward

    def step() -> float:
        started = time.perf_counter()
        decoder(inputs_embeds=embeds).last_hidden_state.sum().backward()
        model.zero_grad(set_to_none=True)
        embeds.grad = None
        return time.perf_counter() - started

    def frozen() -> float:
        with model.disable_adapter():
            return step()

    def in_place() -> float:
        layer.Linear.forward = in_place_lora_forward
        try:
            return step()
        finally:
            layer.Linear.forward = layer.Linear._peft_forward

    def values_and_gradients() -> list:
        """The decoder's output on a slice of the inputs and the first adapter's gradients."""
        out = decoder(inputs_embeds=embeds[:1, :32]).last_hidden_state
        out.sum().backward()
        grads = [wrappers[0].lora_A["default"].weight.grad.clone(), wrappers[0].lora_B["default"].weight.grad.clone()]
        model.zero_grad(set_to_none=True)
        embeds.grad = None
        return [out.detach(), *grads]

    peft_values = values_and_gradients()
    layer.Linear.forward = in_place_lora_forward
    in_place_values = values_and_gradients()
    layer.Linear.forward = layer.Linear._peft_forward
    difference = max((a - b).abs().max().item() for a, b in zip(peft_values, in_place_values, strict=True))
    variants = {"frozen": frozen, "peft LoRA": step, "in-place LoRA": in_place}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(args.rounds):
        for name, run in variants.items():
            times[name].append(run())
        print(f"round {round_ + 1}: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()), flush=True)
    timed = {name: t[1:] if len(t) > 1 else t for name, t in times.items()}
    frozen_s = statistics.median(timed["frozen"])
    print(
        f"\n{len(wrappers)} LoRA layers of rank {args.rank}, {args.rows} rows x {args.seq} tokens, width "
        f"{args.hidden}, {args.layers} layers, {args.threads} threads; in-place vs peft: max |diff| of outputs "
        f"{difference:.1e} (and in the first adapter's gradients)\n\n"
        "| variant | median forward+backward s | vs frozen |\n|---|---|---|"
    )
    rows = []
    for name, t in timed.items():
        median = statistics.median(t)
        rows.append({"variant": name, "median_s": round(median, 4), "vs_frozen": round(median / frozen_s, 4)})
        print(f"| {name} | {median:.3f} | {median / frozen_s:.2f}x |")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with open(args.out_dir / "lora_overhead.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    bars = ax.bar(
        [r["variant"] for r in rows], [r["median_s"] for r in rows], color=["tab:gray", "tab:blue", "tab:green"]
    )
    ax.bar_label(bars, labels=[f"{r['median_s']:.2f} ({r['vs_frozen']:.2f}x)" for r in rows])
    ax.set_ylabel("median forward+backward (s)")
    ax.set_ylim(0, 1.15 * max(r["median_s"] for r in rows))
    ax.set_title(
        f"decoder fwd+bwd, rank-{args.rank} LoRA, {args.rows} x {args.seq} tokens, {args.layers} layers", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(args.out_dir / "lora_overhead.png", dpi=120)
    print(f"\nwrote {args.out_dir / 'lora_overhead.csv'} and .png")


if __name__ == "__main__":
    main()
