"""Unpaired objectives (KTO, NPO, BCO) and their data.

Loss values are derived by hand with ``math`` from the papers' equations, never by calling
torch functions that mirror the implementation. Throughout, sigma(x) = 1 / (1 + e^-x),
1 - sigma(x) = sigma(-x) and sp(z) = log(1 + e^z) = -log sigma(-z). The three-row example used
by the loss tests is

    policy log pi = (-1, -4, -2), reference log pi_ref = (-2, -2, -2)  ->  r = (1, -2, 0),
    desirable = (True, False, False).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import QUIET_FLAGS, metric_rows, metrics_table, quiet_trainer, seed_flags, short_run_flags
from lightning.pytorch.loggers import CSVLogger
from torch.testing import assert_close

from lit_align.cli import main
from lit_align.data import DataError, PreferenceDataModule, UnpairedDataModule, WordRulesTask, convert_pairs_file
from lit_align.losses import UnpairedLoss, bco_loss, kto_loss, kto_reference_point, npo_loss
from lit_align.methods import BCO, KTO, NPO
from lit_align.model.logprobs import SequenceLogps
from lit_align.settings import OptimizerSettings

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
TOL = {"rtol": 1e-6, "atol": 1e-6}
EOS = "<|eos|>"


def t(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def sp(z: float) -> float:
    """Softplus log(1 + e^z), i.e. -log sigma(-z)."""
    return math.log1p(math.exp(z))


POLICY, REFERENCE = t(-1.0, -4.0, -2.0), t(-2.0, -2.0, -2.0)
DESIRABLE = torch.tensor([True, False, False])


# ----------------------------------------------------------------------------- KTO loss
def test_kto_hand_values_with_class_weights():
    """KTO Eq. 8: desirable lambda_D (1 - sigma(beta (r - z0))), undesirable lambda_U (1 - sigma(beta (z0 - r))).

    beta = 0.5, z0 = 0.5, lambda_D = 2, lambda_U = 1.5, r = (1, -2, 0):
      row 0 (desirable):   2   (1 - sigma(0.5 (1 - 0.5)))  = 2   sigma(-0.25) = 0.8756469
      row 1 (undesirable): 1.5 (1 - sigma(0.5 (0.5 + 2)))  = 1.5 sigma(-1.25) = 0.3340502
      row 2 (undesirable): 1.5 (1 - sigma(0.5 (0.5 - 0)))  = 1.5 sigma(-0.25) = 0.6567352
    rewards beta r = (0.5, -1, 0); the ``kl`` metric is z0.
    """
    out = kto_loss(POLICY, REFERENCE, DESIRABLE, 0.5, beta=0.5, desirable_weight=2.0, undesirable_weight=1.5)
    assert isinstance(out, UnpairedLoss)
    assert_close(out.losses, t(2 * sigmoid(-0.25), 1.5 * sigmoid(-1.25), 1.5 * sigmoid(-0.25)), **TOL)
    assert out.losses[0].item() == pytest.approx(0.8756469, abs=1e-6)
    assert_close(out.rewards, t(0.5, -1.0, 0.0), **TOL)
    assert out.metrics["kl"].item() == pytest.approx(0.5)


def test_kto_class_weights_scale_only_their_class():
    """lambda_D multiplies only desirable rows, lambda_U only undesirable ones: with z0 = 0, beta = 1,
    row 0 = lambda_D sigma(-1), rows 1 and 2 = lambda_U sigma(-2) and lambda_U sigma(0) = lambda_U / 2."""
    for weights in [(1.0, 1.0), (3.0, 1.0), (1.0, 0.25)]:
        out = kto_loss(
            POLICY, REFERENCE, DESIRABLE, 0.0, beta=1.0, desirable_weight=weights[0], undesirable_weight=weights[1]
        )
        assert_close(out.losses, t(weights[0] * sigmoid(-1.0), weights[1] * sigmoid(-2.0), weights[1] * 0.5), **TOL)


def test_kto_gradient_hand_value():
    """d/dr lambda_D (1 - sigma(x)), x = beta (r - z0): -lambda_D beta sigma(x) sigma(-x).

    Row 0 of the first test: -2 * 0.5 * sigma(0.25) sigma(-0.25) = -0.2461340; an undesirable row
    has +lambda_U beta sigma(x) sigma(-x) with x = beta (z0 - r): row 1 1.5*0.5*sigma(1.25)sigma(-1.25).
    """
    policy = POLICY.clone().requires_grad_(True)
    kto_loss(
        policy, REFERENCE, DESIRABLE, 0.5, beta=0.5, desirable_weight=2.0, undesirable_weight=1.5
    ).losses.sum().backward()
    expected = t(
        -2 * 0.5 * sigmoid(0.25) * sigmoid(-0.25),
        1.5 * 0.5 * sigmoid(1.25) * sigmoid(-1.25),
        1.5 * 0.5 * sigmoid(0.25) * sigmoid(-0.25),
    )
    assert_close(policy.grad, expected, **TOL)


def test_kto_reference_point_mean_clamp_and_detach():
    """z0 = max(0, mean of mismatched log-ratios), no gradient.

    ratios (1, 2) -> 1.5; ratios (1, -1, 0) -> 0; ratios (-1, 0) -> mean -0.5, clamped to 0.
    """
    assert kto_reference_point(t(-1.0, -1.0), t(-2.0, -3.0)).item() == pytest.approx(1.5)
    assert kto_reference_point(t(-1.0, -3.0, -2.0), t(-2.0, -2.0, -2.0)).item() == pytest.approx(0.0)
    policy = t(-3.0, -2.0).requires_grad_(True)
    z0 = kto_reference_point(policy, t(-2.0, -2.0))
    assert z0.item() == 0.0  # clamped, not -0.5
    assert not z0.requires_grad
    positive = t(-1.0, -1.0).requires_grad_(True)
    z0 = kto_reference_point(positive, t(-2.0, -3.0))
    assert not z0.requires_grad
    policy = POLICY.clone().requires_grad_(True)
    kto_loss(policy, REFERENCE, DESIRABLE, z0, beta=0.5).losses.sum().backward()
    assert positive.grad is None and policy.grad is not None  # nothing flows back into the mismatched rows


def test_kto_loss_detaches_a_reference_point_that_requires_grad():
    kl = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    policy = POLICY.clone().requires_grad_(True)
    kto_loss(policy, REFERENCE, DESIRABLE, kl, beta=0.5).losses.sum().backward()
    assert kl.grad is None and policy.grad is not None


def test_kto_reference_point_gathers_sums_and_counts():
    """Two processes: this one has ratios (1, -1, 0) (sum 0, count 3), the other one ratio 4
    (sum 4, count 1). The global mean is (0 + 4) / (3 + 1) = 1, not the mean of the two means (2)."""
    other = t(4.0, 1.0)
    z0 = kto_reference_point(
        t(-1.0, -3.0, -2.0), t(-2.0, -2.0, -2.0), gather=lambda totals: torch.stack([totals, other])
    )
    assert z0.item() == pytest.approx(1.0)


# ----------------------------------------------------------------------------- NPO loss
def test_npo_hand_values_ignore_desirable_rows():
    """NPO Eq. 3: (2/beta) log(1 + (pi/pi_ref)^beta) = (2/beta) sp(beta r) on undesirable rows, 0 on desirable ones.

    beta = 0.5: row 1 r = -2: 4 log(1 + e^-1) = 1.2530467; row 2 r = 0: 4 log 2 = 2.7725887;
    row 0 is desirable: 0 (without labels it would be 4 log(1 + e^0.5) = 3.8963094).
    """
    out = npo_loss(POLICY, REFERENCE, beta=0.5, desirable=DESIRABLE)
    assert_close(out.losses, t(0.0, 4 * sp(-1.0), 4 * math.log(2.0)), **TOL)
    assert out.losses[1].item() == pytest.approx(1.2530467, abs=1e-6)
    assert_close(out.rewards, t(0.5, -1.0, 0.0), **TOL)
    assert_close(npo_loss(POLICY, REFERENCE, beta=0.5).losses, t(4 * sp(0.5), 4 * sp(-1.0), 4 * math.log(2.0)), **TOL)
    policy = POLICY.clone().requires_grad_(True)
    npo_loss(policy, REFERENCE, beta=0.5, desirable=DESIRABLE).losses.sum().backward()
    assert policy.grad[0].item() == 0.0  # desirable rows get no gradient from NPO


def test_npo_gradient_vanishes_as_the_ratio_goes_to_zero():
    """d/d log pi of (2/beta) sp(beta r) is 2 sigma(beta r): 1 at r = 0 (the gradient of gradient
    ascent, loss = log pi, is 1 everywhere), 2 sigma(-1) = 0.5378828 at beta r = -1 and
    2 sigma(-20) = 4.1e-9 at r = -40, beta = 0.5: the push-down stops once pi << pi_ref."""
    policy = t(0.0, -2.0, -40.0).requires_grad_(True)
    npo_loss(policy, t(0.0, 0.0, 0.0), beta=0.5).losses.sum().backward()
    assert_close(policy.grad, t(1.0, 2 * sigmoid(-1.0), 2 * sigmoid(-20.0)), rtol=1e-6, atol=1e-12)
    assert policy.grad[2].item() < 1e-8
    ascent = t(0.0, -2.0, -40.0).requires_grad_(True)
    ascent.sum().backward()  # gradient ascent on the NLL: constant gradient, never saturates
    assert_close(ascent.grad, t(1.0, 1.0, 1.0))


def test_npo_small_beta_tends_to_gradient_ascent():
    """(2/beta) sp(beta r) = (2/beta)(log 2 + beta r / 2 + O(beta^2 r^2)) = 2 log 2 / beta + r + O(beta r^2)."""
    beta = 1e-5
    out = npo_loss(t(-3.0), t(-1.0), beta=beta)
    assert out.losses.item() - 2 * math.log(2.0) / beta == pytest.approx(-2.0, abs=1e-3)


# ----------------------------------------------------------------------------- BCO loss
def test_bco_hand_values_with_reward_shift():
    """BCO: desirable -log sigma(beta r - delta), undesirable -log sigma(-(beta r - delta)).

    beta = 0.5, delta = 0.25: rewards (0.5, -1, 0), logits (0.25, -1.25, -0.25):
      row 0: -log sigma(0.25)  = sp(-0.25) = 0.5759394
      row 1: -log sigma(1.25)  = sp(-1.25) = 0.2519297
      row 2: -log sigma(0.25)  = sp(-0.25) = 0.5759394
    With delta = 0: sp(-0.5), sp(-1), sp(0) = log 2.
    """
    out = bco_loss(POLICY, REFERENCE, DESIRABLE, delta=0.25, beta=0.5)
    assert_close(out.losses, t(sp(-0.25), sp(-1.25), sp(-0.25)), **TOL)
    assert out.losses[1].item() == pytest.approx(0.2519297, abs=1e-6)
    assert_close(out.rewards, t(0.5, -1.0, 0.0), **TOL)
    assert out.metrics["delta"].item() == pytest.approx(0.25)
    assert_close(
        bco_loss(POLICY, REFERENCE, DESIRABLE, delta=0.0, beta=0.5).losses, t(sp(-0.5), sp(-1.0), math.log(2.0)), **TOL
    )


def test_bco_shift_cancels_a_common_reward_offset_and_gets_no_gradient():
    """Only beta r - delta enters the loss: adding c to every log pi and beta c to delta leaves the
    losses unchanged; a delta that requires grad receives none."""
    base = bco_loss(POLICY, REFERENCE, DESIRABLE, delta=0.25, beta=0.5).losses
    shifted = bco_loss(POLICY + 3.0, REFERENCE, DESIRABLE, delta=0.25 + 0.5 * 3.0, beta=0.5).losses
    assert_close(shifted, base, **TOL)
    delta = torch.tensor(0.25, dtype=torch.float64, requires_grad=True)
    bco_loss(POLICY.clone().requires_grad_(True), REFERENCE, DESIRABLE, delta=delta, beta=0.5).losses.sum().backward()
    assert delta.grad is None


# ----------------------------------------------------------------------------- modules on hand-built log-probs
def logps(*rows: list[float]) -> SequenceLogps:
    """SequenceLogps of rows of per-token log-probs (padded with masked zeros)."""
    width = max(len(row) for row in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.float64)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row, dtype=torch.float64)
        mask[i, : len(row)] = True
    return SequenceLogps(tokens, mask)


def test_kto_module_reference_point_from_mismatched_rows_without_gradient():
    """Completions r = (1, -2, 0) as above; mismatched ratios (1, 2, 0) -> z0 = 1, beta = 0.5:
    row 0 sigma(-0.5 (1 - 1)) = 0.5, row 1 sigma(-0.5 (1 + 2)) = sigma(-1.5), row 2 sigma(-0.5)."""
    module = KTO(beta=0.5)
    mismatched = logps([-1.0], [-0.5, -0.5], [-2.0])
    mismatched.tokens.requires_grad_(True)
    completions = logps([-1.0], [-2.0, -2.0], [-2.0])
    completions.tokens.requires_grad_(True)
    out = module.loss(completions, logps([-2.0], [-2.0], [-2.0]), DESIRABLE, mismatched, logps([-2.0], [-3.0], [-2.0]))
    assert out.metrics["kl"].item() == pytest.approx(1.0)
    assert_close(out.losses, t(0.5, sigmoid(-1.5), sigmoid(-0.5)), **TOL)
    out.losses.sum().backward()
    assert mismatched.tokens.grad is None and completions.tokens.grad is not None


def test_npo_module_retain_term_is_length_normalised_nll_of_desirable_rows():
    """retain_weight 3: row 0 (desirable, tokens (-1, -3), NLL per token 2) gets 3 * 2 = 6 and no
    NPO term; row 1 (undesirable, r = -2, beta = 0.5) gets 4 sp(-1) and no retain term."""
    module = NPO(beta=0.5, retain_weight=3.0)
    out = module.loss(logps([-1.0, -3.0], [-4.0]), logps([-5.0], [-2.0]), torch.tensor([True, False]), None, None)
    assert_close(out.losses, t(6.0, 4 * sp(-1.0)), **TOL)
    assert_close(out.metrics["retain_nll"], t(2.0), **TOL)
    plain = NPO(beta=0.5).loss(
        logps([-1.0, -3.0], [-4.0]), logps([-5.0], [-2.0]), torch.tensor([True, False]), None, None
    )
    assert_close(plain.losses, t(0.0, 4 * sp(-1.0)), **TOL)


@pytest.mark.parametrize("momentum, expected", [(None, 3.0), (0.5, 3.5)])
def test_bco_reward_shift_running_mean(momentum, expected):
    """Batches of rewards (1, 3) then (5): the mean of everything seen is (1 + 3 + 5) / 3 = 3; an
    exponential average with momentum 0.5 starts at the first batch mean 2, then 0.5*2 + 0.5*5 = 3.5."""
    module = BCO(beta=0.5, delta_momentum=momentum)
    module.update_reward_shift(torch.tensor([1.0, 3.0]))
    assert module.reward_shift.value.item() == pytest.approx(2.0)
    module.update_reward_shift(torch.tensor([5.0]))
    assert module.reward_shift.value.item() == pytest.approx(expected)
    assert "reward_shift.value" in module.state_dict()  # checkpointed


def test_bco_updates_the_shift_in_training_only_and_before_the_loss():
    """Rewards 0.5 r with r = (1, -2): batch mean -0.25 becomes delta, then the loss uses it:
    row 0 -log sigma(0.5 + 0.25) = sp(-0.75), row 1 -log sigma(1 - 0.25) = sp(-0.75). In eval mode
    delta stays put."""
    module = BCO(beta=0.5)
    completions, references = logps([-1.0], [-4.0]), logps([-2.0], [-2.0])
    module.eval()
    module.loss(completions, references, torch.tensor([True, False]), None, None)
    assert module.reward_shift.value.item() == 0.0 and module.reward_shift.count.item() == 0
    module.train()
    out = module.loss(completions, references, torch.tensor([True, False]), None, None)
    assert module.reward_shift.value.item() == pytest.approx(-0.25)
    assert_close(out.losses, t(sp(-0.75), sp(-0.75)), **TOL)


def test_invalid_hyper_parameters_are_named():
    with pytest.raises(ValueError, match="delta_momentum"):
        BCO(delta_momentum=1.0)
    with pytest.raises(ValueError, match="retain_weight"):
        NPO(retain_weight=-1.0)
    with pytest.raises(ValueError, match="undesirable_weight"):
        KTO(undesirable_weight=0.0)


# ----------------------------------------------------------------------------- data
def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def unpaired_dm(tokenizer, train: Path, **kwargs) -> UnpairedDataModule:
    dm = UnpairedDataModule(train=str(train), val=str(kwargs.pop("val", train)), **kwargs)
    dm.tokenizer = tokenizer
    return dm


def decode(tokenizer, ids) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False)


def test_unpaired_file_with_plain_and_conversational_prompts(tokenizer, tmp_path):
    records = [
        {"prompt": "Say hi", "completion": "hi", "label": True},
        {"prompt": [{"role": "user", "content": "Say bye"}], "completion": "go away", "label": False},
        {
            "prompt": [{"role": "user", "content": "Say yes"}],
            "completion": [{"role": "assistant", "content": "yes"}],
            "label": True,
        },
    ]
    dm = unpaired_dm(tokenizer, write_jsonl(tmp_path / "train.jsonl", records), max_length=64)
    dm.setup("fit")
    train = dm.datasets["train"]
    assert [decode(tokenizer, e["prompt"]) for e in train] == [
        "Say hi",
        "<|bos|><|user|>Say bye<|eos|><|assistant|>",
        "<|bos|><|user|>Say yes<|eos|><|assistant|>",
    ]
    assert [decode(tokenizer, e["completion"]) for e in train] == ["hi" + EOS, "go away" + EOS, "yes" + EOS]
    assert [e["label"] for e in train] == [True, False, True]
    assert all("kl_completion" not in e for e in train)  # only when the module asks for them
    assert dm.count_classes() == {"desirable": 2, "undesirable": 1}
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 3 and sorted(batch["label"].tolist()) == [0, 1, 1]


def test_from_pairs_gives_desirable_then_undesirable(tokenizer, tmp_path):
    pairs = [{"prompt": f"Q{i}: ", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(3)]
    dm = unpaired_dm(tokenizer, write_jsonl(tmp_path / "pairs.jsonl", pairs), from_pairs=True, max_length=64)
    dm.setup("fit")
    train = dm.datasets["train"]
    assert len(train) == 6
    assert [e["label"] for e in train] == [True, False] * 3
    assert [decode(tokenizer, e["completion"]) for e in train[:2]] == ["good 0" + EOS, "bad 0" + EOS]
    assert train[0]["prompt"] == train[1]["prompt"]
    assert dm.count_classes() == {"desirable": 3, "undesirable": 3}


def test_mismatched_completions_come_from_another_prompt_and_fit_max_length(tokenizer, tmp_path):
    """Examples 0 and 1 share a prompt, so example 0's mismatched completion is example 2's (the
    next one with another prompt). Example 2's prompt is long and example 0's completion long:
    example 2's mismatched completion is example 0's, cut to max_length - its prompt length."""
    long_prompt = "A rather long question here"
    records = [
        {"prompt": "Q", "completion": "an answer that is quite long indeed", "label": True},
        {"prompt": "Q", "completion": "no", "label": False},
        {"prompt": long_prompt, "completion": "ok", "label": True},
        {"prompt": long_prompt, "completion": "bad", "label": False},
    ]
    dm = unpaired_dm(tokenizer, write_jsonl(tmp_path / "train.jsonl", records), max_length=40, max_prompt_length=30)
    dm.mismatched_completions = True
    dm.setup("fit")
    train = dm.datasets["train"]
    assert train[0]["kl_completion"] == train[2]["completion"]
    assert train[1]["kl_completion"] == train[2]["completion"]
    room = 40 - len(train[2]["prompt"])
    assert len(train[0]["completion"]) > room  # so it has to be cut
    assert train[2]["kl_completion"] == train[0]["completion"][:room]
    for example in train:
        assert len(example["prompt"]) + len(example["kl_completion"]) <= 40
        source = next(
            other for other in train if example["kl_completion"] == other["completion"][: len(example["kl_completion"])]
        )
        assert source["prompt"] != example["prompt"]
    batch = dm.collate(train[:2])
    assert batch["input_ids"].shape[0] == 4  # completion rows, then mismatched rows


def test_mismatched_completions_need_two_prompts(tokenizer, tmp_path):
    records = [{"prompt": "Q", "completion": "a", "label": True}, {"prompt": "Q", "completion": "b", "label": False}]
    dm = unpaired_dm(tokenizer, write_jsonl(tmp_path / "same.jsonl", records), max_length=32)
    dm.mismatched_completions = True
    with pytest.raises(DataError, match="same prompt"):
        dm.setup("fit")


@pytest.mark.parametrize(
    "bad, field, words",
    [
        ({"prompt": "q", "completion": "a", "label": 1}, "label", "expected a boolean"),
        ({"prompt": "q", "completion": "a", "label": "yes"}, "label", "expected a boolean"),
        ({"prompt": "q", "label": True}, "completion", "missing"),
        ({"prompt": "q", "completion": 5, "label": False}, "completion", "expected a string"),
        (
            {"prompt": [{"role": "wizard", "content": "q"}], "completion": "a", "label": True},
            r"prompt\[0\]",
            "unknown chat role 'wizard'",
        ),
    ],
)
def test_bad_unpaired_records_are_named(tokenizer, tmp_path, bad, field, words):
    val = write_jsonl(tmp_path / "val.jsonl", [{"prompt": "v", "completion": "w", "label": True}])
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "p", "completion": "c", "label": True}, bad])
    with pytest.raises(DataError, match=rf"train\.jsonl, record 1, field '{field}': {words}"):
        unpaired_dm(tokenizer, train, val=val, max_length=32).setup("fit")


def test_convert_pairs_file_writes_two_records_per_pair(tmp_path):
    conversation = [{"role": "user", "content": "hello"}]
    pairs = [
        {"prompt": "Q: ", "chosen": "yes", "rejected": "no"},
        {"prompt": conversation, "chosen": "hi", "rejected": "go"},
    ]
    output = tmp_path / "out" / "unpaired.jsonl"
    assert convert_pairs_file(str(write_jsonl(tmp_path / "pairs.jsonl", pairs)), str(output)) == (
        4,
        0,
    )  # (written, skipped)
    written = [json.loads(line) for line in output.read_text().splitlines()]
    assert written == [
        {"prompt": "Q: ", "completion": "yes", "label": True},
        {"prompt": "Q: ", "completion": "no", "label": False},
        {"prompt": conversation, "completion": "hi", "label": True},
        {"prompt": conversation, "completion": "go", "label": False},
    ]


def test_convert_pairs_file_writes_nothing_on_error(tmp_path):
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "rejected": "c"}]
    )
    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(DataError, match=r"pairs\.jsonl, record 1, field 'chosen': missing"):
        convert_pairs_file(str(pairs), str(folder / "unpaired.jsonl"))
    assert list(folder.iterdir()) == []  # no partial file, no temporary file


# ----------------------------------------------------------------------------- training
def trainer(steps: int, **kwargs) -> L.Trainer:
    defaults = {"max_steps": steps, "limit_val_batches": 0, "num_sanity_val_steps": 0}
    return quiet_trainer(**{**defaults, **kwargs})


def test_kto_trains_at_batch_size_one(tmp_path):
    """Each example carries its own fixed mismatched completion, so z0 exists at batch size 1 and
    is the clamped log-ratio of that single mismatched row (not of the example's own completion)."""
    L.seed_everything(0)
    module = KTO(beta=0.5, optimizer=OptimizerSettings(lr=1e-2))
    data = UnpairedDataModule(batch_size=1, max_length=32, task=WordRulesTask(num_train=6, num_val=2))
    fit = trainer(12, logger=CSVLogger(tmp_path, name="kto"), log_every_n_steps=1)
    fit.fit(module, data)
    rows = metrics_table(tmp_path)
    losses = [float(row["train/loss"]) for row in rows if row.get("train/loss")]
    kls = [float(row["train/kl"]) for row in rows if row.get("train/kl")]
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses)
    assert len(kls) == 12 and all(v >= 0 for v in kls)

    examples = data.datasets["train"]
    assert examples[0]["kl_completion"] == examples[2]["completion"]  # the next pair's chosen answer
    module.eval()
    positive = 0
    for example in examples:
        batch = data.collate([example])
        assert batch["input_ids"].shape[0] == 2  # the completion row and the mismatched row
        with torch.no_grad():
            out = module.forward_unpaired(batch)
            policy, reference = module.backbone.logps(batch), module.reference_logps(batch)
        own, mismatched = (policy.sum - reference.sum).tolist()
        assert out.metrics["kl"].item() == pytest.approx(max(0.0, mismatched), abs=1e-5)
        assert math.isfinite(out.losses.item())
        positive += mismatched > 1e-3 and abs(mismatched - own) > 1e-3
    assert positive > 0  # some z0 is a positive log-ratio of a mismatched row, not of the example's own completion


def test_kto_balance_classes_sets_the_undesirable_weight(tokenizer, tmp_path):
    """6 desirable, 2 undesirable examples, lambda_D = 1.5: lambda_U = 1.5 * 6 / 2 = 4.5, so
    lambda_D n_D / (lambda_U n_U) = 9 / 9 = 1."""
    records = [{"prompt": f"q{i}", "completion": f"a{i}", "label": i < 6} for i in range(8)]
    train = write_jsonl(tmp_path / "train.jsonl", records)
    module = KTO(desirable_weight=1.5, undesirable_weight=1.0, balance_classes=True)
    data = UnpairedDataModule(train=str(train), val=str(train), batch_size=4, max_length=16)
    trainer(1).fit(module, data)
    assert module.served_data.class_counts == {"desirable": 6, "undesirable": 2}
    assert module.undesirable_weight == pytest.approx(4.5)
    assert module.desirable_weight * 6 / (module.undesirable_weight * 2) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="desirable and undesirable"):
        module.balance_class_weights({"desirable": 4, "undesirable": 0})


def test_kto_with_the_paired_data_module_names_the_unpaired_one():
    module = KTO()
    data = PreferenceDataModule(batch_size=4, max_length=32, task=WordRulesTask(num_train=8, num_val=4))
    with pytest.raises(ValueError, match=r"KTO trains on UnpairedLayout data.*use lit_align\.data\.UnpairedDataModule"):
        trainer(1).fit(module, data)


# ----------------------------------------------------------------------------- CLI on the built-in task
# measured after 80 steps (seed 0, CPU): KTO 1.305, NPO 1.261, BCO 1.256; the threshold leaves half of it to spare
@pytest.mark.slow
@pytest.mark.parametrize("method", ["kto", "npo", "bco"])
def test_each_unpaired_method_learns_the_builtin_task_through_the_cli(method, capsys, tmp_path, monkeypatch, measured):
    """The held-out reward margin starts at 0 (policy = reference before fit) and ends clearly positive."""
    monkeypatch.chdir(tmp_path)
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
    margins = measured("val/rewards/margins", metric_rows("val/rewards/margins"))
    assert len(margins) == 2, margins
    assert abs(margins[0]) < 0.01
    assert margins[-1] > 0.6
    assert all(math.isfinite(v) for v in metric_rows("train/loss"))
    assert "held-out val/rewards/margins:" in capsys.readouterr().out


@pytest.mark.slow
def test_kto_reference_point_is_the_mean_over_every_process(tmp_path):
    """2-process DDP (gloo): the z0 each rank's loss uses is the mean of both ranks' mismatched
    log-ratios (the script asserts it on every step, and that some step's local mean differs)."""
    from conftest import run_ddp_script

    run = run_ddp_script("ddp_kto_reference_point.py", tmp_path / "cache")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "OK 4 steps" in run.stdout
