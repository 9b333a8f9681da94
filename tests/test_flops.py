"""Analytic step FLOPs against torch's FlopCounterMode, and the Throughput callback's MFU."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import quiet_trainer
from torch.utils.flop_counter import FlopCounterMode

from lit_align.callbacks import Throughput
from lit_align.data import PreferenceDataModule, WordRulesTask
from lit_align.methods import ORPO
from lit_align.model.backbone import Backbone
from lit_align.settings import LoRA, ModelSettings, TinyModel


def random_batch(rows=4, seq_len=96, vocab=262):
    torch.manual_seed(0)
    ids = torch.randint(0, vocab - 10, (rows, seq_len))
    labels = ids.clone()
    labels[:, :16] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def counted(backbone, batch, train: bool) -> int:
    with FlopCounterMode(display=False) as counter:
        out = backbone.logps(batch).sum.sum()
        if train:
            out.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("lora", [None, LoRA(r=8)], ids=["full", "lora"])
@pytest.mark.parametrize("train", [False, True], ids=["forward", "forward+backward"])
def test_analytic_flops_within_5_percent_of_counted(lora, train):
    """Eager attention and the full-logits path, so every matmul is visible to the counter."""
    settings = ModelSettings(
        attn_implementation="eager",
        logp_chunk_size=None,
        lora=lora,
        tiny=TinyModel(hidden_size=128, intermediate_size=256, num_layers=2, vocab_size=2048),
    )
    backbone = Backbone(settings, needs_reference=False)
    batch = random_batch()
    analytic = backbone.step_flops(batch, train=train)
    measured = counted(backbone, batch, train)
    assert abs(analytic - measured) / measured < 0.05, (analytic, measured)


def test_online_reference_adds_one_forward_and_cached_adds_none():
    batch = random_batch()
    free = Backbone(ModelSettings(), needs_reference=False)
    copy = Backbone(ModelSettings(reference="copy"), needs_reference=True)
    cached = Backbone(ModelSettings(reference="cached"), needs_reference=True)
    train, forward = free.step_flops(batch, train=True), free.step_flops(batch, train=False)
    assert copy.step_flops(batch, train=True) == train + forward
    assert cached.step_flops(batch, train=True) == train
    # full fine-tuning: forward+backward is 3x the forward for the linear layers (6N vs 2N)
    per_token = free._flops
    assert per_token.body_backward == 2 * per_token.body_forward
    assert per_token.head_backward == 2 * per_token.head_forward


def test_chunked_path_applies_the_lm_head_to_response_tokens_only():
    """Counted forward FLOPs of the chunked path equal the analytic count with the head applied to
    the 4 x 80 response tokens (not the 4 x 96 positions); the full-logits path costs more."""
    settings = dict(
        attn_implementation="eager", tiny=TinyModel(hidden_size=128, intermediate_size=256, vocab_size=2048)
    )
    chunked = Backbone(ModelSettings(logp_chunk_size=64, **settings), needs_reference=False)
    batch = random_batch()
    with torch.no_grad():
        measured = counted(chunked, batch, train=False)
    assert chunked.step_flops(batch, train=False) == measured
    per_token = chunked._flops
    assert measured == per_token.forward(4 * 96, 96, head_tokens=4 * 80)  # labels 16..95 of each row are scored
    naive = Backbone(ModelSettings(logp_chunk_size=None, **settings), needs_reference=False)
    assert naive.step_flops(batch, train=False) > measured


def test_throughput_callback_logs_mfu_against_the_given_peak(tmp_path):
    module = ORPO()
    data = PreferenceDataModule(batch_size=4, max_length=48, task=WordRulesTask(num_train=64, num_val=8))
    trainer = quiet_trainer(
        max_steps=8,
        log_every_n_steps=1,
        callbacks=[Throughput(peak_flops=1e11, window_size=2)],
        logger=L.pytorch.loggers.CSVLogger(tmp_path),
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, data)
    (path,) = Path(tmp_path).rglob("metrics.csv")
    rows = [r for r in csv.DictReader(open(path)) if r.get("train/device/mfu")]
    assert rows
    for row in rows:
        assert float(row["train/device/mfu"]) == pytest.approx(
            float(row["train/device/flops_per_sec"]) / 1e11, rel=1e-6
        )
        assert float(row["train/device/samples_per_sec"]) > 0


def test_prefix_sharing_counts_a_prompt_pass_and_a_response_pass():
    """2 pairs, 16-token prompts, 80-token responses: counted forward FLOPs equal one pass over
    2 x 16 prompt tokens and one over 4 x 80 response tokens attending to 96 positions, a quarter
    of the decoder's token work less than the 4 whole rows of 96 (minus the head's share)."""
    from lit_align.data.collate import PairCollator

    settings = dict(
        attn_implementation="eager", tiny=TinyModel(hidden_size=128, intermediate_size=256, vocab_size=2048)
    )
    shared = Backbone(ModelSettings(prefix_sharing=True, **settings), needs_reference=False)
    ids = random_batch(rows=2, seq_len=176)["input_ids"].tolist()
    pairs = [{"prompt": row[:16], "chosen": row[16:96], "rejected": row[96:]} for row in ids]
    batch = PairCollator(shared.tokenizer.pad_token_id)(pairs)
    with torch.no_grad():
        measured = counted(shared, batch, train=False)
    assert shared.step_flops(batch, train=False) == measured
    per_token = shared._flops
    assert measured == per_token.forward(2 * 16, 16, head_tokens=0) + per_token.forward(4 * 80, 96, head_tokens=4 * 80)
    rows = Backbone(ModelSettings(**settings), needs_reference=False)
    assert rows.step_flops(batch, train=False) == per_token.forward(4 * 96, 96, head_tokens=4 * 80) > measured
