"""The three data regimes share one machinery: layouts, packing, cached reference, pair scores."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import quiet_trainer

from lit_align.data import DataError, ListwiseDataModule, PreferenceDataModule, UnpairedDataModule, WordRulesTask
from lit_align.data.collate import Collator, PackedCollator
from lit_align.methods import DPO
from lit_align.model.backbone import Backbone
from lit_align.model.reference_cache import attach_reference_logps
from lit_align.settings import ModelSettings

TASK = WordRulesTask(num_train=12, num_val=4)


def prepared(cls, tokenizer, **kwargs):
    dm = cls(task=TASK, max_length=48, batch_size=3, **kwargs)
    dm.tokenizer = tokenizer
    return dm


def unpaired_with_mismatched(tokenizer):
    dm = prepared(UnpairedDataModule, tokenizer)
    dm.mismatched_completions = True
    dm.setup()
    return dm


@pytest.mark.parametrize(
    "make",
    [lambda t: prepared(PreferenceDataModule, t), unpaired_with_mismatched, lambda t: prepared(ListwiseDataModule, t)],
    ids=["paired", "unpaired+mismatched", "listwise"],
)
def test_packed_rows_give_the_padded_logps_in_every_layout(make, tokenizer):
    dm = make(tokenizer)
    dm.setup()
    backbone = Backbone(ModelSettings(), needs_reference=False)
    examples = dm.datasets["train"][:3]
    padded = backbone.logps(Collator(tokenizer.pad_token_id, dm.layout)(examples))
    packed_batch = PackedCollator(tokenizer.pad_token_id, capacity=128, layout=dm.layout)(examples)
    packed = backbone.logps(packed_batch)
    assert (
        packed_batch["input_ids"].shape[0] < packed_batch["seq_lens"].shape[0] == padded.tokens.shape[0]
    )  # rows were shared
    torch.testing.assert_close(packed.tokens, padded.tokens, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "make",
    [unpaired_with_mismatched, lambda t: prepared(ListwiseDataModule, t)],
    ids=["unpaired+mismatched", "listwise"],
)
def test_cached_reference_equals_the_frozen_copy_in_every_layout(make, tokenizer):
    """Per-token cached values land on the same rows and positions as a live reference forward."""
    dm = make(tokenizer)
    dm.setup()
    copy = Backbone(ModelSettings(reference="copy"), needs_reference=True)
    cached = Backbone(ModelSettings(reference="cached"), needs_reference=True)
    attach_reference_logps(cached, dm, policy_is_initial=True, device=torch.device("cpu"))
    batch = dm.collate(dm.datasets["val"][:3])
    live = copy.reference_logps({k: v for k, v in batch.items() if k != "reference_logps"})
    stored = cached.reference_logps(batch)
    torch.testing.assert_close(stored.tokens, live.tokens, atol=1e-5, rtol=1e-5)
    assert torch.equal(stored.mask, live.mask)


def test_unpaired_batch_puts_mismatched_rows_after_the_completions(tokenizer):
    dm = unpaired_with_mismatched(tokenizer)
    examples = dm.datasets["train"][:3]
    batch = Collator(tokenizer.pad_token_id, dm.layout)(examples)
    assert batch["input_ids"].shape[0] == 6 and batch["label"].tolist() == [ex["label"] for ex in examples]
    for row, example in enumerate(examples):
        for offset, key in ((0, "completion"), (3, "kl_completion")):
            ids = batch["input_ids"][row + offset][batch["labels"][row + offset] != -100].tolist()
            assert ids == example[key]


def test_listwise_rows_are_adjacent_and_indexed(tokenizer):
    dm = prepared(ListwiseDataModule, tokenizer)
    dm.setup()
    examples = dm.datasets["train"][:3]
    batch = Collator(tokenizer.pad_token_id, dm.layout)(examples)
    for i, example in enumerate(examples):
        for k, response in enumerate(example["responses"]):
            row = int(batch["list_index"][i, k])
            assert batch["input_ids"][row][batch["labels"][row] != -100].tolist() == response
        assert batch["scores"][i, : len(example["scores"])].tolist() == pytest.approx(example["scores"])


def test_builtin_ranked_lists_are_graded_and_held_out():
    """Scores are the fraction of correct positions: 'Write in capitals: abcd' -> 'ABcd' scores 2/4."""
    assert WordRulesTask.score("Write in capitals: abcd\n", "ABcd") == 0.5
    assert WordRulesTask.score("Write in capitals: abcd\n", "ABCD") == 1.0
    assert WordRulesTask.score("Write in capitals: abcd\n", "abcd") == 0.0
    task = WordRulesTask(num_train=30, num_val=10)
    train, val = task.ranked("train", 4), task.ranked("val", 4)
    assert {r["prompt"] for r in train}.isdisjoint(r["prompt"] for r in val)
    for record in train + val:
        assert record["scores"][0] == 1.0 and task.is_correct(record["prompt"], record["responses"][0])
        assert len(set(record["responses"])) == len(record["responses"]) >= 2
        assert all(0.0 <= s < 1.0 for s in record["scores"][1:])


def test_paired_scores_reach_the_batch_and_missing_ones_are_nan(tokenizer, tmp_path):
    path = tmp_path / "scored.jsonl"
    records = [
        {"prompt": "Q1 ", "chosen": "good", "rejected": "bad", "score_chosen": 9, "score_rejected": 2.5},
        {"prompt": "Q2 ", "chosen": "fine", "rejected": "poor"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in records))
    dm = PreferenceDataModule(train=str(path), val=str(path), max_length=32, batch_size=2)
    dm.tokenizer = tokenizer
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    assert batch["score_chosen"][0].item() == 9.0 and batch["score_rejected"][0].item() == 2.5
    assert math.isnan(batch["score_chosen"][1].item()) and math.isnan(batch["score_rejected"][1].item())


@pytest.mark.parametrize("bad", ["high", True, [1.0], float("inf")], ids=["string", "bool", "list", "inf"])
def test_non_numeric_pair_score_is_named(bad, tokenizer, tmp_path):
    path = tmp_path / "scored.jsonl"
    path.write_text(
        json.dumps({"prompt": "Q ", "chosen": "a", "rejected": "b", "score_chosen": 1.0, "score_rejected": bad})
    )
    dm = PreferenceDataModule(train=str(path), val=str(path), max_length=32)
    dm.tokenizer = tokenizer
    with pytest.raises(DataError, match=r"scored\.jsonl, record 0, field 'score_rejected': expected a finite number"):
        dm.setup()


def test_a_method_given_another_regime_names_the_data_module_to_use():
    trainer = quiet_trainer(max_steps=1)
    with pytest.raises(
        ValueError,
        match=r"DPO trains on PairLayout data, but the data module ListwiseDataModule gives ListLayout data; "
        r"use lit_align\.data\.PreferenceDataModule",
    ):
        trainer.fit(DPO(), datamodule=ListwiseDataModule(task=TASK, max_length=48))


HH = (
    __import__("pathlib").Path(__file__).resolve().parents[2]
    / "shared"
    / "data"
    / "hh-rlhf-harmless-base-test.jsonl.gz"
)


@pytest.mark.skipif(not HH.exists(), reason="../shared/data is not next to the checkout")
def test_convert_pairs_command_on_anthropic_hh(tmp_path, capsys, tokenizer):
    from lit_align.cli import main

    output = tmp_path / "hh_unpaired.jsonl"
    main(["convert-pairs", "--input", str(HH), "--output", str(output)])
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    skipped = int(capsys.readouterr().out.split("(")[1].split()[0])
    assert len(lines) == 2 * (2312 - skipped) and skipped < 10
    assert [r["label"] for r in lines[:4]] == [True, False, True, False]
    assert lines[0]["prompt"] == lines[1]["prompt"] and lines[0]["prompt"].endswith("\n\nAssistant:")
    dm = UnpairedDataModule(train=str(output), max_records=40, max_length=128, batch_size=4)
    dm.tokenizer = tokenizer
    dm.setup()
    counts = dm.count_classes()
    assert counts["desirable"] + counts["undesirable"] == len(dm.datasets["train"])


def test_top1_is_shared_among_tied_rewards():
    """Untrained policy: all four rewards equal, one best-scored response -> top-1 = 1/4, not 1.
    Second list: rewards (2, 2, 0) with the best at index 1 -> 1/2; third list has 2 valid entries."""
    from lit_align.methods.listwise import ranking_metrics

    rewards = torch.tensor([[0.0, 0.0, 0.0, 0.0], [2.0, 2.0, 0.0, 0.0], [1.0, 3.0, 9.0, 9.0]])
    scores = torch.tensor([[1.0, 0.5, 0.2, 0.0], [0.1, 0.9, 0.5, math.nan], [0.0, 1.0, math.nan, math.nan]])
    valid = ~scores.isnan()
    top1 = ranking_metrics(rewards, scores, valid)["rewards/top1"]
    assert top1.tolist() == [0.25, 0.5, 1.0]
