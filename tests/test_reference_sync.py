"""Reference updating: TR-DPO's ReferenceSync and sDPO's StepwiseDPO callbacks."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import QUIET_FLAGS, metrics_table, quiet_trainer, seed_flags
from torch.testing import assert_close
from torch.utils.data import DataLoader

from lit_align.callbacks import ReferenceSync, StepwiseDPO, reference_sync
from lit_align.callbacks.reference_sync import update_reference
from lit_align.data import PreferenceDataModule
from lit_align.data.collate import PairCollator
from lit_align.data.tasks import WordRulesTask
from lit_align.errors import SettingError
from lit_align.methods import DPO
from lit_align.model.backbone import Backbone
from lit_align.settings import LoRA, ModelSettings, OptimizerSettings

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def tiny_batch(tokenizer):
    pairs = (("Write in capitals: abc\n", "ABC", "abc"), ("Write in lowercase: QRS\n", "qrs", "QRS"))
    examples = [
        {
            "prompt": tokenizer(p)["input_ids"],
            "chosen": tokenizer(c)["input_ids"] + [tokenizer.eos_token_id],
            "rejected": tokenizer(r)["input_ids"] + [tokenizer.eos_token_id],
        }
        for p, c, r in pairs
    ]
    return PairCollator(tokenizer.pad_token_id)(examples)


def perturb(model, scale=0.05, seed=0, only=None):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and (only is None or only in name):
                p.add_(scale * torch.randn(p.shape, generator=g))


def max_difference(backbone) -> float:
    policy = dict(backbone.policy.named_parameters())
    return max(float((p - policy[n]).abs().max()) for n, p in backbone.reference.named_parameters())


# ----------------------------------------------------------------------------- weight updates
def test_hard_sync_makes_the_reference_the_policy():
    backbone = Backbone(ModelSettings(reference="copy"), needs_reference=True)
    batch = tiny_batch(backbone.tokenizer)
    perturb(backbone.policy)
    assert max_difference(backbone) > 0
    update_reference(backbone, alpha=1.0)
    assert max_difference(backbone) == 0
    assert torch.equal(backbone.reference_logps(batch).tokens, backbone.logps(batch).tokens)
    assert all(not p.requires_grad for p in backbone.reference.parameters())
    assert not backbone.reference.training


def test_hard_sync_with_lora_and_copy_merges_the_adapters_into_the_reference():
    backbone = Backbone(ModelSettings(lora=LoRA(r=4), reference="copy"), needs_reference=True)
    assert backbone.is_peft and not any("lora_" in n for n, _ in backbone.reference.named_parameters())
    batch = tiny_batch(backbone.tokenizer)
    perturb(backbone.policy, scale=0.3, only="lora_B")
    policy_before = backbone.logps(batch).tokens
    assert (backbone.reference_logps(batch).tokens - policy_before).abs().max() > 1e-3
    update_reference(backbone, alpha=1.0)
    # reference: plain weights W + scaling * B @ A; policy: W x + scaling * B (A x) -> rounding only
    assert_close(backbone.reference_logps(batch).tokens, policy_before, rtol=0, atol=1e-5)
    assert torch.equal(backbone.logps(batch).tokens, policy_before)  # the policy itself is untouched


def test_soft_sync_is_alpha_theta_plus_one_minus_alpha_theta_ref():
    backbone = Backbone(ModelSettings(reference="copy"), needs_reference=True)
    perturb(backbone.policy, scale=0.5)
    theta = {n: p.detach().double().clone() for n, p in backbone.policy.named_parameters()}
    theta_ref = {n: p.detach().double().clone() for n, p in backbone.reference.named_parameters()}
    alpha = 0.3
    update_reference(backbone, alpha=alpha)
    for name, p in backbone.reference.named_parameters():
        expected = alpha * theta[name] + (1 - alpha) * theta_ref[name]
        assert_close(p.double(), expected, rtol=0, atol=1e-6, msg=name)  # float32 rounding only
        assert not torch.equal(p.double(), theta[name])


def test_alpha_and_interval_are_checked():
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\]"):
        ReferenceSync(every_n_steps=4, alpha=0.0)
    with pytest.raises(ValueError, match="ReferenceSync: every_n_steps must be >= 1, got 0"):
        ReferenceSync(every_n_steps=0)


# ----------------------------------------------------------------------------- within a trainer
def small_data(num_train=12, batch_size=2) -> PreferenceDataModule:
    return PreferenceDataModule(
        task=WordRulesTask(num_train=num_train, num_val=4), batch_size=batch_size, max_length=32
    )


def trainer(callbacks, **kwargs) -> L.Trainer:
    options = {"limit_val_batches": 0, "num_sanity_val_steps": 0, "inference_mode": False}
    return quiet_trainer(callbacks=callbacks, **{**options, **kwargs})


@pytest.mark.parametrize("accumulate", [1, 2])
def test_sync_every_three_optimizer_steps(monkeypatch, accumulate):
    """Every 3 optimizer steps over 7 steps: updates after steps 3 and 6; micro-batches of an
    accumulated step count once."""
    steps: list[int] = []
    real = reference_sync.update_reference
    monkeypatch.setattr(
        reference_sync,
        "update_reference",
        lambda backbone, alpha: (steps.append(run.global_step), real(backbone, alpha)),
    )
    module = DPO(model=ModelSettings(reference="copy"), optimizer=OptimizerSettings(lr=1e-2))
    callback = ReferenceSync(every_n_steps=3, alpha=1.0)
    run = trainer([callback], max_steps=7, accumulate_grad_batches=accumulate)
    run.fit(module, small_data(num_train=40))
    assert run.global_step == 7
    assert steps == [3, 6]
    assert callback.last_update_step == 6
    assert max_difference(module.backbone) > 0  # step 7 moved the policy again


class Recorder(L.Callback):
    """Per training batch: the epoch, the (prompt + chosen) token rows served, and the largest
    reference-vs-policy weight difference before the step."""

    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        half = batch["input_ids"].shape[0] // 2
        rows = [
            tuple(ids[mask.bool()].tolist())
            for ids, mask in zip(batch["input_ids"][:half], batch["attention_mask"][:half], strict=True)
        ]
        self.batches.append((trainer.current_epoch, rows, max_difference(pl_module.backbone)))


def test_stepwise_dpo_serves_one_chunk_per_epoch_and_resets_the_reference():
    module = DPO(model=ModelSettings(reference="copy"), optimizer=OptimizerSettings(lr=1e-2))
    data = small_data(num_train=12, batch_size=2)
    recorder = Recorder()
    run = trainer([StepwiseDPO(num_chunks=2), recorder], max_epochs=2)
    run.fit(module, data)
    assert run.reload_dataloaders_every_n_epochs == 1
    examples = data.datasets["train"]
    chunks = [
        {tuple(e["prompt"] + e["chosen"]) for e in examples[:6]},
        {tuple(e["prompt"] + e["chosen"]) for e in examples[6:]},
    ]
    for epoch in (0, 1):
        served = [row for e, rows, _ in recorder.batches if e == epoch for row in rows]
        assert len(served) == 6 and set(served) == chunks[epoch], epoch  # every example of chunk k once, nothing else
    differences = [(e, d) for e, _, d in recorder.batches]
    assert differences[0] == (0, 0.0)  # the copy is the initial policy
    assert all(d > 0 for e, d in differences[1:3])  # chunk 1: the policy moves away from the reference
    first_of_chunk_2 = next(d for e, d in differences if e == 1)
    assert first_of_chunk_2 == 0.0  # chunk 2 starts from reference == current policy
    assert differences[-1][1] > 0
    assert data.train_chunks is None  # switched off again after fit


# ----------------------------------------------------------------------------- errors
def test_reference_sync_refuses_adapter_and_cached_references():
    adapter = DPO(model=ModelSettings(lora=LoRA(r=4)))  # auto -> adapter
    with pytest.raises(
        ValueError,
        match=r"ReferenceSync .* model.reference=adapter: .*no separate reference weights.*set model.reference: copy",
    ):
        ReferenceSync().setup(None, adapter, "fit")
    cached = DPO(model=ModelSettings(reference="cached"))
    with pytest.raises(ValueError, match=r"model.reference=cached: .*a fixed cache cannot follow the policy"):
        ReferenceSync().setup(None, cached, "fit")
    with pytest.raises(ValueError, match=r"StepwiseDPO .* model.reference=cached"):
        StepwiseDPO().setup(None, cached, "fit")


def test_reference_sync_error_is_raised_when_fit_starts():
    module = DPO(model=ModelSettings(reference="cached"))
    with pytest.raises(ValueError, match="a fixed cache cannot follow the policy"):
        trainer([ReferenceSync(every_n_steps=2)], max_steps=2).fit(module, small_data())


class PlainData(L.LightningDataModule):
    def train_dataloader(self):
        return DataLoader([], batch_size=1)


def test_stepwise_dpo_needs_a_chunked_data_module_and_matching_epochs():
    module = DPO(model=ModelSettings(reference="copy"))
    with pytest.raises(SettingError, match="StepwiseDPO needs a data module that serves one chunk .* got PlainData"):
        trainer([StepwiseDPO(num_chunks=2)], max_epochs=2).fit(module, datamodule=PlainData())
    with pytest.raises(ValueError, match="set trainer.max_epochs to num_chunks=3 .*got max_epochs=2"):
        trainer([StepwiseDPO(num_chunks=3)], max_epochs=2).fit(module, small_data())


# ----------------------------------------------------------------------------- CLI
def cli_accuracies(tmp_path, monkeypatch, capsys, config, *overrides) -> list[float]:
    from lit_align.cli import main

    monkeypatch.chdir(tmp_path)
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / config),
            "--trainer.enable_checkpointing",
            "false",
            *QUIET_FLAGS,
            *overrides,
            *seed_flags(),
        ]
    )
    rows = metrics_table()
    assert all(math.isfinite(float(r["train/loss"])) for r in rows if r.get("train/loss"))
    assert "held-out val/rewards/accuracies:" in capsys.readouterr().out
    return [float(r["val/rewards/accuracies"]) for r in rows if r.get("val/rewards/accuracies")]


@pytest.mark.slow
def test_tr_dpo_config_learns_the_builtin_task(tmp_path, monkeypatch, capsys, measured):
    accuracies = measured(
        "val/rewards/accuracies",
        cli_accuracies(
            tmp_path,
            monkeypatch,
            capsys,
            "tr_dpo.yaml",
            "--trainer.max_steps",
            "80",
            "--trainer.val_check_interval",
            "80",
        ),
    )
    assert len(accuracies) == 2 and 0.35 <= accuracies[0] <= 0.65
    assert accuracies[-1] >= 0.8


@pytest.mark.slow
def test_sdpo_config_learns_the_builtin_task(tmp_path, monkeypatch, capsys, measured):
    accuracies = measured("val/rewards/accuracies", cli_accuracies(tmp_path, monkeypatch, capsys, "sdpo.yaml"))
    assert len(accuracies) == 3, accuracies  # before fit, after chunk 1, after chunk 2
    assert 0.35 <= accuracies[0] <= 0.65
    assert accuracies[-1] >= 0.8
