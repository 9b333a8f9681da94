"""Cached reference log-probs: same training as a frozen copy, no reference forward, reuse and
invalidation of the stored file."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import quiet_trainer

import lit_align.model.reference_cache as reference_cache
from lit_align.data import PreferenceDataModule, WordRulesTask
from lit_align.errors import SettingError
from lit_align.methods import DPO
from lit_align.settings import LoRA, ModelSettings, OptimizerSettings, TinyModel


def make(reference: str, seed: int = 0, lora=None, max_length: int = 48):
    L.seed_everything(0)
    module = DPO(
        model=ModelSettings(reference=reference, lora=lora, tiny=TinyModel(seed=seed)),
        optimizer=OptimizerSettings(lr=1e-2),
    )
    data = PreferenceDataModule(batch_size=8, max_length=max_length, task=WordRulesTask(num_train=64, num_val=16))
    return module, data


def fit(module, data, steps=5):
    trainer = quiet_trainer(max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0, deterministic=True)
    trainer.fit(module, data)
    return trainer


def count_calls(monkeypatch, target, name):
    calls = []
    original = getattr(target, name)

    def wrapper(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, wrapper)
    return calls


def test_cached_reference_trains_exactly_like_a_frozen_copy_without_holding_one():
    copy_module, copy_data = make("copy")
    fit(copy_module, copy_data)
    cached_module, cached_data = make("cached")
    assert cached_module.backbone.reference is None  # no second set of weights
    fit(cached_module, cached_data)
    for (name, a), b in zip(
        copy_module.backbone.policy.named_parameters(), cached_module.backbone.policy.parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


def test_per_token_cached_values_equal_the_reference_forward():
    copy_module, data = make("copy")
    cached_module, _ = make("cached")
    fit(cached_module, data, steps=1)  # attaches the cache to data's examples
    batch = next(iter(data.train_dataloader()))
    assert batch["reference_logps"].shape == batch["labels"].shape
    expected = copy_module.backbone.reference_logps(batch)
    got = cached_module.backbone.reference_logps(batch)
    torch.testing.assert_close(got.tokens, expected.tokens, atol=1e-5, rtol=1e-5)
    assert torch.equal(got.mask, expected.mask)


def test_training_runs_one_policy_forward_per_step_and_no_reference_forward(monkeypatch):
    module, data = make("cached")
    fit(module, data, steps=1)  # builds the cache (one pass over train and val)
    module2, data2 = make("cached")
    forwards = count_calls(monkeypatch, module2.backbone, "logps")
    fit(module2, data2, steps=4)
    assert len(forwards) == 4


def test_cache_is_reused_across_runs_and_rebuilt_when_inputs_change(monkeypatch):
    calls = count_calls(monkeypatch, reference_cache, "compute_reference_logps")
    fit(*make("cached"), steps=1)
    assert len(calls) == 2  # train and val splits
    fit(*make("cached"), steps=1)
    assert len(calls) == 2  # a second run reads the stored file
    fit(*make("cached", max_length=40), steps=1)
    assert len(calls) == 4  # data (tokenization) changed
    fit(*make("cached", seed=1), steps=1)
    assert len(calls) == 6  # model changed
    fit(*make("cached", lora=LoRA(r=4)), steps=1)
    assert len(calls) == 6  # LoRA does not change the reference (adapters are disabled for it)


def test_corrupt_cache_is_recomputed(monkeypatch):
    module, data = make("cached")
    fit(module, data, steps=1)
    path = reference_cache.reference_cache_path(data, module.backbone.settings)
    path.write_bytes(b"not a torch file")
    calls = count_calls(monkeypatch, reference_cache, "compute_reference_logps")
    fit(*make("cached"), steps=1)
    assert len(calls) == 2
    assert torch.load(path, weights_only=True)["train"]


def test_missing_cache_for_a_trained_policy_is_a_clear_error():
    module, data = make("cached")
    module._policy_is_initial = False  # as after training or loading a checkpoint
    with pytest.raises(SettingError, match="no usable cache .* cannot be recomputed"):
        fit(module, data, steps=1)


@pytest.mark.slow
def test_two_process_ddp_shards_the_precompute_and_writes_the_same_cache(tmp_path):
    """Each rank computes its shard (30 train / 7 val pairs: uneven shards), the shards are
    all-gathered, rank 0 writes the file; it equals a single-process computation."""
    from conftest import run_ddp_script

    run = run_ddp_script("ddp_cached_reference.py", tmp_path / "ddp")
    assert run.returncode == 0, run.stderr[-3000:]
    (ddp_file,) = (tmp_path / "ddp" / "reference").glob("*.pt")

    L.seed_everything(0)
    module = DPO(model=ModelSettings(reference="cached"))
    data = PreferenceDataModule(
        batch_size=4, max_length=48, task=WordRulesTask(num_train=30, num_val=7), cache_dir=str(tmp_path / "single")
    )
    fit(module, data, steps=1)
    (single_file,) = (tmp_path / "single" / "reference").glob("*.pt")
    assert ddp_file.name == single_file.name  # same data and model keys
    ddp, single = torch.load(ddp_file, weights_only=True), torch.load(single_file, weights_only=True)
    for split in ("train", "val"):
        assert len(ddp[split]) == len(single[split]) == {"train": 30, "val": 7}[split]
        for (a_chosen, a_rejected), (b_chosen, b_rejected) in zip(ddp[split], single[split], strict=True):
            torch.testing.assert_close(a_chosen, b_chosen, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(a_rejected, b_rejected, atol=1e-5, rtol=1e-5)
