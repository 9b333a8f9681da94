"""What an objective needs of each record is checked when the data is prepared, before the first
step (class 4), and objectives that exponentiate scores or margins stay finite for any finite
input (class 5)."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import lightning
import pytest
import torch
from conftest import quiet_trainer

from lit_align.data import DataError, ListwiseDataModule, PreferenceDataModule, UnpairedDataModule
from lit_align.losses import bradley_terry_loss, gpo_loss, lipo_lambda_loss, odpo_loss, pro_loss
from lit_align.methods import NPO, ODPO, LiPO

TINY = {"tiny": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


class StepCounter(lightning.Callback):
    def __init__(self):
        self.steps = 0

    def on_train_batch_start(self, *args):
        self.steps += 1


def fit_until_error(module, data) -> tuple[BaseException, int]:
    """Fit ``module`` on ``data``; the error raised and the number of training steps begun."""
    counter = StepCounter()
    trainer = quiet_trainer(max_steps=2, callbacks=[counter], num_sanity_val_steps=0)
    with pytest.raises(DataError) as info:
        trainer.fit(module, datamodule=data)
    return info.value, counter.steps


def pairs(scores: list[tuple[float | None, float | None]]) -> list[dict]:
    rows = []
    for i, (chosen, rejected) in enumerate(scores):
        row = {"prompt": f"Question {i}: ", "chosen": f"good answer {i}", "rejected": f"bad {i}"}
        if chosen is not None:
            row["score_chosen"] = chosen
        if rejected is not None:
            row["score_rejected"] = rejected
        rows.append(row)
    return rows


# ---- class 4: per-record needs, checked at load --------------------------------------------------
@pytest.mark.parametrize(
    "scores, record, field, message, count",
    [
        (
            [(9, 1), (8, 2), (3, 7), (7, 1), (2, 6), (6, 5)],
            2,
            "score_chosen",
            "ODPO offset_fn=log needs score_chosen > score_rejected (it takes the log of their difference), got 3 and "
            "7",
            2,
        ),
        (
            [(9, 1), (8, 8), (7, 1), (6, 5)],
            1,
            "score_chosen",
            "ODPO offset_fn=log needs score_chosen > score_rejected",
            1,
        ),
        (
            [(9, 1), (8, None), (7, 1), (None, 5)],
            1,
            "score_rejected",
            "missing while the other score is given: ODPO's offset needs both scores of a pair (or neither, for "
            "default_offset)",
            2,
        ),
    ],
    ids=["misordered", "tied", "half-scored"],
)
def test_odpo_names_the_first_record_it_cannot_use_and_the_count_before_training(
    scores, record, field, message, count, tmp_path
):
    train = write_jsonl(tmp_path / "train.jsonl", pairs(scores))
    val = write_jsonl(tmp_path / "val.jsonl", pairs([(5, 1), (4, 2)]))
    error, steps = fit_until_error(
        ODPO(model=TINY), PreferenceDataModule(train=str(train), val=str(val), batch_size=2, use_cache=False)
    )
    assert re.match(re.escape(f"{train}, record {record}, field '{field}': {message}"), str(error)), str(error)
    assert f"({count} of {len(scores)} train records have this problem)" in str(error)
    assert steps == 0


def test_odpo_log1p_accepts_misordered_scores_and_without_any_scores_says_so(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", pairs([(3, 7), (7, 1)]))
    val = write_jsonl(tmp_path / "val.jsonl", pairs([(5, 1)]))
    module = ODPO(offset_fn="log1p", model=TINY)
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(module, datamodule=PreferenceDataModule(train=str(train), val=str(val), batch_size=2, use_cache=False))
    assert trainer.global_step == 1

    unscored = write_jsonl(tmp_path / "unscored.jsonl", pairs([(None, None), (None, None)]))
    error, steps = fit_until_error(
        ODPO(model=TINY), PreferenceDataModule(train=str(unscored), val=str(val), batch_size=2, use_cache=False)
    )
    assert str(error).startswith(
        f"{unscored}: no training pair has score_chosen and score_rejected, so ODPO's offset would be default_offset=0"
    )
    assert steps == 0


@pytest.mark.parametrize(
    "labels, retain_weight, message",
    [
        (
            [True, True, True],
            0.0,
            "NPO lowers the likelihood of undesirable completions (label false), and no training record has one",
        ),
        (
            [False, False, False],
            1.0,
            "retain_weight=1 trains on desirable completions (label true, the retain set), and no training record has "
            "one; "
            "set retain_weight to 0 or add them",
        ),
    ],
    ids=["no-forget-set", "no-retain-set"],
)
def test_npo_needs_the_examples_its_terms_train_on(labels, retain_weight, message, tmp_path):
    rows = [{"prompt": f"Q{i}: ", "completion": f"answer {i}", "label": label} for i, label in enumerate(labels)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    error, steps = fit_until_error(
        NPO(retain_weight=retain_weight, model=TINY),
        UnpairedDataModule(train=str(train), val=str(train), batch_size=2, use_cache=False),
    )
    assert str(error) == f"{train}, field 'label': {message}"
    assert steps == 0


# ---- class 5: finite for any finite scores and margins -------------------------------------------
SCORES = {
    "unit": [1.0, 0.0, 0.5],
    "elo": [1850.0, 1420.0, 1600.0],
    "rating-0-1000": [1000.0, 0.0, 730.0],
    "huge": [1e30, -1e30, 0.0],
    "tiny": [1e-30, 0.0, 5e-31],
    "negative": [-3.0, -2000.0, -700.0],
}


@pytest.mark.parametrize("scale", SCORES)
@pytest.mark.parametrize("objective", ["lipo", "pro_score_temperature"])
def test_listwise_objectives_on_scores_of_any_scale_have_finite_loss_and_gradient(objective, scale):
    logps = torch.tensor([[-2.0, -1.0, -4.0]], requires_grad=True)
    scores = torch.tensor([SCORES[scale]])
    valid = torch.ones(1, 3, dtype=torch.bool)
    if objective == "lipo":
        out = lipo_lambda_loss(logps, torch.tensor([[-4.0, -2.0, -2.0]]), scores, valid, beta=0.5)
    else:
        out = pro_loss(logps, scores, valid, beta=1.0, sft_weight=0.1, score_temperature=True)
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(logps.grad).all(), (out.losses, logps.grad)
    assert logps.grad.abs().sum() > 0  # still learns: the preference is not lost to underflow


def test_lipo_weights_depend_on_score_gaps_only():
    """Adding a constant to a list's scores changes nothing (the paper's 2^psi - 1 would scale the
    loss by 2^c): Elo scores 1500 above the unit scores give the same loss."""
    logps, reference, valid = (
        torch.tensor([[-2.0, -1.0, -4.0]]),
        torch.tensor([[-4.0, -2.0, -2.0]]),
        torch.ones(1, 3, dtype=torch.bool),
    )
    base = lipo_lambda_loss(logps, reference, torch.tensor([[1.0, 0.0, 0.5]]), valid, beta=0.5).losses
    shifted = lipo_lambda_loss(logps, reference, torch.tensor([[1501.0, 1500.0, 1500.5]]), valid, beta=0.5).losses
    torch.testing.assert_close(shifted, base)


@pytest.mark.parametrize("difference", [1e-30, 1.0, 1e6, 1e30])
@pytest.mark.parametrize("offset_fn", ["log", "log1p", "identity"])
def test_odpo_offset_is_finite_for_any_finite_score_difference(offset_fn, difference):
    policy = torch.tensor([-3.0, -5.0], requires_grad=True)
    out = odpo_loss(
        policy[:1],
        policy[1:],
        torch.tensor([-4.0]),
        torch.tensor([-4.0]),
        torch.tensor([difference]),
        torch.tensor([0.0]),
        beta=0.1,
        alpha=1.0,
        offset_fn=offset_fn,
    )
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(policy.grad).all()


@pytest.mark.parametrize("margin", [-1e6, -1e3, -90.0, 0.0, 1e3])
@pytest.mark.parametrize("function", ["logistic", "hinge", "exponential", "truncated_quadratic", "savage"])
def test_gpo_functions_are_finite_for_any_finite_margin(function, margin):
    """A policy far from the reference (margins of thousands of nats) gives a finite loss and gradient;
    the exponential continues linearly below rho = -30 (e^{-rho} itself overflows float32 below -88)."""
    chosen = torch.tensor([margin], requires_grad=True)
    out = gpo_loss(chosen, torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]), beta=1.0, function=function)
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(chosen.grad).all(), (out.losses, chosen.grad)
    if function == "exponential":  # the loss itself, and its pull on the margin where it is not negligible
        expected = math.exp(-margin) if margin >= -30 else math.exp(30) * (1 + (-30 - margin))
        assert out.losses.item() == pytest.approx(expected, rel=1e-5)
        assert (
            chosen.grad.item() < 0 or margin > 80
        )  # still pushes the margin up (e^{-1000} underflows to 0: nothing to push)


@pytest.mark.parametrize("margin", [1e6, 1e30, -1e30])
def test_reward_model_margin_of_any_scale_is_finite(margin):
    chosen = torch.tensor([0.5], requires_grad=True)
    out = bradley_terry_loss(chosen, torch.tensor([0.1]), torch.tensor([margin]))
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(chosen.grad).all()


@pytest.mark.slow
def test_lipo_trains_on_elo_scores_with_finite_loss(tmp_path):
    """The reported failure: Elo-like scores (and 0-1000 ratings) gave NaN at the first step."""
    rows = [
        {
            "prompt": f"Q{i}: ",
            "responses": [f"best {i}", f"mid {i}", f"worst {i}"],
            "scores": [1800.0 + i, 1500.0, 1200.0 - i],
        }
        for i in range(16)
    ]
    rows += [{"prompt": f"R{i}: ", "responses": [f"top {i}", f"low {i}"], "scores": [1000.0, 0.0]} for i in range(16)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    module = LiPO(model=TINY, optimizer={"lr": 1e-3})
    trainer = quiet_trainer(
        max_steps=6, logger=lightning.pytorch.loggers.CSVLogger(tmp_path), log_every_n_steps=1, limit_val_batches=0
    )
    trainer.fit(module, datamodule=ListwiseDataModule(train=str(train), val=str(train), batch_size=8, use_cache=False))
    (metrics,) = Path(trainer.logger.log_dir).glob("metrics.csv")
    losses = [float(row["train/loss"]) for row in csv.DictReader(open(metrics)) if row.get("train/loss")]
    assert len(losses) == 6 and all(math.isfinite(value) for value in losses), losses
