"""The reward model: Bradley-Terry losses by hand, pairs and ranked lists (K rows for K responses),
the margin column, the Hugging Face classifier export, RewardModelReward, and the CLI config.

Expected loss values are computed with ``math`` from the papers' equations, never by calling torch
functions that mirror the implementation. Throughout, sp(z) = log(1 + e^z) = -log sigma(-z).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import QUIET_FLAGS, metric_rows, quiet_trainer, seed_flags, short_run_flags
from torch.testing import assert_close
from transformers import AutoModelForSequenceClassification

from lit_align.callbacks import ExportHF
from lit_align.cli import main
from lit_align.data import (
    DataError,
    ListwiseDataModule,
    PreferenceDataModule,
    UnpairedDataModule,
    WordRulesTask,
)
from lit_align.data.collate import Collator, PackedCollator, PairLayout
from lit_align.data.tokenize import tokenize_responses
from lit_align.losses import bradley_terry_loss, listwise_bradley_terry_loss
from lit_align.methods import RewardModel
from lit_align.online.reward_model import RewardModelReward
from lit_align.settings import LoRA, ModelSettings, OptimizerSettings

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
HH = Path(__file__).parents[1] / ".." / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
TOL = {"rtol": 1e-6, "atol": 1e-6}
NAN = math.nan


def sp(z: float) -> float:
    """Softplus log(1 + e^z), i.e. -log sigma(-z)."""
    return math.log1p(math.exp(z))


def t(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def small_task() -> WordRulesTask:
    return WordRulesTask(num_train=64, num_val=16)


def fit(module, data, tmp_path, steps=5, callbacks=()):
    trainer = quiet_trainer(
        max_steps=steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=list(callbacks),
        default_root_dir=tmp_path,
    )
    trainer.fit(module, data)
    return trainer


def set_up(data, module):
    data.tokenizer = module.tokenizer
    data.setup()
    return data


# ----------------------------------------------------------------------------- losses by hand
def test_bradley_terry_loss_by_hand():
    """r_w - r_l = (1, -1, 0) with margins (0.5, NaN -> 0, 1):
    pair 0: -log sigma(1 - 0.5) = sp(-0.5); pair 1: -log sigma(-1) = sp(1); pair 2: -log sigma(0 - 1) = sp(1).
    Without margins: sp(-1), sp(1), sp(0) = log 2. Accuracies 1, 0, 1/2 (a tie is a coin flip)."""
    chosen, rejected = t(2.0, 0.5, 1.0), t(1.0, 1.5, 1.0)
    out = bradley_terry_loss(chosen, rejected, t(0.5, NAN, 1.0))
    assert_close(out.losses, t(sp(-0.5), sp(1.0), sp(1.0)), **TOL)
    assert_close(out.margins, t(1.0, -1.0, 0.0), **TOL)
    assert_close(out.accuracies, torch.tensor([1.0, 0.0, 0.5]), **TOL)
    assert_close(bradley_terry_loss(chosen, rejected).losses, t(sp(-1.0), sp(1.0), math.log(2)), **TOL)


def test_listwise_loss_skips_ties_and_missing_responses():
    """Row 0: rewards (1, 0, -1), scores (1, 1, 0): responses 0 and 1 tie, so the pairs are (0 > 2)
    and (1 > 2) with r differences 2 and 1: loss (sp(-2) + sp(-1)) / 2.
    Row 1: scores (0, 1, NaN): one pair (1 > 0), difference 2 - 0.5 = 1.5: loss sp(-1.5); the
    missing response's reward (NaN here) never enters, not even its gradient.
    Row 2: all scores tied: no pair, loss 0."""
    rewards = t((1.0, 0.0, -1.0), (0.5, 2.0, NAN), (3.0, 1.0, 2.0)).requires_grad_()
    scores = t((1.0, 1.0, 0.0), (0.0, 1.0, NAN), (0.5, 0.5, 0.5))
    out = listwise_bradley_terry_loss(rewards, scores)
    assert_close(out.losses, t((sp(-2.0) + sp(-1.0)) / 2, sp(-1.5), 0.0), **TOL)
    assert_close(out.margins, t(2.0, 1.0, 1.5), **TOL)
    out.losses.sum().backward()
    assert torch.isfinite(rewards.grad).all() and rewards.grad[1, 2] == 0 and (rewards.grad[2] == 0).all()


def test_listwise_loss_with_two_responses_is_the_pairwise_loss():
    rewards, scores = t((0.3, -0.4), (1.0, 2.0)), t((2.0, 1.0), (0.0, 1.0))
    pairwise = bradley_terry_loss(t(0.3, 2.0), t(-0.4, 1.0))
    assert_close(listwise_bradley_terry_loss(rewards, scores).losses, pairwise.losses, **TOL)


# ----------------------------------------------------------------------------- the module
def test_k_responses_are_scored_with_k_rows(monkeypatch):
    """A list batch puts each of its K responses through the backbone once (sum of list lengths
    rows, not K(K-1) per prompt); a pair batch has 2B rows."""
    module = RewardModel()
    rows = []
    original = module.backbone.hidden_states
    monkeypatch.setattr(
        module.backbone,
        "hidden_states",
        lambda batch, model=None: rows.append(batch["input_ids"].shape[0]) or original(batch, model),
    )
    lists = set_up(ListwiseDataModule(task=small_task(), list_size=4, max_length=48, batch_size=3), module)
    batch = next(iter(lists.val_dataloader()))
    assert (batch["list_index"] >= 0).sum() == 12  # 3 prompts with 4 responses each
    loss = module.step(batch, "val")
    assert rows == [12] and torch.isfinite(loss)
    pairs = set_up(PreferenceDataModule(task=small_task(), max_length=48, batch_size=3), module)
    module.step(next(iter(pairs.val_dataloader())), "val")
    assert rows == [12, 6]


def test_packed_and_padded_batches_give_the_same_rewards():
    module = RewardModel().eval()
    torch.nn.init.normal_(module.head.weight, std=0.5)
    data = set_up(PreferenceDataModule(task=small_task(), max_length=48), module)
    examples = data.datasets["val"][:4]
    with torch.no_grad():
        padded = module.score(Collator(module.tokenizer.pad_token_id, PairLayout())(examples))
        packed_batch = PackedCollator(module.tokenizer.pad_token_id, capacity=96)(examples)
        packed = module.score(packed_batch)
    assert packed_batch["input_ids"].shape[0] < 8  # sequences really shared rows
    assert_close(packed, padded, atol=1e-5, rtol=1e-5)
    assert padded.abs().min() > 0


def test_reward_token_is_the_last_non_pad_token_as_in_transformers():
    """Pad id 0. Row 0 ends in EOS 9 (a pad-free tokenizer): read there (position 3). Row 1's
    tokenizer pads with its EOS, so the trailing 0 is the EOS too: read at the token before it
    (position 2), which is what AutoModelForSequenceClassification pools; same when packed."""
    from lit_align.methods.reward_model import reward_positions

    padded = {
        "input_ids": torch.tensor([[1, 5, 6, 9, 0], [1, 5, 7, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]),
    }
    rows, columns = reward_positions(padded, pad_token_id=0)
    assert rows.tolist() == [0, 1] and columns.tolist() == [3, 2]
    packed = {
        "input_ids": torch.tensor([[1, 5, 6, 9, 1, 5, 7, 0, 0]]),
        "seq_rows": torch.tensor([0, 0]),
        "seq_starts": torch.tensor([0, 4]),
        "seq_lens": torch.tensor([4, 4]),
    }
    rows, columns = reward_positions(packed, pad_token_id=0)
    assert rows.tolist() == [0, 0] and columns.tolist() == [3, 6]


def test_margin_column_is_read_and_used(tmp_path):
    records = [
        {"prompt": f"q{i}", "chosen": "good", "rejected": "bad", **({"margin": 2.0} if i < 2 else {})} for i in range(4)
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    module = RewardModel()
    torch.nn.init.normal_(module.head.weight, std=0.5)
    batch = next(
        iter(
            set_up(
                PreferenceDataModule(train=str(path), val=str(path), max_length=32, batch_size=4), module
            ).val_dataloader()
        )
    )
    assert_close(batch["margin"], torch.tensor([2.0, 2.0, NAN, NAN]), equal_nan=True)
    rewards = module.score(batch)
    chosen, rejected = rewards.chunk(2)
    expected = -torch.nn.functional.logsigmoid(chosen - rejected - torch.tensor([2.0, 2.0, 0.0, 0.0]))
    assert_close(module.reward_loss(rewards, batch).losses, expected)
    path.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}))
    with pytest.raises(DataError, match="field 'margin'"):
        set_up(PreferenceDataModule(train=str(path), val=str(path), use_cache=False), RewardModel())


def test_unpaired_data_is_refused_with_a_clear_error(tmp_path):
    with pytest.raises(
        ValueError,
        match="RewardModel trains on PairLayout or ListLayout data, but the data module UnpairedDataModule "
        r"gives UnpairedLayout data; use lit_align.data.PreferenceDataModule \(pairs\) or "
        r"lit_align.data.ListwiseDataModule",
    ):
        fit(RewardModel(), UnpairedDataModule(train="builtin", task=small_task(), max_length=48), tmp_path, steps=1)


def test_flops_count_the_decoder_but_no_lm_head():
    module = RewardModel()
    batch = next(iter(set_up(PreferenceDataModule(task=small_task(), max_length=48), module).val_dataloader()))
    module.current_batch = batch
    assert 0 < module.flops_per_batch < module.backbone.step_flops(batch, train=True)
    assert not module.backbone.lm_head(module.backbone.policy).weight.requires_grad  # unused: frozen


# ----------------------------------------------------------------------------- export and reward
def classifier_rewards(folder, batch) -> torch.Tensor:
    """Independent path: transformers' own classifier (its pooling of the last non-pad token)."""
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]


def test_export_reloads_with_the_same_rewards_and_reward_function_matches(tmp_path):
    module = RewardModel(optimizer=OptimizerSettings(lr=1e-2))
    data = PreferenceDataModule(task=small_task(), max_length=48, batch_size=8)
    fit(module, data, tmp_path, callbacks=[ExportHF(str(tmp_path / "rm"))])
    module.eval()
    batch = next(iter(data.val_dataloader()))
    with torch.no_grad():
        expected = module.score(batch)
    assert expected.std() > 1e-3  # trained: the rewards are not all equal
    assert_close(classifier_rewards(tmp_path / "rm", batch), expected, atol=1e-4, rtol=1e-4)
    # the reward function tokenizes the texts itself, as the data module did
    records = data.task.split("val")[: batch["input_ids"].shape[0] // 2]
    reward = RewardModelReward(str(tmp_path / "rm"), batch_size=3, max_length=48).to("cpu")
    scores = reward(
        [r["prompt"] for r in records] * 2, [r["chosen"] for r in records] + [r["rejected"] for r in records]
    )
    assert_close(scores, expected, atol=1e-4, rtol=1e-4)
    # chat prompts go through the chat template, as conversational training data does
    chat = [{"role": "user", "content": "Write in capitals: abc"}]
    prompt, responses = tokenize_responses(chat, {"chosen": "ABC", "rejected": "abc"}, module.tokenizer, 48, 24)
    with torch.no_grad():
        expected = module.score(Collator(module.tokenizer.pad_token_id)([{"prompt": prompt, **responses}]))
    assert_close(reward([chat, chat], ["ABC", "abc"]), expected, atol=1e-4, rtol=1e-4)


def test_lora_reward_model_exports_one_merged_classifier(tmp_path):
    module = RewardModel(model=ModelSettings(lora=LoRA(r=4)), optimizer=OptimizerSettings(lr=1e-2))
    assert module.head.weight.requires_grad
    data = PreferenceDataModule(task=small_task(), max_length=48, batch_size=8)
    fit(module, data, tmp_path, callbacks=[ExportHF(str(tmp_path / "rm"))])
    assert not (tmp_path / "rm" / "adapter").exists() and (tmp_path / "rm" / "config.json").is_file()
    module.eval()
    batch = next(iter(data.val_dataloader()))
    with torch.no_grad():
        assert_close(classifier_rewards(tmp_path / "rm", batch), module.score(batch), atol=1e-4, rtol=1e-4)
    assert module.backbone.is_peft  # the export merged a copy of the weights, not the module's


@pytest.mark.skipif(not HH.exists(), reason="../shared/data is not next to the checkout")
def test_trains_on_anthropic_hh_with_finite_loss(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "reward.yaml"),
            "--data.init_args.train",
            str(HH),
            "--data.init_args.max_records",
            "24",
            "--data.init_args.max_length",
            "128",
            "--data.init_args.batch_size",
            "4",
            "--trainer.max_steps",
            "3",
            "--trainer.val_check_interval",
            "3",
            "--trainer.log_every_n_steps",
            "1",
            "--trainer.enable_checkpointing",
            "false",
            "--validate_before_fit",
            "false",
            *QUIET_FLAGS,
        ]
    )
    losses = metric_rows("train/loss")
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert math.isfinite(metric_rows("val/loss")[-1])
    assert (tmp_path / "outputs" / "reward" / "config.json").is_file()


# ----------------------------------------------------------------------------- CLI end to end
@pytest.mark.slow
def test_reward_config_learns_the_builtin_task_and_exports(tmp_path, monkeypatch, capsys, measured):
    """configs/reward.yaml as written: held-out pairwise accuracy 0.5 before (every reward starts
    at 0) and >= 0.9 after (measured 1.000); the export callback's folder and ``lit-align export``
    from the checkpoint both score like the module."""
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(CONFIGS / "reward.yaml"), *QUIET_FLAGS, *seed_flags()])
    accuracies = measured("val/accuracy", metric_rows("val/accuracy"))
    assert accuracies[0] == 0.5 and accuracies[-1] >= 0.9, accuracies
    assert all(math.isfinite(v) for v in metric_rows("train/loss"))
    assert "held-out val/accuracy: 0.500 -> " in capsys.readouterr().out
    (checkpoint,) = Path("runs").rglob("*.ckpt")
    main(["export", "--ckpt_path", str(checkpoint), "--output_dir", "exported"])
    task = WordRulesTask()
    records = task.split("val")[:8]
    prompts, completions = (
        [r["prompt"] for r in records] * 2,
        [r["chosen"] for r in records] + [r["rejected"] for r in records],
    )
    from_callback = RewardModelReward("outputs/reward", max_length=64)(prompts, completions)
    assert_close(RewardModelReward("exported", max_length=64)(prompts, completions), from_callback)
    assert (from_callback[:8] > from_callback[8:]).all()


@pytest.mark.slow
def test_reward_model_learns_ranked_lists_through_the_cli(tmp_path, monkeypatch, measured):
    """The same config on ListwiseDataModule (list_size 4: the correct answer, the unchanged word
    and partly-correct answers): held-out pairwise accuracy over all differently-scored pairs.
    At lr 5e-4 (measured 0.967 / 0.971 / 0.932 / 0.958 with ``LIT_ALIGN_TEST_SEED`` 0-3); the
    config's 1e-3 collapsed to a constant reward (accuracy 0.497) on seed 2 with these batches of 8 lists."""
    monkeypatch.chdir(tmp_path)
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "reward.yaml"),
            "--data",
            "lit_align.data.ListwiseDataModule",
            "--data.init_args.list_size",
            "4",
            "--data.init_args.batch_size",
            "8",
            "--model.init_args.optimizer.lr",
            "0.0005",
            *short_run_flags(60),
            "--trainer.callbacks",
            "[]",
            *QUIET_FLAGS,
            *seed_flags(),
        ]
    )
    accuracies = measured("val/accuracy", metric_rows("val/accuracy"))
    assert accuracies[0] == 0.5 and accuracies[-1] >= 0.9, accuracies
