"""Verifiable rewards: a completion's final answer checked against the prompt's reference answer
(``math-verify``), and a format reward for reasoning traces.

``math-verify`` (Hugging Face, PyPI ``math-verify``; ``pip install lit-align[verify]``) extracts
the final answer of a completion (the last ``\\boxed{...}``, else the last expression) and checks
mathematical equivalence with the reference (``1/2`` equals ``0.5`` and ``\\frac{1}{2}``); it is
what the DeepSeek-R1 replications and TRL's accuracy reward use. It is imported when the reward is
built, so lit-align itself does not need it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Optional

from lit_align.data.arithmetic_task import ANSWER_MARKER, final_answer_of
from lit_align.errors import SettingError
from lit_align.online.rewards import RewardFunction


def tagged(text: str, tag: str) -> str | None:
    """The content of the last ``<tag>...</tag>`` in ``text``, or None."""
    found = re.findall(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", text, flags=re.DOTALL)
    return found[-1].strip() if found else None


class MathVerifyReward(RewardFunction):
    """1.0 when the completion's final answer equals the reference answer, else 0.0.

    Args:
        answer_tag: read the answer inside ``<answer_tag>...</answer_tag>`` (e.g. ``answer``; a
            completion without the tag scores 0); unset: the whole completion, whose last
            ``\\boxed{}`` or last expression is its answer.

    The prompt data gives the reference answers (``answer`` or ``solution`` fields; GSM8K's
    ``#### N`` line: :class:`lit_align.data.PromptDataModule`).
    """

    needs_answers = True

    def __init__(self, answer_tag: Optional[str] = None):
        try:
            import math_verify
        except ImportError as error:
            raise SettingError(
                "MathVerifyReward",
                None,
                "needs the math-verify package: pip install 'lit-align[verify]' (or pip install math-verify)",
            ) from error
        self._math_verify = math_verify
        self.answer_tag = answer_tag

    def score(self, prompts: Sequence, completions: Sequence[str], answers: Sequence[str]) -> list[float]:
        parse, verify = self._math_verify.parse, self._math_verify.verify
        scores = []
        for completion, answer in zip(completions, answers, strict=True):
            given = tagged(completion, self.answer_tag) if self.answer_tag else completion
            if not given:
                scores.append(0.0)
                continue
            gold = parse(answer if ("$" in answer or "\\boxed" in answer) else f"${answer}$")
            guess = parse(given if not self.answer_tag or "$" in given or "\\boxed" in given else f"${given}$")
            scores.append(float(bool(gold) and bool(guess) and verify(gold, guess)))
        return scores


class ExactAnswerReward(RewardFunction):
    """1.0 when the completion's final answer, the text after its last ``marker`` up to the end of
    that line, equals the reference answer exactly, else 0.0; no answer scores 0.0. Only what
    surrounds the answer is forgiven: whitespace, Markdown bold (``**Answer:** 9``) and a final
    full stop (``Answer: 9.``).
    The verifier of the built-in arithmetic task (:class:`lit_align.data.ArithmeticTask`, whose
    solutions end in ``Answer: 9``) and of any data whose answers are exact strings (GSM8K's
    integers); ``MathVerifyReward`` is the tolerant choice for written mathematics.

    Args:
        marker: the text that introduces the final answer.
    """

    needs_answers = True

    def __init__(self, marker: str = ANSWER_MARKER):
        if not marker.strip():
            raise SettingError("ExactAnswerReward", "marker", f"must be non-blank text, got {marker!r}")
        self.marker = marker

    def score(self, prompts: Sequence, completions: Sequence[str], answers: Sequence[str]) -> list[float]:
        return [
            float(_bare(final_answer_of(completion, self.marker)) == _bare(str(answer)))
            for completion, answer in zip(completions, answers, strict=True)
        ]


def _bare(answer: str | None) -> str | None:
    """An answer without the whitespace, Markdown bold and final full stop around it."""
    return None if answer is None else answer.strip().strip("*").strip().removesuffix(".").strip()


class ThinkFormatReward(RewardFunction):
    """1.0 when the completion is a reasoning block then an answer (DeepSeek-R1's format reward,
    Guo et al. 2025): ``<think>...</think>`` with something after it; with ``answer_tag``, what
    follows must be ``<answer>...</answer>``. 0.0 otherwise.

    Args:
        think_tag: the reasoning block's tag.
        answer_tag: the answer's tag after the block (unset: any text).
    """

    def __init__(self, think_tag: str = "think", answer_tag: Optional[str] = None):
        after = rf"<{re.escape(answer_tag)}>.+?</{re.escape(answer_tag)}>" if answer_tag else r"\S.*"
        self.pattern = re.compile(rf"^<{re.escape(think_tag)}>.+?</{re.escape(think_tag)}>\s*{after}$", re.DOTALL)

    def score(self, prompts: Sequence, completions: Sequence[str]) -> list[float]:
        return [float(bool(self.pattern.match(completion.strip()))) for completion in completions]
