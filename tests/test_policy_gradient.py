"""Pure functions of the on-policy family against hand-derived values."""

from __future__ import annotations

import math
import re

import pytest
import torch

from lit_align.losses.policy_gradient import (
    aggregate,
    clipped_surrogate,
    clipped_value_loss,
    gae,
    group_normalised_advantages,
    kl_k1,
    kl_k2,
    kl_k3,
    last_token_mask,
    leave_one_out_advantages,
    n_step_advantages,
    token_rewards,
    whiten,
)
from lit_align.methods import PPO
from lit_align.online.kl_control import KLPenalty

# one row: 2 prompt positions (masked), 3 response tokens, 1 padding position
MASK = torch.tensor([[False, False, True, True, True, False]])
REWARDS = torch.tensor([[0.0, 0.0, 1.0, 0.0, 2.0, 0.0]])
VALUES = torch.tensor([[0.0, 0.0, 0.5, 1.0, 1.5, 0.0]])


def test_gae_hand_example():
    """gamma = 0.9, lam = 0.5 on rewards (1, 0, 2), values (0.5, 1.0, 1.5), V = 0 after the end:
    delta = (1 + 0.9*1.0 - 0.5, 0 + 0.9*1.5 - 1.0, 2 - 1.5) = (1.4, 0.35, 0.5)
    A_3 = 0.5; A_2 = 0.35 + 0.45*0.5 = 0.575; A_1 = 1.4 + 0.45*0.575 = 1.65875.
    Returns = A + V = (2.15875, 1.575, 2.0)."""
    advantages, returns = gae(REWARDS, VALUES, MASK, gamma=0.9, lam=0.5)
    torch.testing.assert_close(advantages, torch.tensor([[0, 0, 1.65875, 0.575, 0.5, 0]]))
    torch.testing.assert_close(returns, torch.tensor([[0, 0, 2.15875, 1.575, 2.0, 0]]))


def test_gae_lambda_zero_is_the_td_error():
    advantages, _ = gae(REWARDS, VALUES, MASK, gamma=0.9, lam=0.0)
    torch.testing.assert_close(advantages, torch.tensor([[0, 0, 1.4, 0.35, 0.5, 0]]))


def test_gae_lambda_one_is_the_monte_carlo_return_minus_value():
    """gamma = 0.9: G = (1 + 0.9*0 + 0.81*2, 0 + 0.9*2, 2) = (2.62, 1.8, 2); minus V = (2.12, 0.8, 0.5)."""
    advantages, returns = gae(REWARDS, VALUES, MASK, gamma=0.9, lam=1.0)
    torch.testing.assert_close(advantages, torch.tensor([[0, 0, 2.12, 0.8, 0.5, 0]]))
    torch.testing.assert_close(returns, torch.tensor([[0, 0, 2.62, 1.8, 2.0, 0]]))


def test_n_step_td0_and_monte_carlo():
    """TD(0) equals GAE with lam 0; n >= the response length equals the Monte-Carlo return."""
    td0, targets = n_step_advantages(REWARDS, VALUES, MASK, gamma=0.9, n=1)
    torch.testing.assert_close(td0, torch.tensor([[0, 0, 1.4, 0.35, 0.5, 0]]))
    torch.testing.assert_close(targets, torch.tensor([[0, 0, 1.9, 1.35, 2.0, 0]]))
    two, _ = n_step_advantages(REWARDS, VALUES, MASK, gamma=0.9, n=2)
    # A_1 = 1 + 0.9*0 + 0.81*V_3(1.5) - 0.5 = 1.715; A_2 = 0 + 0.9*2 + 0 - 1 = 0.8; A_3 = 0.5
    torch.testing.assert_close(two, torch.tensor([[0, 0, 1.715, 0.8, 0.5, 0]]))
    monte_carlo, _ = n_step_advantages(REWARDS, VALUES, MASK, gamma=0.9, n=5)
    torch.testing.assert_close(monte_carlo, torch.tensor([[0, 0, 2.12, 0.8, 0.5, 0]]))
    with pytest.raises(ValueError, match="n >= 1"):
        n_step_advantages(REWARDS, VALUES, MASK, gamma=0.9, n=0)


def test_clipped_surrogate_positive_advantage_is_capped():
    """ratio 3.0, A = 0.8, eps 0.2: min(3.0*0.8, 1.2*0.8) = 0.96 -> loss -0.96, clipped."""
    loss, ratio, clipped = clipped_surrogate(
        torch.tensor([math.log(3.0)]), torch.tensor([0.0]), torch.tensor([0.8]), clip=0.2
    )
    torch.testing.assert_close(loss, torch.tensor([-0.96]))
    torch.testing.assert_close(ratio, torch.tensor([3.0]))
    assert clipped.item()


def test_clipped_surrogate_negative_advantage():
    """A = -0.8: ratio 3.0 -> min(-2.4, -0.96) = -2.4 (no clip: the pessimistic bound keeps the
    large penalty); ratio 0.5 -> min(-0.4, 0.8*-0.8 = -0.64) = -0.64 (clipped at 1 - eps)."""
    loss, _, clipped = clipped_surrogate(
        torch.log(torch.tensor([3.0, 0.5])), torch.zeros(2), torch.tensor([-0.8, -0.8]), clip=0.2
    )
    torch.testing.assert_close(loss, torch.tensor([2.4, 0.64]))
    assert clipped.tolist() == [False, True]


def test_clipped_value_loss():
    """V_old 1.0, eps 0.2, R 2.0: V 1.5 -> clipped V 1.2: max(0.25, 0.64)/2 = 0.32 (clipped);
    V 1.1 -> max(0.81, 0.81)/2 = 0.405 (not clipped)."""
    loss, clipped = clipped_value_loss(
        torch.tensor([1.5, 1.1]), torch.tensor([1.0, 1.0]), torch.tensor([2.0, 2.0]), clip=0.2
    )
    torch.testing.assert_close(loss, torch.tensor([0.32, 0.405]))
    assert clipped.tolist() == [True, False]


def test_kl_estimators():
    """log pi = log 0.5, log pi_ref = log 0.25: k1 = log 2; k2 = (log 2)^2 / 2; k3 = r - 1 - log r
    with r = 0.5: -0.5 + log 2."""
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    torch.testing.assert_close(kl_k1(logp, ref), torch.tensor([math.log(2)]))
    torch.testing.assert_close(kl_k2(logp, ref), torch.tensor([math.log(2) ** 2 / 2]))
    torch.testing.assert_close(kl_k3(logp, ref), torch.tensor([-0.5 + math.log(2)]))
    assert kl_k3(ref, logp).item() > 0  # never negative, unlike k1


def test_kl_estimators_are_unbiased_or_not_as_documented():
    """Sampling from pi = (0.7, 0.3) with pi_ref = (0.4, 0.6): E[k1] = E[k3] = KL; k2 differs."""
    pi, ref = torch.tensor([0.7, 0.3]), torch.tensor([0.4, 0.6])
    exact = float((pi * (pi / ref).log()).sum())
    for estimator in (kl_k1, kl_k3):
        assert float((pi * estimator(pi.log(), ref.log())).sum()) == pytest.approx(exact, rel=1e-5)
    assert float((pi * kl_k2(pi.log(), ref.log())).sum()) != pytest.approx(exact, rel=1e-2)


def test_token_rewards_put_the_score_on_the_last_token():
    kl = torch.tensor([[0.0, 0.0, 1.0, 2.0, 3.0, 0.0]])
    rewards = token_rewards(torch.tensor([5.0]), kl, beta=0.1, mask=MASK)
    torch.testing.assert_close(rewards, torch.tensor([[0, 0, -0.1, -0.2, 4.7, 0]]))
    assert last_token_mask(MASK).tolist() == [[False, False, False, False, True, False]]


def test_leave_one_out_and_group_normalised_advantages():
    """Group (1, 2, 3, 6): RLOO A_1 = 1 - (2+3+6)/3 = -8/3 ... ; GRPO: mean 3, sample std
    sqrt((4+1+0+9)/3) = sqrt(14/3)."""
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 1.0, 1.0])
    rloo = leave_one_out_advantages(scores, 4)
    torch.testing.assert_close(rloo[:4], torch.tensor([1 - 11 / 3, 2 - 10 / 3, 3 - 3.0, 6 - 2.0]))
    torch.testing.assert_close(rloo[4:], torch.tensor([-2 / 3, -2 / 3, 2 / 3, 2 / 3]))
    grpo = group_normalised_advantages(scores, 4, eps=0.0)
    torch.testing.assert_close(grpo[:4], (scores[:4] - 3) / math.sqrt(14 / 3))
    shifted = group_normalised_advantages(scores, 4, scale=False)
    torch.testing.assert_close(shifted[4:], torch.tensor([-0.5, -0.5, 0.5, 0.5]))
    with pytest.raises(ValueError, match="at least 2 samples"):
        leave_one_out_advantages(scores, 1)


def test_aggregation_levels():
    """Rows with 1 and 3 tokens, losses (4) and (1, 1, 1): token mean 7/4; sequence mean (4 + 1)/2."""
    losses = torch.tensor([[4.0, 0, 0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[True, False, False], [True, True, True]])
    assert aggregate(losses, mask, "token").item() == pytest.approx(7 / 4)
    assert aggregate(losses, mask, "sequence").item() == pytest.approx(2.5)
    with pytest.raises(ValueError, match="'token' or 'sequence'"):
        aggregate(losses, mask, "batch")


def test_whiten_over_the_mask_only():
    values = torch.tensor([[1.0, 3.0, 100.0]])
    mask = torch.tensor([[True, True, False]])
    torch.testing.assert_close(whiten(values, mask, eps=0.0), torch.tensor([[-1.0, 1.0, 0.0]]))


def test_adaptive_kl_controller_moves_beta_the_right_way():
    controller = KLPenalty(beta=0.1, target=6.0).controller()
    assert controller.update(10.0) == pytest.approx(0.2)  # 10 > 1.5 * 6: KL too high -> raise beta
    assert controller.update(7.0) == pytest.approx(0.2)  # within [3, 9]: unchanged
    assert controller.update(2.0) == pytest.approx(0.1)  # 2 < 0.5 * 6: KL too low -> lower beta
    fixed = KLPenalty(beta=0.1).controller()
    assert fixed.update(100.0) == pytest.approx(0.1)
    assert "beta_value" in controller.state_dict()  # resumes from checkpoints
    with pytest.raises(
        ValueError, match=re.escape("PPO: kl.target must be > 0, got 0.0")
    ):  # checked where the setting enters
        PPO(kl=KLPenalty(target=0.0))
