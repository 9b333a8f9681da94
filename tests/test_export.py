"""Export to Hugging Face folders: full, adapter-only and merged LoRA; CLI step and callback."""

from __future__ import annotations

import pytest
import torch
from conftest import quiet_trainer
from transformers import AutoModelForCausalLM, AutoTokenizer

from lit_align.callbacks import ExportHF
from lit_align.cli import main
from lit_align.data import PreferenceDataModule, WordRulesTask
from lit_align.data.labels import IGNORE_INDEX
from lit_align.methods import DPO
from lit_align.model.backbone import Backbone
from lit_align.model.export import export_policy
from lit_align.settings import LoRA, ModelSettings, OptimizerSettings


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIT_ALIGN_CACHE", str(tmp_path / "cache"))


def train(module, tmp_path, callbacks=(), steps=5):
    data = PreferenceDataModule(batch_size=8, max_length=48, task=WordRulesTask(num_train=64, num_val=16))
    trainer = quiet_trainer(
        max_steps=steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=list(callbacks),
        default_root_dir=tmp_path,
    )
    trainer.fit(module, data)
    return next(iter(data.val_dataloader()))


def logps_of(model, batch):
    """Independent path: the loaded model's own logits, not the backbone's chunked code."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    picked = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return (picked * (labels != IGNORE_INDEX)).sum(-1)


def trained_logps(module, batch) -> torch.Tensor:
    module.eval()
    with torch.no_grad():
        return module.backbone.logps(batch).sum


def test_full_model_export_reloads_with_same_logps(tmp_path):
    module = DPO(optimizer=OptimizerSettings(lr=1e-2))
    batch = train(module, tmp_path, callbacks=[ExportHF(str(tmp_path / "export"))])
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    torch.testing.assert_close(logps_of(reloaded, batch), trained_logps(module, batch), atol=1e-5, rtol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "export")
    assert tokenizer("Reverse: ab")["input_ids"] == module.tokenizer("Reverse: ab")["input_ids"]
    assert tokenizer.chat_template == module.tokenizer.chat_template
    # the exported folder is also a valid `name_or_path` for the next stage (e.g. DPO after SFT)
    local = Backbone(ModelSettings(name_or_path=str(tmp_path / "export")), needs_reference=True)
    with torch.no_grad():
        torch.testing.assert_close(local.logps(batch).sum, trained_logps(module, batch), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(local.reference_logps(batch).sum, trained_logps(module, batch), atol=1e-5, rtol=1e-5)
    fresh = Backbone(ModelSettings(), needs_reference=False)  # the untrained weights differ
    assert (logps_of(fresh.policy, batch) - trained_logps(module, batch)).abs().max() > 1e-3


def test_lora_adapter_and_merged_exports_reload_with_same_logps(tmp_path):
    from peft import PeftModel

    module = DPO(model=ModelSettings(lora=LoRA(r=4)), optimizer=OptimizerSettings(lr=1e-2))
    batch = train(module, tmp_path, callbacks=[ExportHF(str(tmp_path / "export"))])
    expected = trained_logps(module, batch)
    base = Backbone(ModelSettings(), needs_reference=False).policy  # the same seeded base weights
    adapter = PeftModel.from_pretrained(base, tmp_path / "export" / "adapter")
    torch.testing.assert_close(logps_of(adapter, batch), expected, atol=1e-5, rtol=1e-5)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "merged")
    assert not hasattr(merged, "peft_config")
    torch.testing.assert_close(logps_of(merged, batch), expected, atol=1e-5, rtol=1e-5)
    # the module itself still has its adapters (merging worked on a copy)
    assert module.backbone.is_peft


def _marked_as_gguf(model) -> None:
    """Mark a model as transformers marks one read from a GGUF file (its weights are floats)."""
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
    from transformers.utils.quantization_config import GgufConfig

    model.hf_quantizer = GgufHfQuantizer(GgufConfig())
    model.is_quantized = True
    model.config.quantization_config = GgufConfig()


@pytest.mark.parametrize("lora", [None, LoRA(r=4)], ids=["full", "lora-merged"])
def test_a_model_read_from_gguf_exports_as_the_float_model_it_is(tmp_path, lora):
    """Transformers refuses to save a model it read from GGUF ("quantized with gguf and is not
    serializable") although its weights are floats: the export saves it, the folder reloads with
    the same log-probs and without a quantization config, and the live model keeps its marks."""
    module = DPO(model=ModelSettings(lora=lora), optimizer=OptimizerSettings(lr=1e-2))
    base = module.backbone.policy.get_base_model() if lora else module.backbone.policy
    _marked_as_gguf(base)
    batch = train(module, tmp_path, steps=2)
    expected = trained_logps(module, batch)
    export_policy(module.backbone, tmp_path / "export", merge_lora=lora is not None)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert getattr(reloaded.config, "quantization_config", None) is None
    torch.testing.assert_close(logps_of(reloaded, batch), expected, atol=1e-5, rtol=1e-5)
    assert base.is_quantized and base.hf_quantizer is not None and base.config.quantization_config is not None


def test_cli_export_from_checkpoint(tmp_path, capsys):
    root = tmp_path / "run"
    main(
        [
            "fit",
            "--config",
            "configs/dpo.yaml",
            "--trainer.max_steps",
            "3",
            "--trainer.val_check_interval",
            "3",
            "--trainer.default_root_dir",
            str(root),
            "--trainer.logger",
            "false",
            "--validate_before_fit",
            "false",
            "--data.init_args.task.num_train",
            "48",
            "--data.init_args.task.num_val",
            "16",
        ]
    )
    checkpoint = next(root.rglob("*.ckpt"))
    main(["export", "--ckpt_path", str(checkpoint), "--output_dir", str(tmp_path / "out")])
    assert "exported to" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    state = torch.load(checkpoint, weights_only=False)["state_dict"]
    torch.testing.assert_close(model.model.embed_tokens.weight, state["backbone.policy.model.embed_tokens.weight"])
    with pytest.raises(SystemExit, match="does not exist"):
        main(["export", "--ckpt_path", str(tmp_path / "nope.ckpt"), "--output_dir", str(tmp_path / "x")])


def test_failed_export_leaves_previous_export_intact(tmp_path, monkeypatch):
    backbone = Backbone(ModelSettings(), needs_reference=False)
    target = tmp_path / "export"
    export_policy(backbone, target)
    before = sorted(p.name for p in target.iterdir())

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(backbone.policy), "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_policy(backbone, target)
    assert sorted(p.name for p in target.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no staging folder left behind
