"""Reward functions for on-policy methods: score generated completions as text.

A reward is any object with ``__call__(prompts, completions) -> torch.Tensor [N]`` (one float per
completion; prompts as text, or chat message lists for conversational prompts), picked in YAML by
``class_path``. ``to(device)`` is called once before training so a model-based reward can move
to the policy's device. Rewards are never part of the module's state: they are not trained and not
saved in checkpoints.

Shipped:
* :class:`WordRulesReward`: the built-in task's verifier (graded or exact).
* :class:`lit_align.online.reward_model.RewardModelReward`: a reward model exported by
  ``configs/reward.yaml`` (a Hugging Face sequence-classification folder).

A new reward is a subclass of :class:`RewardFunction` (or any callable class) with a typed
``__init__``, e.g. ``reward: {class_path: my_pkg.LengthPenalty, init_args: {target: 20}}``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lightning import LightningModule

from lit_align.data.tasks import WordRulesTask


class RewardFunction:
    """Scores completions of prompts; subclasses implement :meth:`score`."""

    def attach(self, module: LightningModule) -> None:
        """Called with the method at fit, validation and test start (a reward that uses the
        policy itself, e.g. :class:`lit_align.online.self_judge.SelfJudge`, keeps it); nothing here."""

    def score(self, prompts: Sequence, completions: Sequence[str]) -> Sequence[float] | torch.Tensor:
        """One reward per (prompt, completion)."""
        raise NotImplementedError

    def __call__(self, prompts: Sequence, completions: Sequence[str]) -> torch.Tensor:
        if len(prompts) != len(completions):
            raise ValueError(f"{type(self).__name__}: {len(prompts)} prompts but {len(completions)} completions")
        return torch.as_tensor(self.score(prompts, completions), dtype=torch.float32).reshape(len(completions))

    def to(self, device: torch.device | str) -> "RewardFunction":
        """Move any model the reward holds to ``device`` (nothing to move by default)."""
        return self


class WordRulesReward(RewardFunction):
    """Verifiable reward of the built-in word-rules task (:class:`lit_align.data.WordRulesTask`).

    Args:
        graded: reward the fraction of the correct answer's characters matched position by
            position (1.0 exactly when correct); false: 1.0 when correct, else 0.0.
    """

    def __init__(self, graded: bool = True):
        self.graded = graded

    def score(self, prompts: Sequence, completions: Sequence[str]) -> list[float]:
        if self.graded:
            return [
                WordRulesTask.score(prompt, completion) for prompt, completion in zip(prompts, completions, strict=True)
            ]
        return [
            float(WordRulesTask.is_correct(prompt, completion))
            for prompt, completion in zip(prompts, completions, strict=True)
        ]
