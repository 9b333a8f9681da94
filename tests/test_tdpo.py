"""TDPO: chunked per-token KL against full logits, the pure loss by hand, the module's reference
requirements, and the built-in task through the CLI.

Loss values are derived with ``math`` from the paper's definitions; sp(z) = log(1 + e^z) = -log sigma(-z).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import QUIET_FLAGS, metrics_table, seed_flags, short_run_flags
from torch.testing import assert_close

from lit_align.data.collate import PackedPairCollator, PairCollator
from lit_align.data.labels import shift_labels
from lit_align.errors import SettingError
from lit_align.losses import tdpo_loss
from lit_align.methods import TDPO
from lit_align.model.backbone import Backbone
from lit_align.model.token_kl import batch_token_kl, chunked_token_kl
from lit_align.settings import LoRA, ModelSettings

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TOL = {"rtol": 1e-9, "atol": 1e-12}


def t(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def sp(z: float) -> float:
    return math.log1p(math.exp(z))


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def naive_token_kl(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels):
    """Full [.., V] logits of both models: KL(q || p) = sum q (log q - log p), label log-probs."""
    logp = torch.log_softmax(hidden @ weight.T + bias, dim=-1)
    logq = torch.log_softmax(ref_hidden @ ref_weight.T + ref_bias, dim=-1)
    valid = labels != -100
    kl = (logq.exp() * (logq - logp)).sum(-1) * valid
    index = labels.clamp(min=0)[..., None]
    return kl, logp.gather(-1, index).squeeze(-1) * valid, logq.gather(-1, index).squeeze(-1) * valid


# ----------------------------------------------------------------------------- chunked KL
def random_heads(seed=0, rows=3, positions=11, width=16, vocab=37):
    g = torch.Generator().manual_seed(seed)

    def make(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    hidden, weight, bias = make(rows, positions, width), make(vocab, width), make(vocab)
    ref_hidden, ref_weight, ref_bias = make(rows, positions, width), make(vocab, width), make(vocab)
    labels = torch.randint(0, vocab, (rows, positions), generator=g)
    labels[:, :4] = -100  # prompt
    labels[0, 8:] = -100  # padding after a shorter response
    return hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels


def test_chunked_token_kl_equals_full_logits_values_and_gradients():
    """fp64, 33 positions in chunks of 5, prompt and padding labels: values and every gradient match."""
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels = random_heads()
    leaves = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
    out = chunked_token_kl(leaves[0], leaves[1], ref_hidden, ref_weight, labels, leaves[2], ref_bias, chunk_size=5)
    # weights of the two outputs differ so both backward paths are checked
    (0.7 * out.kl.sum() + 1.3 * out.logps.sum()).backward()
    naive_leaves = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
    kl, logps, ref_logps = naive_token_kl(
        naive_leaves[0], naive_leaves[1], naive_leaves[2], ref_hidden, ref_weight, ref_bias, labels
    )
    (0.7 * kl.sum() + 1.3 * logps.sum()).backward()
    assert_close(out.kl, kl, **TOL)
    assert_close(out.logps, logps, **TOL)
    assert_close(out.reference_logps, ref_logps, **TOL)
    for ours, theirs in zip(leaves, naive_leaves, strict=True):
        assert_close(ours.grad, theirs.grad, **TOL)
    masked = labels == -100
    assert torch.all(out.kl[masked] == 0) and torch.all(out.logps[masked] == 0)
    assert torch.all(leaves[0].grad[masked] == 0)  # no gradient reaches prompt or padding positions
    assert not out.reference_logps.requires_grad


def test_chunked_token_kl_float32_matches_float64():
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels = random_heads(seed=1)
    exact = chunked_token_kl(hidden, weight, ref_hidden, ref_weight, labels, bias, ref_bias, chunk_size=7)
    single = chunked_token_kl(
        *(x.float() for x in (hidden, weight, ref_hidden, ref_weight)),
        labels,
        bias.float(),
        ref_bias.float(),
        chunk_size=7,
    )
    assert single.kl.dtype == torch.float32
    assert_close(single.kl.double(), exact.kl, rtol=1e-4, atol=1e-5)
    assert_close(single.logps.double(), exact.logps, rtol=1e-5, atol=1e-5)


def test_kl_is_zero_for_identical_models_and_positive_otherwise():
    hidden, weight, bias, ref_hidden, _, _, labels = random_heads(seed=2)
    same = chunked_token_kl(hidden, weight, hidden, weight, labels, bias, bias, chunk_size=4)
    assert torch.all(same.kl == 0)
    assert_close(same.logps, same.reference_logps, rtol=0, atol=0)
    other = chunked_token_kl(hidden, weight, ref_hidden, weight, labels, bias, bias, chunk_size=4)
    scored = labels != -100
    assert torch.all(other.kl[scored] > 0)


def test_chunk_size_must_be_positive():
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels = random_heads()
    with pytest.raises(ValueError, match="chunk_size must be positive"):
        chunked_token_kl(hidden, weight, ref_hidden, ref_weight, labels, bias, ref_bias, chunk_size=0)


# ----------------------------------------------------------------------------- batches through the backbone
def tiny_batch(tokenizer, packed=False):
    pairs = (("Write in capitals: abc\n", "ABC", "abc"), ("Write in lowercase: QRSTU\n", "qrstu", "QRSTU"))
    examples = [
        {
            "prompt": tokenizer(p)["input_ids"],
            "chosen": tokenizer(c)["input_ids"] + [tokenizer.eos_token_id],
            "rejected": tokenizer(r)["input_ids"] + [tokenizer.eos_token_id],
        }
        for p, c, r in pairs
    ]
    if packed:
        return PackedPairCollator(capacity=96)(examples)
    return PairCollator(tokenizer.pad_token_id)(examples)


def perturb(model, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


def test_batch_token_kl_equals_full_logits_of_policy_and_copy_reference():
    """Padded batch of unequal lengths, chunks of 3 positions: KL, both log-probs and the policy's
    parameter gradients equal the full-logits computation with both models; packed == padded."""
    backbone = Backbone(ModelSettings(reference="copy", logp_chunk_size=3), needs_reference=True)
    batch = tiny_batch(backbone.tokenizer)
    at_start = batch_token_kl(backbone, batch)
    assert torch.all(at_start.kl.tokens == 0)  # the copy is the initial policy
    perturb(backbone.policy)
    rows = batch_token_kl(backbone, batch)
    (rows.kl.sum.sum() + rows.policy.sum.sum()).backward()
    chunked_grads = {n: p.grad.clone() for n, p in backbone.policy.named_parameters()}
    backbone.policy.zero_grad()

    labels = shift_labels(batch["labels"])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    logp = torch.log_softmax(backbone.policy(**inputs).logits.double(), -1)
    with torch.no_grad():
        logq = torch.log_softmax(backbone.reference(**inputs).logits.double(), -1)
    valid = labels != -100
    kl = (logq.exp() * (logq - logp)).sum(-1) * valid
    index = labels.clamp(min=0)[..., None]
    logps = logp.gather(-1, index).squeeze(-1) * valid
    (kl.sum() + logps.sum()).backward()
    assert_close(rows.kl.tokens.double(), kl.detach(), rtol=1e-4, atol=1e-6)
    assert_close(rows.policy.tokens.double(), logps.detach(), rtol=1e-5, atol=1e-5)
    assert_close(rows.reference.tokens.double(), logq.gather(-1, index).squeeze(-1) * valid, rtol=1e-5, atol=1e-5)
    assert torch.all(rows.kl.sum > 0)
    for name, p in backbone.policy.named_parameters():
        assert_close(chunked_grads[name], p.grad.float(), rtol=1e-3, atol=1e-5, msg=name)
    # the label log-probs are the backbone's own
    assert_close(rows.policy.tokens, backbone.logps(batch).tokens, rtol=1e-5, atol=1e-6)
    packed = batch_token_kl(backbone, tiny_batch(backbone.tokenizer, packed=True))
    assert_close(packed.kl.tokens, rows.kl.tokens[:, : packed.kl.tokens.shape[1]], rtol=1e-4, atol=1e-5)


def test_batch_token_kl_with_adapter_reference():
    backbone = Backbone(ModelSettings(lora=LoRA(r=4)), needs_reference=True)
    assert backbone.reference_source.name == "adapter"
    batch = tiny_batch(backbone.tokenizer)
    assert torch.all(batch_token_kl(backbone, batch).kl.tokens == 0)  # LoRA B starts at zero
    with torch.no_grad():
        for name, p in backbone.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    rows = batch_token_kl(backbone, batch)
    assert torch.all(rows.kl.sum > 0)
    base = Backbone(ModelSettings(), needs_reference=False)  # same seed: the adapter-free weights
    assert_close(rows.reference.tokens, base.logps(batch).tokens, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- the pure loss
# row 0: u = beta((-1+2) - (-3+2)) = 0.5 * 2 = 1; KL_w = 0.5, KL_l = 2.
# row 1: every log-ratio and KL is 0.
PC, PR, RC, RR, KW, KL_ = t(-1.0, -2.0), t(-3.0, -2.0), t(-2.0, -2.0), t(-2.0, -2.0), t(0.5, 0.0), t(2.0, 0.0)
BETA, ALPHA = 0.5, 0.5


def test_tdpo1_hand_value():
    """TDPO1: delta = beta KL_l - beta KL_w = 1 - 0.25 = 0.75; loss = -log sigma(u - delta) = sp(-0.25).

    Rewards r = beta (log-ratio + KL): r_w = 0.5 (1 + 0.5) = 0.75, r_l = 0.5 (-1 + 2) = 0.5, and
    r_w - r_l = 0.25 = u - delta. Row 1: loss log 2, rewards 0.
    """
    out = tdpo_loss(PC, PR, RC, RR, KW, KL_, beta=BETA, alpha=ALPHA, variant="tdpo1")
    assert_close(out.losses, t(sp(-0.25), math.log(2.0)), **TOL)
    assert out.losses[0].item() == pytest.approx(0.5759394, abs=1e-7)
    assert_close(out.chosen_rewards, t(0.75, 0.0), **TOL)
    assert_close(out.rejected_rewards, t(0.5, 0.0), **TOL)
    assert_close(out.metrics["kl/chosen"], KW, **TOL)
    assert_close(out.metrics["kl/rejected"], KL_, **TOL)


def test_tdpo2_hand_value():
    """TDPO2: alpha (beta KL_l - sg(beta KL_w)) = 0.5 * 0.75 = 0.375; loss = sp(-(1 - 0.375)) = sp(-0.625)."""
    out = tdpo_loss(PC, PR, RC, RR, KW, KL_, beta=BETA, alpha=ALPHA, variant="tdpo2")
    assert_close(out.losses, t(sp(-0.625), math.log(2.0)), **TOL)
    assert out.losses[0].item() == pytest.approx(0.4287007, abs=1e-7)
    assert_close(out.chosen_rewards, t(0.75, 0.0), **TOL)
    assert_close(out.rejected_rewards, t(0.5, 0.0), **TOL)
    # the default is TDPO2 with alpha = 0.5
    assert_close(tdpo_loss(PC, PR, RC, RR, KW, KL_, beta=BETA).losses, out.losses, **TOL)


def kl_grads(variant):
    kw, kl = KW.clone().requires_grad_(True), KL_.clone().requires_grad_(True)
    tdpo_loss(PC, PR, RC, RR, kw, kl, beta=BETA, alpha=ALPHA, variant=variant).losses.sum().backward()
    return kw.grad, kl.grad


def test_tdpo2_stops_the_gradient_of_the_chosen_kl():
    """loss = sp(-x); d loss/dx = -sigma(-x).
    TDPO2: x = u - alpha beta KL_l + alpha sg(beta KL_w): dL/dKL_w = 0, dL/dKL_l = alpha beta sigma(-x), x = 0.625.
    TDPO1: x = u - beta KL_l + beta KL_w: dL/dKL_w = -beta sigma(-x), dL/dKL_l = beta sigma(-x), x = 0.25.
    Row 1 has x = 0, sigma(0) = 1/2.
    """
    grad_w, grad_l = kl_grads("tdpo2")
    assert grad_w is None or not torch.any(grad_w)  # nothing reaches the chosen KL
    assert_close(grad_l, t(ALPHA * BETA * sigmoid(-0.625), ALPHA * BETA * 0.5), **TOL)
    grad_w, grad_l = kl_grads("tdpo1")
    assert_close(grad_w, t(-BETA * sigmoid(-0.25), -BETA * 0.5), **TOL)
    assert_close(grad_l, t(BETA * sigmoid(-0.25), BETA * 0.5), **TOL)


def test_unknown_variant_is_named():
    with pytest.raises(ValueError, match="'tdpo1' or 'tdpo2'"):
        tdpo_loss(PC, PR, RC, RR, KW, KL_, variant="tdpo3")


# ----------------------------------------------------------------------------- the module
@pytest.mark.parametrize(
    "reference, message",
    [
        (
            "cached",
            "TDPO needs the reference model's logits over the whole vocabulary.*reference=cached.*copy or adapter",
        ),
        ("none", "TDPO: model.reference=none, but this method needs a reference model; use copy, adapter or cached"),
    ],
)
def test_tdpo_needs_reference_logits(reference, message):
    with pytest.raises(SettingError, match=message):
        TDPO(model=ModelSettings(reference=reference))


def test_tdpo_module_forward_pair_and_rewards():
    module = TDPO(model=ModelSettings(reference="copy", logp_chunk_size=4), beta=0.2, variant="tdpo1")
    batch = tiny_batch(module.tokenizer)
    output = module.forward_pair(batch)
    assert_close(output.losses, torch.full((2,), math.log(2.0)), rtol=0, atol=1e-6)  # policy == reference
    perturb(module.backbone.policy)
    output = module.forward_pair(batch)
    assert torch.all(output.metrics["kl/chosen"] > 0) and torch.all(output.metrics["kl/rejected"] > 0)
    output.losses.mean().backward()
    assert all(p.grad is not None for p in module.backbone.policy.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- CLI
@pytest.mark.slow
def test_tdpo_learns_the_builtin_task_through_the_cli(tmp_path, monkeypatch, capsys, measured):
    from lit_align.cli import main

    monkeypatch.chdir(tmp_path)
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "tdpo.yaml"),
            *short_run_flags(80),
            *QUIET_FLAGS,
            *seed_flags(),
        ]
    )
    rows = metrics_table()
    accuracies = measured(
        "val/rewards/accuracies", [float(r["val/rewards/accuracies"]) for r in rows if r.get("val/rewards/accuracies")]
    )
    assert len(accuracies) == 2 and 0.35 <= accuracies[0] <= 0.65
    assert accuracies[-1] >= 0.8
    assert all(math.isfinite(float(r["train/loss"])) for r in rows if r.get("train/loss"))
    assert any(float(r["train/kl/rejected"]) > 0 for r in rows if r.get("train/kl/rejected"))
    assert "held-out val/rewards/accuracies:" in capsys.readouterr().out
