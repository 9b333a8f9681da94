"""Padding-free packing: same log-probs and gradients as padding, no leakage, safe fallback."""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch
from conftest import quiet_trainer

from lit_align.data import PreferenceDataModule, WordRulesTask
from lit_align.data.collate import PackedPairCollator, PairCollator
from lit_align.methods import DPO
from lit_align.model.backbone import Backbone
from lit_align.settings import ModelSettings


def examples(tokenizer):
    pairs = [
        ("Write in capitals: abcdef\n", "ABCDEF", "abcdef"),
        ("Hi\n", "x", "a much longer wrong answer"),
        ("Q: 2+2?\n", "4", "5"),
    ]
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    return [
        {
            "prompt": encode(p),
            "chosen": encode(c) + [tokenizer.eos_token_id],
            "rejected": encode(r) + [tokenizer.eos_token_id],
        }
        for p, c, r in pairs
    ]


@pytest.mark.parametrize("capacity", [512, None], ids=["one-row", "several-rows"])
@pytest.mark.parametrize("chunk", [1024, None], ids=["chunked", "full-logits"])
def test_packed_logps_and_gradients_equal_padded(chunk, capacity):
    backbone = Backbone(ModelSettings(logp_chunk_size=chunk), needs_reference=False)
    batch = examples(backbone.tokenizer)
    padded = backbone.logps(PairCollator(backbone.tokenizer.pad_token_id)(batch))
    padded.sum.sum().backward()
    padded_grads = [p.grad.clone() for p in backbone.parameters()]
    backbone.zero_grad()
    packed_batch = PackedPairCollator(backbone.tokenizer.pad_token_id, capacity=capacity)(batch)
    assert "attention_mask" not in packed_batch
    assert packed_batch["input_ids"].shape[0] == (1 if capacity else 4)  # 6 sequences, first-fit decreasing
    assert int((packed_batch["labels"] != -100).sum()) == sum(len(ex["chosen"]) + len(ex["rejected"]) for ex in batch)
    packed = backbone.logps(packed_batch)
    packed.sum.sum().backward()
    torch.testing.assert_close(packed.tokens, padded.tokens, atol=1e-5, rtol=1e-5)
    assert torch.equal(packed.mask, padded.mask)
    for a, p in zip(padded_grads, backbone.parameters(), strict=True):
        torch.testing.assert_close(p.grad, a, atol=1e-5, rtol=1e-4)


def test_packed_sequences_do_not_see_each_other():
    backbone = Backbone(ModelSettings(), needs_reference=False)
    batch = examples(backbone.tokenizer)
    pack = PackedPairCollator(capacity=512)
    before = backbone.logps(pack(batch))
    changed = [dict(batch[0], prompt=[7] * 30)] + batch[1:]  # only the first pair's sequences change
    after = backbone.logps(pack(changed))
    others = [1, 2, 4, 5]  # rows of pairs 2 and 3 (chosen rows first, then rejected rows)
    torch.testing.assert_close(after.sum[others], before.sum[others], atol=1e-5, rtol=0)
    assert (after.sum[[0, 3]] - before.sum[[0, 3]]).abs().min() > 1e-3
    assert backbone.packing_isolates_sequences() == (True, pytest.approx(0.0, abs=1e-5))


def test_the_pitfall_an_attention_mask_with_packed_positions_leaks():
    """Why the backbone never passes a mask with a packed batch (transformers 5.x behaviour)."""
    backbone = Backbone(ModelSettings(), needs_reference=False)
    decoder = backbone.policy.get_decoder()
    first, second = torch.arange(10, 17)[None], torch.arange(40, 45)[None]
    packed = torch.cat([first, second], 1)
    positions = torch.cat([torch.arange(7), torch.arange(5)])[None]
    with torch.no_grad():
        alone = decoder(input_ids=second, use_cache=False).last_hidden_state
        no_mask = decoder(input_ids=packed, position_ids=positions, use_cache=False).last_hidden_state[:, 7:]
        with_mask = decoder(
            input_ids=packed, position_ids=positions, attention_mask=torch.ones_like(packed), use_cache=False
        ).last_hidden_state[:, 7:]
    torch.testing.assert_close(no_mask, alone, atol=1e-5, rtol=1e-5)
    assert (with_mask - alone).abs().max() > 1e-2


def test_first_fit_decreasing_rows_respect_capacity():
    lengths = {"a": 30, "b": 20, "c": 25, "d": 10}
    examples = [
        {"prompt": [1] * 5, "chosen": [2] * (lengths[k] - 5), "rejected": [3] * (lengths[k] - 5)} for k in lengths
    ]
    batch = PackedPairCollator(capacity=60)(examples)
    assert batch["seq_lens"].tolist() == [30, 20, 25, 10] * 2
    used = torch.zeros(batch["input_ids"].shape[0], dtype=torch.long).index_add_(
        0, batch["seq_rows"], batch["seq_lens"]
    )
    assert used.max() <= 60 and int(used.sum()) == 170 and batch["input_ids"].shape[0] == 3  # ceil(170 / 60)
    # positions restart at every sequence start
    for row, start, length in zip(batch["seq_rows"], batch["seq_starts"], batch["seq_lens"], strict=True):
        assert batch["position_ids"][row, start : start + length].tolist() == list(range(length))


def fit_first_loss(packing: bool, reference: str = "copy", monkeypatch=None) -> tuple[float, PreferenceDataModule]:
    L.seed_everything(0)
    module = DPO(model=ModelSettings(reference=reference))
    data = PreferenceDataModule(
        batch_size=8, max_length=48, packing=packing, task=WordRulesTask(num_train=32, num_val=8)
    )
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, data)
    return float(trainer.callback_metrics["train/loss"]), data


@pytest.mark.parametrize("reference", ["copy", "cached"])
def test_training_with_packing_gives_the_padded_loss(reference):
    padded, _ = fit_first_loss(False, reference)
    packed, data = fit_first_loss(True, reference)
    assert data.packing and data.served.packing
    assert packed == pytest.approx(padded, abs=1e-5)


def test_packing_falls_back_to_padding_with_a_logged_reason(monkeypatch, caplog):
    monkeypatch.setattr(Backbone, "packing_isolates_sequences", lambda self, device=None: (False, 0.5))
    with caplog.at_level(logging.WARNING, logger="lit_align.data.contract"):
        _, data = fit_first_loss(True)
    assert data.hparams.packing and not data.packing  # requested, then turned off by the served answer
    assert "packing disabled, using padding" in caplog.text and "5.00e-01" in caplog.text
    assert "attention_mask" in next(iter(data.train_dataloader()))
