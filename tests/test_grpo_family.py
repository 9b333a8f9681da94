"""The GRPO refinements' pure functions against values derived by hand from their papers' equations."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import run_ddp_script

from lit_align.losses.grpo_family import (
    LOSS_NORMALISATIONS,
    TokenCounts,
    cispo_surrogate,
    clip_higher_surrogate,
    high_entropy_mask,
    masked_moments,
    overlong_penalty,
    reinforce_pp_returns,
    scaled_group_advantages,
    sequence_log_ratios,
    whiten_with,
    zero_spread_groups,
)

# two completions: 3 tokens and 1 token; per-token losses
PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
MASK = torch.tensor([[True, True, True], [True, False, False]])
COUNTS = TokenCounts(max_completion_length=5, global_tokens=8.0, world_size=2)


@pytest.mark.parametrize(
    "loss_type, expected",
    [
        ("grpo", (2.0 + 4.0) / 2),  # token means 2 and 4, then their mean
        ("bnpo", 10.0 / 4),  # 10 over the 4 tokens of this minibatch
        ("dr_grpo", 10.0 / (2 * 5)),  # 10 over rows x max length
        ("dapo", 2 * 10.0 / 8),  # world x local sum over the global token count
        ("cispo", 2 * 10.0 / 8),
    ],
)
def test_loss_normalisations(loss_type, expected):
    assert LOSS_NORMALISATIONS[loss_type](PER_TOKEN, MASK, COUNTS).item() == pytest.approx(expected)


def test_dapo_over_two_processes_equals_one_process_on_the_whole_batch():
    """Two processes with 3 and 1 tokens; DDP averages their gradients: (g_a + g_b) / 2 must be the
    gradient of the token mean over all 5 tokens."""
    weights = torch.ones(2, 3, requires_grad=True)
    a, b = weights[0:1] * PER_TOKEN[0:1], weights[1:2] * PER_TOKEN[1:2]
    counts = TokenCounts(5, global_tokens=4.0, world_size=2)
    averaged = (
        LOSS_NORMALISATIONS["dapo"](a, MASK[0:1], counts) + LOSS_NORMALISATIONS["dapo"](b, MASK[1:2], counts)
    ) / 2
    (grad_ddp,) = torch.autograd.grad(averaged, weights)
    whole = (weights * PER_TOKEN * MASK).sum() / 4
    (grad_whole,) = torch.autograd.grad(whole, weights)
    assert torch.allclose(grad_ddp, grad_whole)


def test_group_advantages_scaled_by_group_batch_or_not_at_all():
    scores = torch.tensor([1.0, 0.0, 3.0, 3.0])  # groups (1, 0) and (3, 3)
    std_group = math.sqrt(0.5)  # sample std of (1, 0)
    group = scaled_group_advantages(scores, 2, "group", eps=0.0)
    assert group[:2].tolist() == pytest.approx([0.5 / std_group, -0.5 / std_group])
    assert torch.isnan(group[2:]).all()  # a zero-spread group: 0/0 without eps
    assert scaled_group_advantages(scores, 2, "group")[2:].tolist() == [0.0, 0.0]  # 0 with the default eps
    batch = scaled_group_advantages(scores, 2, "batch", eps=0.0)
    std_batch = scores.std().item()  # sample std of all four scores
    assert batch.tolist() == pytest.approx([0.5 / std_batch, -0.5 / std_batch, 0.0, 0.0])
    assert scaled_group_advantages(scores, 2, "none").tolist() == [0.5, -0.5, 0.0, 0.0]
    with pytest.raises(ValueError, match="scale_rewards must be group, batch or none"):
        scaled_group_advantages(scores, 2, "global")


def test_clip_higher_bounds_each_side_separately():
    log_ratio = torch.tensor([math.log(1.5), math.log(1.5), math.log(0.5), math.log(0.5)])
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, clipped = clip_higher_surrogate(log_ratio, advantages, epsilon_low=0.2, epsilon_high=0.28)
    # r=1.5, A=+1: min(1.5, 1.28) = 1.28;  r=1.5, A=-1: min(-1.5, -1.28) = -1.5
    # r=0.5, A=+1: min(0.5, 0.8) = 0.5;    r=0.5, A=-1: min(-0.5, -0.8) = -0.8
    assert (-loss).tolist() == pytest.approx([1.28, -1.5, 0.5, -0.8])
    assert clipped.tolist() == [True, False, False, True]


def test_dual_clip_bounds_a_negative_advantage_token_with_a_huge_ratio():
    log_ratio = torch.tensor([math.log(10.0), math.log(10.0)])
    advantages = torch.tensor([-1.0, 1.0])
    loss, clipped = clip_higher_surrogate(log_ratio, advantages, 0.2, 0.2, delta=3.0)
    # A=-1: max(min(-10, -1.2), 3 * -1) = -3;  A=+1: min(10, 1.2) = 1.2 (dual clip only for A < 0)
    assert (-loss).tolist() == pytest.approx([-3.0, 1.2])
    assert clipped.tolist() == [True, True]


def test_gspo_ratio_is_the_exp_of_the_mean_token_log_ratio_and_shares_one_gradient():
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -9.0, -9.0]], requires_grad=True)
    old = torch.tensor([[-1.2, -1.4, -0.5], [-0.5, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    log_ratio = sequence_log_ratios(logps, old, mask)
    expected_first = math.exp((0.2 - 0.6 + 0.0) / 3)
    assert log_ratio.exp()[0].tolist() == pytest.approx([expected_first] * 3)
    assert log_ratio.exp()[1, 0].item() == pytest.approx(math.exp(0.2))
    (grad,) = torch.autograd.grad(log_ratio[0, 0].exp(), logps)  # d s_1 / d log pi = s_1 / |y_1| on its tokens
    assert grad[0].tolist() == pytest.approx([expected_first / 3] * 3) and grad[1].abs().sum() == 0


def test_cispo_keeps_the_gradient_of_a_clipped_token():
    logps = torch.tensor([math.log(0.9), math.log(0.2)], requires_grad=True)
    old = torch.tensor([math.log(0.3), math.log(0.2)])  # ratios 3.0 (clipped to 1.2) and 1.0
    advantages = torch.tensor([1.0, 1.0])
    loss, clipped = cispo_surrogate(logps, logps - old, advantages, epsilon_high=0.2, epsilon_low=None)
    assert clipped.tolist() == [True, False]
    (grad,) = torch.autograd.grad(loss.sum(), logps)
    assert grad.tolist() == pytest.approx([-1.2, -1.0])  # -sg(w) * A: non-zero where clipped
    # PPO's clip gives the clipped token no gradient at all
    ppo, _ = clip_higher_surrogate(logps - old, advantages, 0.2, 0.2)
    (ppo_grad,) = torch.autograd.grad(ppo.sum(), logps)
    assert ppo_grad[0].item() == 0.0


def test_reinforce_pp_returns_fold_the_kl_into_the_token_rewards():
    scores = torch.tensor([1.0, 0.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    returns = reinforce_pp_returns(scores, kl, beta=0.5, mask=mask)
    # G_t = score - beta * sum_{s >= t} KL_s: row 1: 1 - .5*.6, 1 - .5*.5, 1 - .5*.3; row 2: 0 - .5*.5
    torch.testing.assert_close(returns, torch.tensor([[0.7, 0.75, 0.85], [-0.25, 0.0, 0.0]]))
    centred = reinforce_pp_returns(scores, torch.zeros_like(kl), 0.5, mask, group_size=2)
    torch.testing.assert_close(centred, torch.tensor([[0.5, 0.5, 0.5], [-0.5, 0.0, 0.0]]))


def test_global_whitening_from_moments_summed_over_processes():
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    mask = torch.tensor([[True, True], [True, False]])
    first, second = masked_moments(values[:1], mask[:1]), masked_moments(values[1:], mask[1:])
    whitened = whiten_with(values, mask, first + second)
    mean, std = 2.0, math.sqrt(((1 - 2) ** 2 + 0 + (3 - 2) ** 2) / 3)
    torch.testing.assert_close(whitened, torch.tensor([[-1 / std, 0.0], [1 / std, 0.0]]))
    assert mean == pytest.approx(float((first + second)[0] / (first + second)[2]))


def test_overlong_penalty_is_linear_over_the_buffer():
    lengths = torch.tensor([10, 12, 14, 16, 20])
    # L_max 16, buffer 4: no penalty up to 12, then (12 - L) / 4, -1 at 16 and beyond
    assert overlong_penalty(lengths, 16, 4, factor=1.0).tolist() == pytest.approx([0.0, 0.0, -0.5, -1.0, -1.0])


def test_zero_spread_groups():
    assert zero_spread_groups(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5]), 2).tolist() == [True, False, True]


def test_high_entropy_mask_keeps_the_top_fraction_of_completion_tokens():
    entropy = torch.tensor([[0.1, 0.9, 0.5, 7.0], [0.3, 0.8, 0.2, 0.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    kept = high_entropy_mask(entropy, mask, fraction=0.3)
    # the 7 masked entropies sorted: 0, .1, .2, .3, .5, .8, .9; their 0.7 quantile (linear, position
    # 0.7 * 6 = 4.2) is .5 + .2 * (.8 - .5) = .56: the two highest, .9 and .8, are kept (7.0 is off the mask)
    assert kept.tolist() == [[False, True, False, False], [False, True, False, False]]


# ---- the options of the GRPO module --------------------------------------------------------------
def _rollout(scores, mask, ended, old_logps, ref_logps=None):
    from lit_align.online.rollout import Rollout

    batch = {"input_ids": torch.zeros_like(mask, dtype=torch.long), "attention_mask": mask.long()}
    rollout = Rollout(batch, [""] * len(scores), [""] * len(scores), ended, scores)
    rollout.mask, rollout.old_logps, rollout.ref_logps = mask, old_logps, ref_logps
    return rollout


def _pass(logps, mask):
    from lit_align.methods.on_policy import PolicyPass
    from lit_align.model.logprobs import SequenceLogps

    return PolicyPass(SequenceLogps(logps, mask), None, torch.zeros(0))


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"loss_type": "cispo", "delta": 3.0, "epochs": 2}, "GRPO: delta must be unset with loss_type=cispo"),
        ({"importance_sampling_level": "sequence"}, "GRPO: importance_sampling_level changes nothing here"),
        ({"epsilon_high": 0.28}, "GRPO: epsilon_high changes nothing here: with epochs 1 and minibatch_size unset"),
        ({"delta": 3.0}, "GRPO: delta changes nothing here"),
        ({"loss_type": "cispo"}, r"GRPO: loss_type changes nothing here \(cispo is then exactly dapo\)"),
        ({"overlong_penalty": 0.5}, "GRPO: overlong_penalty is set, but overlong_buffer is not"),
        (
            {"overlong_buffer": 4, "generation": {"max_new_tokens": 4}},
            "GRPO: overlong_buffer must be < generation.max_new_tokens=4, got 4",
        ),
        ({"delta": 1.0, "epochs": 2}, "GRPO: delta must be > 1, got 1.0"),
        ({"scale_rewards": "global"}, "GRPO: scale_rewards must be one of group, batch, none, got 'global'"),
    ],
)
def test_grpo_refuses_settings_that_change_nothing_or_are_out_of_range(settings, message):
    from lit_align.errors import SettingError
    from lit_align.methods import GRPO

    with pytest.raises(SettingError, match=message):
        GRPO(**settings)


def test_grpo_prepare_shapes_overlong_scores_and_keeps_truncated_completions_out():
    from lit_align.methods import GRPO

    grpo = GRPO(
        samples_per_prompt=2,
        scale_rewards="none",
        overlong_buffer=2,
        mask_truncated_completions=True,
        generation={"max_new_tokens": 4},
    )
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])  # lengths 2 and 4
    rollout = _rollout(torch.tensor([1.0, 1.0]), mask, torch.tensor([True, False]), torch.zeros(2, 4))
    grpo.prepare(rollout)
    # scores 1 + 0 and 1 - 1 (length 4 = the limit: the whole penalty), centred on their mean 0.5
    assert rollout.advantages[:, 0].tolist() == pytest.approx([0.5, -0.5])
    assert rollout.extra["in_loss"].tolist() == [True, False]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo"])
def test_grpo_loss_is_its_normalisation_of_the_surrogate_plus_the_kl_term(loss_type):
    from lit_align.methods import GRPO

    grpo = GRPO(
        loss_type=loss_type, samples_per_prompt=2, epsilon_high=0.28, minibatch_size=1, generation={"max_new_tokens": 3}
    )
    mask = torch.tensor([[True, True, True], [True, False, False]])
    old = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, 0.0, 0.0]])
    rollout = _rollout(torch.tensor([1.0, 0.0]), mask, torch.tensor([True, True]), old, ref)
    grpo.prepare(rollout)
    logps = torch.tensor([[-0.5, -1.2, -1.0], [-2.5, 0.0, 0.0]])
    loss, metrics = grpo.loss(rollout, _pass(logps, mask))
    surrogate, _ = SURROGATES_OF[loss_type](logps, logps - old, rollout.advantages)
    log_ratio = ref - logps
    kl = (log_ratio.exp() - 1 - log_ratio) * mask
    counts = TokenCounts(3, global_tokens=4.0, world_size=1)
    expected = LOSS_NORMALISATIONS[loss_type](surrogate + grpo.kl_controller.beta * kl, mask, counts)
    assert loss.item() == pytest.approx(expected.item())


SURROGATES_OF = {
    name: (lambda lp, lr, adv: clip_higher_surrogate(lr, adv, 0.2, 0.28))
    for name in ("grpo", "bnpo", "dr_grpo", "dapo")
}
SURROGATES_OF["cispo"] = lambda lp, lr, adv: cispo_surrogate(lp, lr, adv, 0.28, 0.2)


def test_grpo_high_entropy_fraction_trains_only_the_forking_tokens():
    """With high_entropy_fraction, the policy-gradient term's gradient is zero on low-entropy tokens."""
    from lit_align.methods import GRPO

    grpo = GRPO(samples_per_prompt=2, high_entropy_fraction=0.5, kl={"beta": 0.0})
    mask = torch.tensor([[True, True], [True, True]])
    rollout = _rollout(torch.tensor([1.0, 0.0]), mask, torch.tensor([True, True]), torch.full((2, 2), -1.0))
    grpo.prepare(rollout)
    logps = torch.full((2, 2), -1.0, requires_grad=True)
    entropy = torch.tensor([[0.1, 2.0], [3.0, 0.2]])
    grpo.entropy = lambda current: entropy  # the policy's entropy at each token, as if computed from logits
    loss, metrics = grpo.loss(rollout, _pass(logps, mask))
    (grad,) = torch.autograd.grad(loss, logps)
    assert (grad != 0).tolist() == [[False, True], [True, False]]
    assert metrics["policy/entropy"].item() == pytest.approx(entropy.mean().item())


def test_kl_free_on_policy_methods_build_no_reference():
    from lit_align.errors import SettingError
    from lit_align.methods import GRPO, PPO, OnlineDPO

    assert type(GRPO(kl={"beta": 0.0}).backbone.reference_source).__name__ == "NoReference"
    assert type(PPO(kl={"beta": 0.0}).backbone.reference_source).__name__ == "NoReference"
    assert type(GRPO().backbone.reference_source).__name__ != "NoReference"  # the default beta uses one
    assert type(GRPO(kl={"beta": 0.0, "target": 6.0}).backbone.reference_source).__name__ != "NoReference"
    assert type(OnlineDPO().backbone.reference_source).__name__ != "NoReference"  # its loss needs the reference
    with pytest.raises(SettingError, match="GRPO: model.reference is copy, but kl.beta is 0"):
        GRPO(kl={"beta": 0.0}, model={"reference": "copy"})


# ---- several rewards with weights ------------------------------------------------------------------
class _Length:
    """Completion length in characters (a second reward for the tests)."""

    def __call__(self, prompts, completions):
        return torch.tensor([float(len(c)) for c in completions])


def test_weighted_rewards_sum_their_parts_and_keep_each_by_name():
    from lit_align.rewards import WeightedRewards, WordRulesReward

    combined = WeightedRewards([WordRulesReward(graded=False), WordRulesReward(), _Length()], weights=[1.0, 0.5, 0.1])
    prompts, completions = ["First letter of cab:\n", "First letter of dog:\n"], ["c", "xy"]
    scores = combined(prompts, completions)
    assert scores.tolist() == pytest.approx([1.0 + 0.5 * 1.0 + 0.1 * 1, 0.0 + 0.5 * 0.0 + 0.1 * 2])
    assert list(combined.parts) == ["WordRulesReward_0", "WordRulesReward_1", "_Length"]
    assert combined.parts["_Length"].tolist() == [1.0, 2.0]


def test_weighted_rewards_need_one_weight_per_reward():
    from lit_align.errors import SettingError
    from lit_align.rewards import WeightedRewards, WordRulesReward

    with pytest.raises(SettingError, match="WeightedRewards: weights needs one weight .* 2 rewards, 1 weights"):
        WeightedRewards([WordRulesReward(), WordRulesReward()], weights=[1.0])


@pytest.mark.slow
def test_grpo_logs_each_weighted_reward_and_their_total(in_sft_workdir):
    import csv
    from pathlib import Path

    from conftest import QUIET_FLAGS

    from lit_align.cli import main

    config = Path(__file__).resolve().parents[1] / "configs" / "grpo.yaml"
    reward = (
        "{class_path: lit_align.rewards.WeightedRewards, init_args: {rewards: [{class_path: "
        "lit_align.rewards.WordRulesReward, init_args: {graded: false}}, {class_path: "
        "lit_align.rewards.WordRulesReward}], weights: [1.0, 0.5], names: [exact, graded]}}"
    )
    flags = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.log_every_n_steps", "1"]
    main(["fit", "--config", str(config), f"--model.init_args.reward={reward}", *flags, *QUIET_FLAGS])
    (path,) = Path("runs").rglob("metrics.csv")
    rows = [row for row in csv.DictReader(open(path)) if row.get("train/objective/rewards/exact")]
    for row in rows:  # the logged total is the weighted sum of the logged parts (batch means)
        exact, graded = float(row["train/objective/rewards/exact"]), float(row["train/objective/rewards/graded"])
        assert float(row["train/objective/scores"]) == pytest.approx(exact + 0.5 * graded, abs=1e-5)
    assert rows and [row for row in csv.DictReader(open(path)) if row.get("val/objective/rewards/graded")]


# ---- REINFORCE++ -----------------------------------------------------------------------------------
def test_reinforce_pp_advantages_are_kl_folded_returns_whitened_over_the_batch():
    from lit_align.methods import REINFORCEPlusPlus

    module = REINFORCEPlusPlus(kl={"beta": 0.5})
    mask = torch.tensor([[True, True, False], [True, True, True]])
    old = torch.tensor([[-1.0, -1.0, 0.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.2, -1.0, 0.0], [-1.0, -1.4, -1.0]])  # k1 KL: .2, 0 | 0, .4, 0
    rollout = _rollout(torch.tensor([1.0, 0.0]), mask, torch.tensor([True, True]), old, ref)
    module.prepare(rollout)
    # returns G_t = score - .5 * sum_{s >= t} KL_s: row 1: 1 - .1, 1 - 0; row 2: -.2, -.2, 0
    returns = torch.tensor([0.9, 1.0, -0.2, -0.2, 0.0])
    expected = (returns - returns.mean()) / returns.std(unbiased=False)
    torch.testing.assert_close(rollout.advantages[mask], expected, atol=1e-5, rtol=1e-5)
    assert rollout.advantages[0, 2] == 0


def test_reinforce_pp_group_baseline_needs_groups():
    from lit_align.errors import SettingError
    from lit_align.methods import REINFORCEPlusPlus

    with pytest.raises(SettingError, match="REINFORCEPlusPlus: group_baseline needs samples_per_prompt >= 2"):
        REINFORCEPlusPlus(group_baseline=True)
    assert REINFORCEPlusPlus(group_baseline=True, samples_per_prompt=4).group_baseline


# ---- dynamic sampling --------------------------------------------------------------------------------
def _round(scores: list[float], width: int) -> "Rollout":  # noqa: F821
    """A rollout of len(scores) completions, each ``width`` tokens wide, its scores as given."""
    mask = torch.ones(len(scores), width, dtype=torch.bool)
    rollout = _rollout(torch.tensor(scores), mask, torch.ones(len(scores), dtype=torch.bool), None)
    rollout.mask = rollout.old_logps = None
    rollout.ref_logps = torch.full((len(scores), width), float(width))
    rollout.completions = [f"{width}:{s}" for s in scores]
    return rollout


def test_dynamic_sampling_keeps_only_groups_with_spread_until_the_batch_is_full():
    from lit_align.methods import GRPO

    grpo = GRPO(samples_per_prompt=2, dynamic_sampling=True, max_sampling_rounds=3)
    rounds = iter([_round([1, 1, 0, 1], 3), _round([0, 0, 1, 0], 5), _round([1, 0, 0, 1], 4)])
    grpo.make_rollout = lambda batch, sampling_pass: next(rounds)
    rollout = grpo.collect_rollout({"prompts": ["a", "b"]}, sampling_pass=False)
    # round 1 keeps its 2nd group, round 2 its 2nd: two prompts' worth, so round 3 is never drawn
    assert rollout.scores.tolist() == [0.0, 1.0, 1.0, 0.0]
    assert rollout.completions == ["3:0", "3:1", "5:1", "5:0"]
    assert not zero_spread_groups(rollout.scores, 2).any()
    assert rollout.batch["input_ids"].shape == rollout.ref_logps.shape == (4, 5)  # padded to the widest round
    assert rollout.batch["attention_mask"][:2, 3:].sum() == 0 and (rollout.ref_logps[:2, 3:] == 0).all()
    assert next(rounds).completions[0] == "4:1"


def test_dynamic_sampling_stops_after_max_rounds_and_refuses_rounds_without_it():
    from lit_align.errors import SettingError
    from lit_align.methods import GRPO

    grpo = GRPO(samples_per_prompt=2, dynamic_sampling=True, max_sampling_rounds=2)
    rounds = iter([_round([1, 1, 0, 0], 3), _round([0, 1, 1, 1], 3)])
    grpo.make_rollout = lambda batch, sampling_pass: next(rounds)
    rollout = grpo.collect_rollout({"prompts": ["a", "b"]}, sampling_pass=False)
    assert rollout.scores.tolist() == [0.0, 1.0]  # the one group with spread in two rounds
    with pytest.raises(SettingError, match="GRPO: max_sampling_rounds is set, but dynamic_sampling is off"):
        GRPO(max_sampling_rounds=5)


@pytest.mark.slow
def test_dapo_divides_by_the_token_count_of_both_processes_under_ddp(tmp_path):
    """Two gloo processes train GRPO with loss_type dapo: at every step the loss's denominator is
    the completion tokens of both ranks (the script asserts it, and that the ranks' counts differed
    at some step, so a local count would have failed)."""
    run = run_ddp_script("ddp_dapo_token_count.py", tmp_path / "cache")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "OK 4 steps" in run.stdout, run.stdout


def test_dynamic_sampling_takes_the_sampling_pass_without_a_graph():
    """The frozen sampling log-probs of the kept groups come from a pass without gradients: a
    graph over the whole rollout would hold every activation (about 20 GB at SmolLM2's depth for
    64 completions) only to be detached."""
    from lit_align.methods import GRPO
    from lit_align.methods.on_policy import PolicyPass
    from lit_align.model.logprobs import SequenceLogps

    grpo = GRPO(samples_per_prompt=2, dynamic_sampling=True, max_sampling_rounds=2)
    rounds = iter([_round([1, 0, 0, 1], 3)])
    grpo.make_rollout = lambda batch, sampling_pass: next(rounds)
    grad_enabled = []

    def forward_rollout(batch):
        grad_enabled.append(torch.is_grad_enabled())
        logps = torch.zeros(batch["input_ids"].shape)
        return PolicyPass(SequenceLogps(logps, batch["attention_mask"].bool()), None, torch.zeros(0))

    grpo.forward_rollout = forward_rollout
    rollout = grpo.collect_rollout({"prompts": ["a", "b"]}, sampling_pass=True)
    assert grad_enabled == [False] and rollout.old_logps.shape == (4, 3)
