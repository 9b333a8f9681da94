"""The shipped reward functions under one short import path, e.g. ``--reward
lit_align.rewards.WordRulesReward`` for ``lit-align eval`` or ``class_path:
lit_align.rewards.WordRulesReward`` in a config (the same classes as in :mod:`lit_align.online`)."""

from lit_align.online.reward_model import RewardModelReward
from lit_align.online.rewards import (
    ArithmeticReward,
    FunctionReward,
    RewardFunction,
    WeightedRewards,
    WordRulesReward,
)
from lit_align.online.self_judge import SelfJudge
from lit_align.online.verifiable import ExactAnswerReward, MathVerifyReward, ThinkFormatReward

__all__ = [
    "ArithmeticReward",
    "ExactAnswerReward",
    "FunctionReward",
    "MathVerifyReward",
    "RewardFunction",
    "RewardModelReward",
    "SelfJudge",
    "ThinkFormatReward",
    "WeightedRewards",
    "WordRulesReward",
]
