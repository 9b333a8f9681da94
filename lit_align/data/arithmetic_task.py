"""The built-in reasoning task: multi-step arithmetic with worked solutions, generated from a seed.

A prompt asks for a chain of additions and subtractions of small numbers; the answer is reached
one step at a time, and the final line gives it::

    Compute 7+5-3            (prompt, then a newline)
    7+5=12                   (worked solution: one line per operation,
    12-3=9                    each starting from the previous result)
    Answer: 9

Every intermediate result is non-negative. The task is verifiable exactly (the final
``Answer:`` line against the reference ``answer`` each record carries), so the same records serve
every family of methods:

* SFT trains on the worked solutions (``chosen``).
* On-policy methods (GRPO and its refinements, REINFORCE++, PPO) read the prompts and reference
  answers; :class:`lit_align.online.verifiable.ExactAnswerReward` (or ``MathVerifyReward``) checks
  the completions.
* Preference methods (DPO and its variants) get ``chosen`` = the correct solution and ``rejected``
  = the same solution with one slip (a step's result off by 1 or 2, carried through the rest, so
  the final answer is wrong): correct versus incorrect reasoning, not format.
* Listwise methods get the correct solution and slips at each step, ranked by how many steps come
  before the slip (:meth:`ArithmeticTask.score`).

Held-out prompts (``val``) are chains never seen in training; each single step in them is an
addition or subtraction of the kind training shows, so a model that learnt to carry a result from
line to line answers them, and one that memorised training prompts does not.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Annotated, Literal

from lit_align.data.tasks import BuiltinTask
from lit_align.errors import SettingError
from lit_align.settings import Count, Range, Seed, check_fields

PROMPT = "Compute {expression}\n"
ANSWER_MARKER = "Answer:"
_PROMPT_PATTERN = re.compile(r"Compute (\d+(?:[+-]\d+)+)\n")
_TERM = re.compile(r"([+-])(\d+)")


@dataclass
class ArithmeticTask(BuiltinTask):
    """Settings of the built-in reasoning task (select it with ``task: {kind: arithmetic}``).

    Attributes:
        kind: ``arithmetic``, this task.
        num_train: number of training records.
        num_val: number of held-out records (prompts unseen in training).
        seed: seed of the generator; the same seed gives the same records.
        steps: operations per prompt (the worked solution has this many lines before the answer).
        max_operand: largest number in a prompt (numbers are drawn from 1 to this).
    """

    kind: Literal["arithmetic"] = "arithmetic"
    num_train: Count = 2000
    num_val: Count = 200
    seed: Seed = 0
    steps: Annotated[int, Range(1, 8)] = 2
    max_operand: Annotated[int, Range(2, 99)] = 9

    _more_prompts_hint = "raise steps or max_operand"

    def __post_init__(self) -> None:
        check_fields(self)

    def _pair(self, rng: random.Random) -> dict:
        value = rng.randint(1, self.max_operand)
        expression = str(value)
        for _ in range(self.steps):
            if value >= 1 and rng.random() < 0.5:
                operand = rng.randint(1, min(value, self.max_operand))
                expression += f"-{operand}"
                value -= operand
            else:
                operand = rng.randint(1, self.max_operand)
                expression += f"+{operand}"
                value += operand
        prompt = PROMPT.format(expression=expression)
        slip_step = rng.randrange(self.steps)
        slip = rng.choice([offset for offset in (-2, -1, 1, 2) if offset >= -_results(expression)[slip_step]])
        rejected = worked_solution(expression, slip_step, slip)
        return {
            "prompt": prompt,
            "chosen": worked_solution(expression),
            "rejected": rejected,
            "answer": str(value),
            "score_chosen": 1.0,
            "score_rejected": self.score(prompt, rejected),
        }

    def ranked(self, name: str, list_size: int = 4) -> list[dict]:
        """Records ``{prompt, responses, scores}`` of a split: the correct solution, then
        solutions with a slip at the last step, the one before, ... (scores falling with the
        number of correct steps, :meth:`score`), up to ``list_size`` responses (at most
        ``steps + 1``)."""
        if list_size < 2:
            raise SettingError("ArithmeticTask.ranked", "list_size", f"must be >= 2, got {list_size}")
        records = []
        for pair in self.split(name):
            expression = parse_prompt(pair["prompt"])
            responses = [pair["chosen"]]
            for step in reversed(range(self.steps)):
                if len(responses) == list_size:
                    break
                responses.append(worked_solution(expression, step, 1))
            records.append(self._ranked_record(pair["prompt"], responses))
        return records

    @staticmethod
    def score(prompt: str, response: str) -> float:
        """Graded verifier: 1.0 when the final answer is correct (:meth:`is_correct`); otherwise
        the fraction of the worked solution's lines (steps and the answer line) that the response
        gets right before its first wrong line."""
        if ArithmeticTask.is_correct(prompt, response):
            return 1.0
        reference = worked_solution(parse_prompt(prompt)).split("\n")
        given = response.strip().split("\n")
        right = 0
        for expected, line in zip(reference, given, strict=False):
            if line.strip() != expected:
                break
            right += 1
        return right / len(reference)

    @staticmethod
    def is_correct(prompt: str, response: str) -> bool:
        """Verifier: is the response's final answer (its last ``Answer:`` line) the prompt's value?"""
        return final_answer_of(response) == str(_results(parse_prompt(prompt))[-1])


def parse_prompt(prompt: str) -> str:
    """The expression of a prompt of the arithmetic task (``"Compute 7+5-3\\n"`` -> ``"7+5-3"``)."""
    match = _PROMPT_PATTERN.fullmatch(prompt)
    if match is None:
        raise ValueError(f"not a prompt of the arithmetic task: {prompt!r}")
    return match.group(1)


def _results(expression: str) -> list[int]:
    """The result after each operation of ``expression``, left to right."""
    value = int(re.match(r"\d+", expression).group())
    results = []
    for sign, number in _TERM.findall(expression):
        value = value + int(number) if sign == "+" else value - int(number)
        results.append(value)
    return results


def worked_solution(expression: str, slip_step: int | None = None, slip: int = 0) -> str:
    """The worked solution of ``expression``: one ``a+b=c`` line per operation, each starting
    from the previous line's result, then ``Answer: <result>``. With ``slip_step``, that step's
    result is off by ``slip`` and the rest is computed correctly from the wrong value (a plausible
    incorrect solution)."""
    value = int(re.match(r"\d+", expression).group())
    lines = []
    for step, (sign, number) in enumerate(_TERM.findall(expression)):
        result = value + int(number) if sign == "+" else value - int(number)
        if step == slip_step:
            result += slip
        lines.append(f"{value}{sign}{number}={result}")
        value = result
    return "\n".join([*lines, f"{ANSWER_MARKER} {value}"])


def final_answer_of(response: str, marker: str = ANSWER_MARKER) -> str | None:
    """What follows the last ``marker`` in ``response`` up to the end of its line (stripped), or None."""
    head, found, tail = response.rpartition(marker)
    if not found:
        return None
    return tail.split("\n", 1)[0].strip()
