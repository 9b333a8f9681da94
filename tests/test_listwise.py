"""Listwise objectives (RRHF, PRO, LiPO-lambda), their ranking metrics, the listwise data module,
the shared list forward, and each config learning the built-in task through the CLI.

Expected loss values are computed with ``math`` from the papers' equations, never by calling torch
functions that mirror the implementation. Throughout, sp(z) = log(1 + e^z) = -log sigma(-z).
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import QUIET_FLAGS, metric_rows, seed_flags, short_run_flags
from torch.testing import assert_close

from lit_align.cli import main
from lit_align.data import DataError, DroppableRecord, ListwiseDataModule, WordRulesTask
from lit_align.data.collate import Collator, ListLayout
from lit_align.errors import SettingError
from lit_align.losses import dpo_loss, lipo_lambda_loss, pro_loss, rrhf_loss
from lit_align.methods import PRO, RRHF, LiPO, ResponseLists
from lit_align.methods.listwise import ranking_metrics

TOL = {"rtol": 1e-6, "atol": 1e-6}
NAN = math.nan
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def t(*rows) -> torch.Tensor:
    """A float64 ``[B, K]`` table from rows of numbers."""
    return torch.tensor(rows, dtype=torch.float64)


def vec(*values) -> torch.Tensor:
    """A float64 ``[B]`` vector."""
    return torch.tensor(values, dtype=torch.float64)


def sp(z: float) -> float:
    """Softplus log(1 + e^z), i.e. -log sigma(-z)."""
    return math.log1p(math.exp(z))


def lse(*values: float) -> float:
    """log sum exp."""
    return math.log(sum(math.exp(v) for v in values))


def ones(batch: int, size: int) -> torch.Tensor:
    return torch.ones(batch, size, dtype=torch.bool)


# Two lists of K = 3 (length-normalised log-probs P, scores S). Row 0 is strictly ordered by score,
# best first, with responses 0 and 1 misordered by p; row 1 ties responses 0 and 1 (score 0) and
# the best (index 2) sits last.
P = t((-1.0, -0.5, -2.0), (-3.0, -1.0, -2.0))
S = t((1.0, 0.5, 0.0), (0.0, 0.0, 1.0))


# ----------------------------------------------------------------------------- RRHF
def test_rrhf_hand_value():
    """RRHF Eq. 2-4: sum over s_i < s_j of max(0, p_i - p_j), plus sft_weight * (-p_best).

    row 0: pairs (better, worse) = (0,1): max(0, -0.5 - -1) = 0.5; (0,2): max(0, -2 + 1) = 0;
           (1,2): max(0, -2 + 0.5) = 0 -> L_rank = 0.5; L_ft = -p_0 = 1; sft_weight 0.5 -> 1.0.
    row 1: (2,0): max(0, -3 + 2) = 0; (2,1): max(0, -1 + 2) = 1; the tied pair (0,1) is not summed
           although p_1 > p_0 -> L_rank = 1; L_ft = -p_2 = 2 -> 1 + 0.5 * 2 = 2.0.
    """
    out = rrhf_loss(P, S, ones(2, 3), sft_weight=0.5)
    assert_close(out.losses, vec(1.0, 2.0), **TOL)
    assert_close(out.metrics["rank_loss"], vec(0.5, 1.0), **TOL)
    assert_close(out.metrics["nll_loss"], vec(1.0, 2.0), **TOL)
    assert_close(out.rewards, P, **TOL)


def test_rrhf_gradient_pushes_the_misordered_pair_apart():
    """row 0, sft_weight 0: L = p_1 - p_0 (the only active hinge) -> dL/dp = (-1, +1, 0)."""
    p = P[:1].clone().requires_grad_(True)
    rrhf_loss(p, S[:1], ones(1, 3), sft_weight=0.0).losses.sum().backward()
    assert_close(p.grad, t((-1.0, 1.0, 0.0)), **TOL)


def test_rrhf_sft_term_averages_responses_tied_for_best():
    """scores (1, 1, 0), p = (-1, -3, -2): L_ft = (1 + 3) / 2 = 2; the hinge (0,2) and (1,2):
    max(0, -2 + 1) = 0, max(0, -2 + 3) = 1 -> 1 + 2 = 3."""
    out = rrhf_loss(t((-1.0, -3.0, -2.0)), t((1.0, 1.0, 0.0)), ones(1, 3), sft_weight=1.0)
    assert out.losses.item() == pytest.approx(3.0, abs=1e-12)


# ----------------------------------------------------------------------------- PRO
def test_pro_hand_value():
    """PRO: -sum_k log(exp(r_k) / sum_{i ranked at or below k} exp(r_i)), r = beta * p, beta = 1.

    row 0 (order 0, 1, 2): step 1 = lse(-1, -0.5, -2) + 1; step 2 = lse(-0.5, -2) + 0.5 = sp(-1.5).
    row 1: best is 2 (r = -2): step = lse(-2, -3, -1) + 2; 0 and 1 tie for last, so neither is the
           other's competitor: their steps are 0.
    SFT (weight 0.1): row 0 -(-1) = 1, row 1 -(-2) = 2.
    Numerically, row 0: ln(e^-1 + e^-0.5 + e^-2) + 1 = ln 1.1097445 + 1 = 1.1041306, sp(-1.5) = ln 1.2231302
    = 0.2014133, so 1.3055439 + 0.1 = 1.4055439.
    """
    row0 = lse(-1.0, -0.5, -2.0) + 1.0 + sp(-1.5)
    row1 = lse(-2.0, -3.0, -1.0) + 2.0
    out = pro_loss(P, S, ones(2, 3), beta=1.0, sft_weight=0.1)
    assert_close(out.metrics["ranking_loss"], vec(row0, row1), **TOL)
    assert_close(out.losses, vec(row0 + 0.1, row1 + 0.2), **TOL)
    assert out.losses[0].item() == pytest.approx(1.4055439, abs=1e-7)


def test_pro_beta_scales_the_rewards():
    """beta = 2, row 0: r = (-2, -1, -4): lse(-2, -1, -4) + 2 + sp(2 * -1.5)."""
    out = pro_loss(P[:1], S[:1], ones(1, 3), beta=2.0, sft_weight=0.0)
    assert out.losses.item() == pytest.approx(lse(-2.0, -1.0, -4.0) + 2.0 + sp(-3.0), abs=1e-9)
    assert_close(out.rewards, 2 * P[:1], **TOL)


def test_pro_score_temperature_hand_value():
    """Reward-weighted PRO, row 0, scores (1, 0.5, 0): 1/T_i^k = s_k - s_i, 1/T_k^k = max_i (s_k - s_i).

    step 1: own -1 * 1 = -1; competitors -0.5 * 0.5 = -0.25, -2 * 1 = -2 -> lse(-1, -0.25, -2) + 1.
    step 2: own -0.5 * 0.5 = -0.25; competitor -2 * 0.5 = -1 -> lse(-0.25, -1) + 0.25 = sp(-0.75).
    """
    out = pro_loss(P[:1], S[:1], ones(1, 3), beta=1.0, sft_weight=0.0, score_temperature=True)
    assert out.losses.item() == pytest.approx(lse(-1.0, -0.25, -2.0) + 1.0 + sp(-0.75), abs=1e-9)


def test_pro_with_two_responses_is_bradley_terry():
    """K = 2, no SFT: -log(e^{r1} / (e^{r1} + e^{r2})) = -log sigma(r1 - r2) = sp(-(r1 - r2)), whichever
    position holds the better response."""
    p, s = t((-1.0, -3.0), (-2.0, -0.5), (-4.0, -1.0)), t((1.0, 0.0), (1.0, 0.0), (0.0, 2.0))
    expected = [sp(-(-1.0 + 3.0)), sp(-(-2.0 + 0.5)), sp(-(-1.0 + 4.0))]
    assert_close(
        pro_loss(p, s, ones(3, 2), beta=1.0, sft_weight=0.0).losses, torch.tensor(expected, dtype=torch.float64), **TOL
    )


def test_pro_loss_does_not_depend_on_how_ties_are_ordered():
    """Row 1 of P/S (a tie for last) permuted in every order gives the same loss."""
    base = pro_loss(P[1:], S[1:], ones(1, 3)).losses.item()
    for order in ([1, 0, 2], [2, 0, 1], [2, 1, 0], [0, 2, 1]):
        assert pro_loss(P[1:, order], S[1:, order], ones(1, 3)).losses.item() == pytest.approx(base, abs=1e-12)


# ----------------------------------------------------------------------------- LiPO-lambda
def test_lipo_lambda_hand_value():
    """LiPO-lambda: sum_{psi_i > psi_j} Delta_ij sp(-(s_i - s_j)), Delta_ij = |G_i - G_j| |1/D(tau_i) - 1/D(tau_j)|.

    beta = 0.5, pi = (-2, -1, -4), pi_ref = (-4, -2, -2): s = 0.5 * (2, 1, -2) = (1, 0.5, -1), so
    tau = (1, 2, 3) and 1/D = (1/ln 2, 1/ln 3, 1/ln 4). psi = (1, 0, 0.5), best 1: G = 2^(psi - 1)
    = (1, 1/2, 1/sqrt 2) (the paper's 2^psi - 1 = (1, 0, sqrt 2 - 1) has the same differences times 2).
    (0,1): Delta = 1/2 * (1/ln2 - 1/ln3), sp(-(1 - 0.5)) = sp(-0.5)
    (0,2): Delta = (1 - 1/sqrt 2) * (1/ln2 - 1/ln4), sp(-(1 + 1)) = sp(-2)
    (2,1): Delta = (1/sqrt 2 - 1/2) * (1/ln3 - 1/ln4), sp(-(-1 - 0.5)) = sp(1.5)   (misordered pair)
    """
    d1, d2, d3 = 1 / math.log(2), 1 / math.log(3), 1 / math.log(4)
    inv = 1 / math.sqrt(2)
    expected = 0.5 * (d1 - d2) * sp(-0.5) + (1 - inv) * (d1 - d3) * sp(-2.0) + (inv - 0.5) * (d2 - d3) * sp(1.5)
    out = lipo_lambda_loss(t((-2.0, -1.0, -4.0)), t((-4.0, -2.0, -2.0)), t((1.0, 0.0, 0.5)), ones(1, 3), beta=0.5)
    assert out.losses.item() == pytest.approx(expected, abs=1e-9)
    assert_close(out.rewards, t((1.0, 0.5, -1.0)), **TOL)
    mean_weight = (0.5 * (d1 - d2) + (1 - inv) * (d1 - d3) + (inv - 0.5) * (d2 - d3)) / 3
    assert out.metrics["lambda_weight"].item() == pytest.approx(mean_weight, abs=1e-9)


def test_lipo_ranks_follow_the_current_rewards():
    """Same lists with the policy's rewards reordered: s = (-1, 0.5, 1) -> tau = (3, 2, 1), so the
    discounts move with the rewards (G = (1, 1/2, 1/sqrt 2) as above): (0,1): Delta = 1/2 (1/ln3 - 1/ln4),
    sp(-(-1 - 0.5)) = sp(1.5); (0,2): Delta = (1 - 1/sqrt 2)(1/ln2 - 1/ln4), sp(2);
    (2,1): Delta = (1/sqrt 2 - 1/2)(1/ln2 - 1/ln3), sp(-0.5)."""
    d1, d2, d3 = 1 / math.log(2), 1 / math.log(3), 1 / math.log(4)
    inv = 1 / math.sqrt(2)
    expected = 0.5 * (d2 - d3) * sp(1.5) + (1 - inv) * (d1 - d3) * sp(2.0) + (inv - 0.5) * (d1 - d2) * sp(-0.5)
    out = lipo_lambda_loss(t((-1.0, 0.5, 1.0)), t((0.0, 0.0, 0.0)), t((1.0, 0.0, 0.5)), ones(1, 3), beta=1.0)
    assert out.losses.item() == pytest.approx(expected, abs=1e-9)


def test_lipo_with_two_responses_is_weighted_dpo():
    """K = 2: tau is (1, 2) or (2, 1), so Delta = |2^(psi_1 - best) - 2^(psi_2 - best)| (1/ln 2 - 1/ln 3)
    whatever the rewards, and the loss is Delta times DPO's -log sigma(beta m). Scores (1, 0): 1 - 1/2;
    (0.5, 0): 1 - 2^-0.5; (0, 2): 1 - 2^-2."""
    policy, reference = t((-1.0, -3.0), (-5.0, -2.0), (-2.0, -2.5)), t((-2.0, -2.0), (-2.0, -2.0), (-1.0, -3.0))
    scores = t((1.0, 0.0), (0.5, 0.0), (0.0, 2.0))
    beta = 0.5
    discount = 1 / math.log(2) - 1 / math.log(3)
    delta = [0.5 * discount, (1 - 2**-0.5) * discount, 0.75 * discount]
    margins = [(-1 + 2) - (-3 + 2), (-5 + 2) - (-2 + 2), (-2.5 + 3) - (-2 + 1)]  # better minus worse
    out = lipo_lambda_loss(policy, reference, scores, ones(3, 2), beta=beta)
    assert_close(
        out.losses,
        torch.tensor([d * sp(-beta * m) for d, m in zip(delta, margins, strict=True)], dtype=torch.float64),
        **TOL,
    )
    dpo = dpo_loss(
        vec(-1.0, -5.0, -2.5), vec(-3.0, -2.0, -2.0), vec(-2.0, -2.0, -3.0), vec(-2.0, -2.0, -1.0), beta=beta
    ).losses
    assert_close(out.losses, torch.tensor(delta, dtype=torch.float64) * dpo, **TOL)


# ----------------------------------------------------------------------------- shared properties
LOSSES = {
    "rrhf": lambda p, s, v: rrhf_loss(p, s, v, sft_weight=0.5),
    "pro": lambda p, s, v: pro_loss(p, s, v, beta=1.5, sft_weight=0.5),
    "pro_score_temperature": lambda p, s, v: pro_loss(p, s, v, beta=1.5, sft_weight=0.5, score_temperature=True),
    "lipo": lambda p, s, v: lipo_lambda_loss(p, 0.3 * p - 0.2, s, v, beta=0.7),  # reference: any per-response values
}


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("slot", [3, 1], ids=["padded_at_end", "padded_in_the_middle"])
def test_padding_changes_nothing(name, slot):
    """A list of 3 padded to 4 (NaN log-prob and score, valid False) next to a full list of 4 gives
    the same loss and gradients as the list of 3 alone; the padding gets zero gradient."""
    fn = LOSSES[name]
    short_p, short_s = [-1.0, -0.5, -2.0], [1.0, 0.5, 0.0]
    full_p, full_s = t((-2.0, -1.5, -0.7, -3.0)), t((0.2, 0.9, 0.4, 0.0))
    kept = [k for k in range(4) if k != slot]
    p = torch.cat([t(short_p[:slot] + [NAN] + short_p[slot:]), full_p]).requires_grad_(True)
    s = torch.cat([t(short_s[:slot] + [NAN] + short_s[slot:]), full_s])
    valid = torch.tensor([[k != slot for k in range(4)], [True] * 4])
    out = fn(p, s, valid)
    out.losses.sum().backward()

    alone_p = t(short_p).requires_grad_(True)
    alone = fn(alone_p, t(short_s), ones(1, 3))
    alone.losses.sum().backward()
    full = fn(full_p, full_s, ones(1, 4))
    assert torch.isfinite(out.losses).all() and torch.isfinite(p.grad).all()
    assert out.losses[0].item() == pytest.approx(alone.losses.item(), abs=1e-12)
    assert out.losses[1].item() == pytest.approx(full.losses.item(), abs=1e-12)
    assert p.grad[0, slot].item() == 0.0
    assert_close(p.grad[0, kept], alone_p.grad[0], **TOL)


@pytest.mark.parametrize("name", LOSSES)
def test_a_tie_in_score_contributes_nothing(name):
    """Two responses with equal scores hold no preference: with the SFT terms off, the ranking loss
    and its gradient are zero (RRHF: sum over s_i < s_j; PRO: a tied response is no competitor;
    LiPO: psi_i > psi_j, and |G_i - G_j| = 0)."""
    p = t((-1.0, -3.0)).requires_grad_(True)
    s = t((0.5, 0.5))
    if name == "rrhf":
        out = rrhf_loss(p, s, ones(1, 2), sft_weight=0.0)
    elif name.startswith("pro"):
        out = pro_loss(p, s, ones(1, 2), sft_weight=0.0, score_temperature=name != "pro")
    else:
        out = lipo_lambda_loss(p, torch.zeros_like(p), s, ones(1, 2), beta=1.0)
    out.losses.sum().backward()
    assert out.losses.item() == 0.0
    assert_close(p.grad, torch.zeros_like(p), **TOL)


# ----------------------------------------------------------------------------- ranking metrics
def test_ranking_metrics_hand_example():
    """Pairs with different scores only; a tie in reward counts 1/2; padding never pairs.

    row 0: rewards (3, 1, 1, pad), scores (1, 0.5, 0, NaN): (0,1) 3 > 1 -> 1; (0,2) 3 > 1 -> 1;
           (1,2) reward tie -> 0.5. top1: argmax reward = 0, score 1 = best -> 1.
    row 1: rewards (2, 1, 0, 5), scores (0, 1, 0.5, 0.5): (1,0) 1 < 2 -> 0; (1,2) 1 > 0 -> 1;
           (1,3) 1 < 5 -> 0; (2,0) 0 < 2 -> 0; (3,0) 5 > 2 -> 1; (2,3) tied score, not counted.
           top1: argmax reward = 3, score 0.5 < 1 -> 0.
    accuracy = (1 + 1 + 0.5 + 0 + 1 + 0 + 0 + 1) / 8 = 0.5625.
    """
    rewards = torch.tensor([[3.0, 1.0, 1.0, 9.0], [2.0, 1.0, 0.0, 5.0]])
    scores = torch.tensor([[1.0, 0.5, 0.0, NAN], [0.0, 1.0, 0.5, 0.5]])
    valid = torch.tensor([[True, True, True, False], [True] * 4])
    metrics = ranking_metrics(rewards, scores, valid)
    assert sorted(metrics["rewards/accuracies"].tolist()) == [0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0, 1.0]
    assert metrics["rewards/accuracies"].mean().item() == pytest.approx(0.5625)
    assert metrics["rewards/top1"].tolist() == [1.0, 0.0]


# ----------------------------------------------------------------------------- data
def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def make_dm(tokenizer, train, **kwargs) -> ListwiseDataModule:
    dm = ListwiseDataModule(
        train=str(train), val=str(kwargs.pop("val", train)), max_length=kwargs.pop("max_length", 64), **kwargs
    )
    dm.tokenizer = tokenizer
    return dm


def decode(tokenizer, ids) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)


MIXED = [
    {"prompt": "Q0: ", "responses": ["okay", "good", "bad"], "scores": [0.5, 1.0, 0.0]},
    {
        "prompt": [{"role": "user", "content": "Q1"}],
        "responses": ["aa", [{"role": "assistant", "content": "bb"}], "cc", "dd"],
        "ranks": [2, 1, 4, 3],
    },
    {"prompt": "Q2: ", "responses": ["x", "y"], "scores": [0, 3]},
]


def test_listwise_records_plain_conversational_and_ranks(tokenizer, tmp_path):
    """Responses are stored best first; ranks become scores -rank; a chat prompt is rendered by the template."""
    dm = make_dm(tokenizer, write_jsonl(tmp_path / "lists.jsonl", MIXED))
    dm.setup("fit")
    plain, chat, two = dm.datasets["train"]
    assert [decode(tokenizer, r) for r in plain["responses"]] == ["good", "okay", "bad"]
    assert plain["scores"] == [1.0, 0.5, 0.0]
    assert chat["scores"] == [-1.0, -2.0, -3.0, -4.0]
    assert [decode(tokenizer, r).strip() for r in chat["responses"]] == ["bb", "aa", "dd", "cc"]
    rendered = tokenizer.apply_chat_template(MIXED[1]["prompt"], tokenize=False, add_generation_prompt=True)
    assert chat["prompt"] == tokenizer(rendered, add_special_tokens=False)["input_ids"]  # the chat template's prompt
    assert two["scores"] == [3.0, 0.0]


def test_max_responses_keeps_the_best(tokenizer, tmp_path):
    dm = make_dm(tokenizer, write_jsonl(tmp_path / "lists.jsonl", MIXED), max_responses=2)
    dm.setup("fit")
    assert [ex["scores"] for ex in dm.datasets["train"]] == [[1.0, 0.5], [-1.0, -2.0], [3.0, 0.0]]
    assert [decode(tokenizer, r).strip() for r in dm.datasets["train"][1]["responses"]] == ["bb", "aa"]
    with pytest.raises(SettingError, match=re.escape("ListwiseDataModule: max_responses must be >= 2, got 1")):
        ListwiseDataModule(max_responses=1)


def test_lists_of_different_lengths_share_a_batch(tokenizer, tmp_path):
    """3 + 4 + 2 responses -> 9 adjacent rows; list_index maps them back, -1 (and NaN score) past a list's end."""
    dm = make_dm(tokenizer, write_jsonl(tmp_path / "lists.jsonl", MIXED), batch_size=3)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape[0] == 9
    assert batch["list_index"].tolist() == [[0, 1, 2, -1], [3, 4, 5, 6], [7, 8, -1, -1]]
    assert torch.isnan(batch["scores"][batch["list_index"] < 0]).all()
    assert batch["scores"][0, :3].tolist() == [1.0, 0.5, 0.0]
    prompt = dm.datasets["val"][0]["prompt"]
    for row in range(3):  # each row holds the prompt, then its own response
        assert batch["input_ids"][row, : len(prompt)].tolist() == prompt


def test_builtin_lists_run_as_one_forward_of_k_times_b_rows(tokenizer):
    dm = ListwiseDataModule(task=WordRulesTask(num_train=8, num_val=4), list_size=4, batch_size=4, max_length=64)
    dm.tokenizer = tokenizer
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["list_index"].tolist() == [[4 * i + k for k in range(4)] for i in range(4)]
    assert batch["input_ids"].shape[0] == 16 and batch["scores"].shape == (4, 4)
    assert (batch["scores"][:, 0] == 1.0).all()  # the correct answer leads every list


@pytest.mark.parametrize(
    "change, field, message",
    [
        ({"scores": ["high", 0.5, 0.0]}, "scores[0]", "expected a finite number, got 'high'"),
        ({"scores": [1.0, 0.5]}, "scores", "expected a list of 3 numbers (one per response), got [1.0, 0.5]"),
        ({"responses": "good"}, "responses", "expected a list of responses, got str"),
        ({"scores": None}, "scores", "missing: a listwise record needs 'scores' or 'ranks'"),
    ],
    ids=["score_not_numeric", "length_mismatch", "responses_not_a_list", "no_scores_or_ranks"],
)
def test_bad_records_name_file_record_and_field(tokenizer, tmp_path, change, field, message):
    records = [dict(MIXED[0]), dict(MIXED[0])]
    records[1].update(change)
    records[1] = {k: v for k, v in records[1].items() if v is not None}
    train = write_jsonl(tmp_path / "lists.jsonl", records)
    val = write_jsonl(tmp_path / "val.jsonl", [MIXED[0]])
    with pytest.raises(DataError, match=re.escape(f"{train}, record 1, field '{field}': {message}")):
        make_dm(tokenizer, train, val=val).setup("fit")


@pytest.mark.parametrize(
    "change, field, message",
    [
        ({"responses": ["only"], "scores": [1.0]}, "responses", "a list needs at least two responses"),
        ({"scores": [0.5, 0.5, 0.5]}, "scores", "all responses have the same score: no preference to learn"),
    ],
    ids=["one_response", "all_scores_equal"],
)
def test_lists_without_a_preference_are_skipped_or_raise(tokenizer, tmp_path, caplog, change, field, message):
    records = [dict(MIXED[0]) for _ in range(3)]
    records[1].update(change)
    train = write_jsonl(tmp_path / "lists.jsonl", records)
    val = write_jsonl(tmp_path / "val.jsonl", [MIXED[0]])
    dm = make_dm(tokenizer, train, val=val)
    with caplog.at_level(logging.WARNING, logger="lit_align.data.datamodule"):
        dm.setup("fit")
    assert dm.skipped == {"train": 1, "val": 0} and len(dm.datasets["train"]) == 2
    assert "skipped 1 of 3 train records" in caplog.text
    with pytest.raises(DroppableRecord, match=re.escape(f"{train}, record 1, field '{field}': {message}")):
        make_dm(tokenizer, train, val=val, invalid_records="error").setup("fit")


# ----------------------------------------------------------------------------- module
def list_batch(tokenizer, lists):
    """Collated ListLayout batch of ``[(prompt, [responses...]), ...]`` with descending scores."""

    def encode(text, eos=False):
        return tokenizer(text, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if eos else [])

    examples = [
        {
            "prompt": encode(prompt),
            "responses": [encode(r, eos=True) for r in responses],
            "scores": [float(len(responses) - k) for k in range(len(responses))],
        }
        for prompt, responses in lists
    ]
    return Collator(tokenizer.pad_token_id, layout=ListLayout())(examples)


LISTS = [
    ("Write in capitals: abc\n", ["ABC", "aBC", "abc"]),
    ("Write in lowercase: XYZW\n", ["xyzw", "XYZW", "xyZW", "xYZW"]),
]


def test_the_shared_list_forward_equals_each_response_alone():
    torch.manual_seed(0)
    module = RRHF()
    module.eval()
    tokenizer = module.tokenizer
    with torch.no_grad():
        batch = list_batch(tokenizer, LISTS)
        lists = ResponseLists.gather(module.backbone.logps(batch), batch["list_index"])
        assert lists.valid.tolist() == [[True, True, True, False], [True] * 4]
        for i, (prompt, responses) in enumerate(LISTS):
            for k, response in enumerate(responses):
                alone = module.backbone.logps(list_batch(tokenizer, [(prompt, [response])]))
                assert lists.sum[i, k].item() == pytest.approx(alone.sum[0].item(), abs=1e-4)
                assert lists.count[i, k].item() == alone.count[0].item()
    assert lists.sum[0, 3].item() == 0.0 and lists.count[0, 3].item() == 0


@pytest.mark.parametrize("method", [RRHF, PRO, LiPO])
def test_one_training_step_gives_a_finite_loss(method):
    torch.manual_seed(0)
    module = method()
    assert module.needs_reference is (method is LiPO)
    batch = list_batch(module.tokenizer, LISTS)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
    before = [p.detach().clone() for p in module.backbone.policy.parameters()]
    loss = module.training_step(batch, 0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in module.backbone.policy.parameters() if p.grad is not None)
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, module.backbone.policy.parameters(), strict=True))


# ----------------------------------------------------------------------------- CLI end to end
@pytest.mark.slow
@pytest.mark.parametrize("method", ["rrhf", "pro", "lipo"])
def test_each_listwise_config_learns_the_builtin_task_through_the_cli(method, in_tmp, capsys, measured):
    """Held-out pairwise ranking accuracy starts near chance (validated before fit) and ends far
    above it (measured: 0.49/0.49/0.50 -> 0.997/0.999/0.999 for rrhf/pro/lipo after 80 steps)."""
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / f"{method}.yaml"),
            *short_run_flags(80),
            *QUIET_FLAGS,
            *seed_flags(),
        ]
    )
    accuracies = measured("val/rewards/accuracies", metric_rows("val/rewards/accuracies"))
    assert len(accuracies) == 2, accuracies
    assert 0.35 <= accuracies[0] <= 0.65
    assert accuracies[-1] >= 0.9
    assert all(math.isfinite(v) for v in metric_rows("train/loss"))
    assert "held-out val/rewards/accuracies:" in capsys.readouterr().out
