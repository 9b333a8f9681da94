"""Reward functions for on-policy methods: score generated completions as text.

A reward is any object with ``__call__(prompts, completions) -> torch.Tensor [N]`` (one float per
completion; prompts as text, or chat message lists for conversational prompts), picked in YAML by
``class_path``. ``to(device)`` is called once before training so a model-based reward can move
to the policy's device. Rewards are never part of the module's state: they are not trained and not
saved in checkpoints.

Shipped:
* :class:`WordRulesReward`, :class:`ArithmeticReward`: the built-in tasks' verifiers (graded or exact).
* :class:`lit_align.online.reward_model.RewardModelReward`: a reward model exported by
  ``configs/reward.yaml`` (a Hugging Face sequence-classification folder).

A new reward is a subclass of :class:`RewardFunction` (or any callable class) with a typed
``__init__``, e.g. ``reward: {class_path: my_pkg.LengthPenalty, init_args: {target: 20}}``, or a
plain function wrapped by :class:`FunctionReward`. What a reward returns is checked on every call
(:func:`as_scores`): one finite number per completion, else a :class:`lit_align.errors.RewardError`
naming the reward.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from lightning import LightningModule

from lit_align.data.arithmetic_task import ArithmeticTask
from lit_align.data.errors import DataError
from lit_align.data.tasks import BuiltinTask, WordRulesTask
from lit_align.errors import RewardError, SettingError


class RewardFunction:
    """Scores completions of prompts; subclasses implement :meth:`score`."""

    needs_answers: bool = False
    """Whether :meth:`score` also takes each prompt's reference answer (``score(prompts,
    completions, answers)``; verifiable rewards): the prompt data must then give an ``answer``."""

    def attach(self, module: LightningModule) -> None:
        """Called with the method at fit, validation and test start (a reward that uses the
        policy itself, e.g. :class:`lit_align.online.self_judge.SelfJudge`, keeps it); nothing here."""

    def score(self, prompts: Sequence, completions: Sequence[str]) -> Sequence[float] | torch.Tensor:
        """One reward per (prompt, completion)."""
        raise NotImplementedError

    def __call__(self, prompts: Sequence, completions: Sequence[str], answers: Sequence | None = None) -> torch.Tensor:
        if len(prompts) != len(completions):
            raise ValueError(f"{type(self).__name__}: {len(prompts)} prompts but {len(completions)} completions")
        if not self.needs_answers:
            scores = self.score(prompts, completions)
        elif answers is None or any(answer is None for answer in answers):
            raise SettingError(
                type(self).__name__,
                None,
                "checks completions against reference answers, but the prompt data gives none: give each record "
                "an 'answer' (or 'solution') field, or map yours with data.init_args.columns {answer: <field>}",
            )
        else:
            scores = self.score(prompts, completions, answers)
        return as_scores(self, scores, prompts, completions)

    def to(self, device: torch.device | str) -> "RewardFunction":
        """Move any model the reward holds to ``device`` (nothing to move by default)."""
        return self


class BuiltinTaskReward(RewardFunction):
    """The verifier of a built-in task (which parses its own prompts, so no reference answers are
    needed): its graded score, or exact correctness.

    Args:
        graded: reward the task's partial credit (1.0 exactly when correct); false: 1.0 when
            correct, else 0.0.
    """

    task: ClassVar[type[BuiltinTask]]

    def __init__(self, graded: bool = True):
        self.graded = graded

    def score(self, prompts: Sequence, completions: Sequence[str]) -> list[float]:
        pairs = zip(prompts, completions, strict=True)
        if self.graded:
            return [self.task.score(prompt, completion) for prompt, completion in pairs]
        return [float(self.task.is_correct(prompt, completion)) for prompt, completion in pairs]


class WordRulesReward(BuiltinTaskReward):
    """Verifier of the built-in word-rules task (:class:`lit_align.data.WordRulesTask`); graded:
    the fraction of the correct answer's characters matched position by position."""

    task = WordRulesTask


class ArithmeticReward(BuiltinTaskReward):
    """Verifier of the built-in arithmetic task (:class:`lit_align.data.ArithmeticTask`); graded:
    the fraction of the worked solution's lines right before the first wrong one (1.0 when the
    final answer is right); exact (``graded: false``): the final answer, as ``ExactAnswerReward``
    checks it against the reference."""

    task = ArithmeticTask


class FunctionReward(RewardFunction):
    """A plain function as a reward: ``function(prompts, completions)`` (or ``function(prompts,
    completions, answers)`` with ``needs_answers``) returning one number per completion, e.g.
    ``reward: {class_path: lit_align.rewards.FunctionReward, init_args: {function: my_rewards.brevity}}``.

    Args:
        function: the function, by import path (``my_rewards.brevity``).
        needs_answers: call it with each prompt's reference answer too (the prompt data must give one).
    """

    def __init__(self, function: Callable[..., Any], needs_answers: bool = False):
        if not callable(function):
            raise SettingError("FunctionReward", "function", f"must be a function, got {function!r}")
        self.function, self.needs_answers = function, needs_answers

    def score(self, prompts: Sequence, completions: Sequence[str], answers: Sequence | None = None) -> Any:
        return self.function(prompts, completions) if answers is None else self.function(prompts, completions, answers)


def short_name(reward: Any) -> str:
    """A reward's name in the logs: its class's (the function's, for :class:`FunctionReward`)."""
    if isinstance(reward, FunctionReward):
        return getattr(reward.function, "__name__", "function")
    return type(reward).__name__


def reward_name(reward: Any) -> str:
    """``module.Class`` of a reward (the function's path for :class:`FunctionReward`), as a user named it."""
    named = reward.function if isinstance(reward, FunctionReward) else type(reward)
    return f"{getattr(named, '__module__', '?')}.{getattr(named, '__qualname__', named)}"


def require_answers(reward: Any, answers: Sequence, records: Sequence, source: str, rows: str = "records") -> None:
    """Before any completion is scored: when ``reward`` checks completions against reference
    answers (``needs_answers``), a :class:`DataError` naming the first of ``records`` whose answer
    is None."""
    if not getattr(reward, "needs_answers", False):
        return
    missing = [record for answer, record in zip(answers, records, strict=True) if answer is None]
    if missing:
        raise DataError(
            source,
            f"has no reference answer, which {short_name(reward)} checks completions against ({len(missing)} of "
            f"{len(answers)} {rows} have none): give each record an 'answer' (or 'solution') field, or map yours "
            "with data.init_args.columns {answer: <field>}",
            missing[0],
            "answer",
        )


def check_reward(reward: Any, owner: str, setting: str) -> None:
    """Refuse, when the method is built, a ``reward`` that cannot score: not callable, or a
    :class:`RewardFunction` subclass that does not implement ``score``."""
    if reward is None:
        return
    if not callable(reward):
        raise SettingError(owner, setting, f"must be a RewardFunction, got {reward!r}")
    if isinstance(reward, RewardFunction) and type(reward).score is RewardFunction.score:
        raise SettingError(
            owner,
            setting,
            f"{reward_name(reward)} does not implement score(prompts, completions), which returns one number "
            "per completion",
        )
    for index, part in enumerate(getattr(reward, "rewards", None) or []):
        check_reward(part, owner, f"{setting}.rewards[{index}]")


def as_scores(reward: Any, scores: Any, prompts: Sequence, completions: Sequence[str]) -> torch.Tensor:
    """What ``reward`` returned for ``completions`` as a float tensor ``[N]``, or a
    :class:`RewardError` that names the reward, what it returned and, for a non-finite score,
    the first prompt and completion that got one."""
    name, count = reward_name(reward), len(completions)
    try:
        values = torch.as_tensor(scores, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as error:
        sample = repr(scores)
        sample = sample if len(sample) <= 60 else sample[:56] + " ..."
        raise RewardError(
            f"reward {name} returned {sample}, which is not numbers ({error}): return one float per completion"
        ) from None
    if values.numel() != count:
        raise RewardError(
            f"reward {name} returned {values.numel()} scores for {count} completions: return one float per completion"
        )
    values = values.reshape(count)
    bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
    if bad:
        first = bad[0]
        value = float(values[first])
        raise RewardError(
            f"reward {name} returned {'nan' if math.isnan(value) else value} for {len(bad)} of {count} completions, "
            f"first for the completion {completions[first]!r:.60} of the prompt {prompts[first]!r:.80}: return a "
            "finite number for every completion (e.g. 0.0 where none applies)"
        )
    return values


class WeightedRewards(RewardFunction):
    """Several rewards in one: score = sum_k weight_k * reward_k(prompt, completion) (e.g. a
    verifier of the answer plus a smaller format reward). The method logs each part under
    ``objective/rewards/<name>`` beside the weighted total (``objective/scores``).

    Args:
        rewards: the rewards (each a ``class_path`` entry in YAML).
        weights: one weight per reward (default: 1 each).
        names: one name per reward in the logs (default: the class names, a plain function's own
            name, numbered when repeated).

    In YAML::

        reward:
          class_path: lit_align.rewards.WeightedRewards
          init_args:
            rewards: [{class_path: lit_align.rewards.WordRulesReward}, {class_path: my_rewards.Brevity}]
            weights: [1.0, 0.1]
    """

    def __init__(
        self, rewards: list[RewardFunction], weights: list[float] | None = None, names: list[str] | None = None
    ):
        weights = [1.0] * len(rewards) if weights is None else list(weights)
        if not rewards or len(weights) != len(rewards) or (names is not None and len(names) != len(rewards)):
            raise SettingError(
                "WeightedRewards",
                "weights",
                f"needs one weight (and name, if given) per reward: {len(rewards)} rewards, {len(weights)} weights"
                + (f", {len(names)} names" if names is not None else ""),
            )
        if names is None:
            classes = [short_name(reward) for reward in rewards]
            names = [c if classes.count(c) == 1 else f"{c}_{classes[:i].count(c)}" for i, c in enumerate(classes)]
        self.rewards, self.weights, self.names = list(rewards), weights, list(names)
        self.parts: dict[str, torch.Tensor] = {}
        """Each reward's scores of the last call, by name."""

    def attach(self, module: LightningModule) -> None:
        for reward in self.rewards:
            if hasattr(reward, "attach"):
                reward.attach(module)

    @property
    def needs_answers(self) -> bool:
        return any(getattr(reward, "needs_answers", False) for reward in self.rewards)

    def score(self, prompts: Sequence, completions: Sequence[str], answers: Sequence | None = None) -> torch.Tensor:
        self.parts = {
            name: score_completions(reward, prompts, completions, answers)
            for name, reward in zip(self.names, self.rewards, strict=True)
        }
        return sum(weight * part for weight, part in zip(self.weights, self.parts.values(), strict=True))

    def to(self, device: torch.device | str) -> "WeightedRewards":
        self.rewards = [reward.to(device) if hasattr(reward, "to") else reward for reward in self.rewards]
        return self


def score_completions(reward, prompts: Sequence, completions: Sequence[str], answers: Sequence | None) -> torch.Tensor:
    """``reward``'s scores, given the reference answers when it takes them (``needs_answers``)."""
    if getattr(reward, "needs_answers", False):
        scores = reward(prompts, completions, answers)
    else:
        scores = reward(prompts, completions)
    if isinstance(reward, RewardFunction):  # its __call__ checked them already
        return scores
    return as_scores(reward, scores, prompts, completions)


def reward_parts(reward) -> dict[str, torch.Tensor]:
    """The named parts of a reward's last scores (:class:`WeightedRewards`), else none."""
    return dict(getattr(reward, "parts", None) or {})
