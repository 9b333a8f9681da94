"""The Throughput callback counts samples and tokens right for every data regime: its cumulative
``train/samples`` and ``train/lengths`` after a few steps against counts made by hand from the
examples each training batch was collated from (or, on-policy, from the rollouts)."""

import csv
from pathlib import Path

import lightning as L
import pytest
from conftest import quiet_trainer

from lit_align.callbacks import Throughput
from lit_align.data import (
    ListwiseDataModule,
    PreferenceDataModule,
    PromptDataModule,
    SFTDataModule,
    UnpairedDataModule,
    WordRulesTask,
)
from lit_align.errors import SettingError
from lit_align.methods import BCO, DPO, KTO, REINFORCE, RRHF, SFT, RewardModel
from lit_align.online.rewards import WordRulesReward

STEPS = 3


def task():
    return WordRulesTask(num_train=24, num_val=4)


def pair_tokens(example):
    return 2 * len(example["prompt"]) + len(example["chosen"]) + len(example["rejected"])


def unpaired_tokens(example):  # the completion row, and the mismatched (KL) row when there is one
    rows = [example["completion"]] + ([example["kl_completion"]] if "kl_completion" in example else [])
    return sum(len(example["prompt"]) + len(row) for row in rows)


def list_tokens(example):
    return sum(len(example["prompt"]) + len(response) for response in example["responses"])


def completion_tokens(example):
    return len(example["prompt"]) + len(example["completion"])


def one_sample(example):
    return 1


REGIMES = {
    "paired": (DPO, lambda: PreferenceDataModule(batch_size=4, max_length=48, task=task()), one_sample, pair_tokens),
    "reward-model": (
        RewardModel,
        lambda: PreferenceDataModule(batch_size=4, max_length=48, task=task()),
        one_sample,
        pair_tokens,
    ),
    "unpaired": (
        BCO,
        lambda: UnpairedDataModule(batch_size=4, max_length=48, task=task()),
        one_sample,
        unpaired_tokens,
    ),
    "unpaired-with-kl-rows": (
        KTO,
        lambda: UnpairedDataModule(batch_size=4, max_length=48, task=task()),
        one_sample,
        unpaired_tokens,
    ),
    "listwise": (RRHF, lambda: ListwiseDataModule(batch_size=2, max_length=48, task=task()), one_sample, list_tokens),
    "sft": (SFT, lambda: SFTDataModule(batch_size=4, max_length=48, task=task()), one_sample, completion_tokens),
}


def fit_with_throughput(module, data, tmp_path):
    trainer = quiet_trainer(
        max_steps=STEPS,
        log_every_n_steps=1,
        callbacks=[Throughput(window_size=2)],
        logger=L.pytorch.loggers.CSVLogger(tmp_path),
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, data)
    (path,) = Path(tmp_path).rglob("metrics.csv")
    rows = [row for row in csv.DictReader(open(path)) if row.get("train/samples")]
    return float(rows[-1]["train/samples"]), float(rows[-1]["train/lengths"])


@pytest.mark.parametrize("regime", sorted(REGIMES))
def test_samples_and_tokens_of_each_offline_regime(regime, tmp_path):
    method, make_data, samples_of, tokens_of = REGIMES[regime]
    data = make_data()
    batches = []
    collate = data.collate

    def recording(examples):
        batches.append([dict(example) for example in examples])
        return collate(examples)

    data.collate = recording
    samples, tokens = fit_with_throughput(method(), data, tmp_path)
    seen = batches[:STEPS]
    assert len(seen) == STEPS
    assert samples == sum(samples_of(example) for batch in seen for example in batch)
    assert tokens == sum(tokens_of(example) for batch in seen for example in batch)
    if regime.startswith("unpaired"):  # KTO's mismatched rows are processed tokens, not samples
        with_kl = all("kl_completion" in example for batch in seen for example in batch)
        assert with_kl == (regime == "unpaired-with-kl-rows") and samples == 4 * STEPS


def test_samples_and_tokens_of_an_on_policy_method(tmp_path):
    """A sample is a sampled completion (prompts x samples_per_prompt); tokens are each rollout
    row's prompt and completion tokens."""
    module = REINFORCE(
        reward=WordRulesReward(), samples_per_prompt=2, generation={"max_new_tokens": 4}, model={"reference": "copy"}
    )
    data = PromptDataModule(batch_size=3, max_length=32, task=task())
    rollouts = []
    make_rollout = module.make_rollout

    def recording(batch, *args, **kwargs):
        rollout = make_rollout(batch, *args, **kwargs)
        rollouts.append((int(batch["prompt_mask"].sum()), len(batch["prompts"]), rollout))
        return rollout

    module.make_rollout = recording
    samples, tokens = fit_with_throughput(module, data, tmp_path)
    assert len(rollouts) == STEPS
    assert samples == STEPS * 3 * 2
    completion_tokens = sum(int(rollout.mask.sum()) for _, _, rollout in rollouts)
    prompt_tokens = sum(2 * prompt for prompt, _, _ in rollouts)
    assert tokens == prompt_tokens + completion_tokens


def test_throughput_needs_a_lit_align_method(tmp_path):
    class Plain(L.LightningModule):
        pass

    callback = Throughput()
    with pytest.raises(SettingError, match="Throughput counts samples and tokens as a lit-align method does; Plain"):
        callback.setup(L.Trainer(logger=False, enable_checkpointing=False), Plain(), "fit")
