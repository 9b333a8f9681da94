"""The built-in verifiable preference task: rule-following on random words, generated from a seed.

Each prompt asks for one deterministic transformation of a random word; ``chosen`` is the
correct answer and ``rejected`` a wrong one, so every pair is verifiable by
:meth:`WordRulesTask.is_correct`. Words are random letter strings, so held-out prompts (another
seed stream) are new words: held-out accuracy measures whether the rule was learnt, not memorised.

Rules (``rules`` picks the mix):
* ``upper``: "Write in capitals: cabd" -> "CABD" (wrong: "cabd", the word unchanged).
* ``lower``: "Write in lowercase: CABD" -> "cabd" (wrong: "CABD", the word unchanged).
* ``reverse``: "Reverse: cabd" -> "dbac" (wrong: "cabd", the word copied unchanged).
* ``first``: "First letter of cabd:" -> "c" (wrong: a letter that is not in the word).

The default mix (``upper`` and ``lower``) is learnable by a randomly initialised 2-layer model in
a few hundred steps: the model has to read the instruction to know which case is right.
``reverse`` and ``first`` need copying from the prompt and take a larger model or longer runs.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Annotated, Literal

from lit_align.errors import SettingError
from lit_align.settings import Count, Range, Seed, check_fields

PROMPTS = {
    "upper": "Write in capitals: {word}\n",
    "lower": "Write in lowercase: {word}\n",
    "reverse": "Reverse: {word}\n",
    "first": "First letter of {word}:\n",
}
RULES = tuple(PROMPTS)


class BuiltinTask:
    """A built-in verifiable task generated from a seed: records of a ``train`` and a ``val`` split.

    Subclasses are dataclasses with ``num_train``, ``num_val`` and ``seed`` fields and a
    ``kind`` literal (what picks one in YAML: ``task: {kind: arithmetic}``); they implement
    :meth:`_pair` (one record from a random stream), :meth:`ranked`, :meth:`score` and
    :meth:`is_correct`.
    """

    num_train: int
    num_val: int
    seed: int

    def split(self, name: str) -> list[dict]:
        """Records ``{"prompt", "chosen", "rejected", ...}`` of split ``train`` or ``val``.

        No ``val`` prompt occurs in ``train``: held-out prompts are drawn again until unseen.
        """
        count = {"train": self.num_train, "val": self.num_val}[name]
        rng = random.Random(f"{self.seed}:{name}")
        if name == "train":
            return [self._pair(rng) for _ in range(count)]
        seen = {record["prompt"] for record in self.split("train")}
        records = []
        for _ in range(100 * count + 100):
            if len(records) == count:
                break
            record = self._pair(rng)
            if record["prompt"] not in seen:
                records.append(record)
        if len(records) < count:
            raise SettingError(
                type(self).__name__,
                "num_val",
                f"is more than the unseen prompts left for the held-out split; {self._more_prompts_hint} or lower "
                "num_val",
            )
        return records

    _more_prompts_hint = "widen the task"

    def _pair(self, rng: random.Random) -> dict:
        raise NotImplementedError

    def ranked(self, name: str, list_size: int = 4) -> list[dict]:
        """Records ``{prompt, responses, scores}`` of a split (listwise methods)."""
        raise NotImplementedError

    def _ranked_record(self, prompt: str, responses: list[str]) -> dict:
        """A listwise record: ``responses`` of ``prompt``, each scored by the task's verifier."""
        return {"prompt": prompt, "responses": responses, "scores": [self.score(prompt, r) for r in responses]}


@dataclass
class WordRulesTask(BuiltinTask):
    """Settings of the built-in task.

    Attributes:
        num_train: number of training pairs.
        num_val: number of held-out pairs (generated from a different seed stream).
        seed: seed of the generator; the same seed gives the same pairs.
        min_word_length: shortest random word.
        max_word_length: longest random word.
        rules: which rules to mix (any of "upper", "lower", "reverse", "first").
        kind: ``word_rules``, this task (the default built-in task).
    """

    kind: Literal["word_rules"] = "word_rules"
    num_train: Count = 2000
    num_val: Count = 200
    seed: Seed = 0
    min_word_length: Annotated[int, Range(2)] = 3
    max_word_length: Annotated[int, Range(2)] = 6
    rules: tuple[str, ...] = ("upper", "lower")

    def __post_init__(self) -> None:
        self.rules = tuple(self.rules)
        unknown = set(self.rules) - set(RULES)
        if unknown or not self.rules:
            raise SettingError(
                "WordRulesTask", "rules", f"has unknown rule(s) {sorted(unknown)}; choose from {', '.join(RULES)}"
            )
        check_fields(self)
        if self.min_word_length > self.max_word_length:
            raise SettingError(
                "WordRulesTask",
                "min_word_length",
                f"must be <= max_word_length={self.max_word_length}, got {self.min_word_length}",
            )

    _more_prompts_hint = "raise max_word_length"

    def _pair(self, rng: random.Random) -> dict[str, str]:
        rule = rng.choice(self.rules)
        length = rng.randint(self.min_word_length, self.max_word_length)
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(length))
        while rule == "reverse" and word == word[::-1]:
            word = "".join(rng.choice(string.ascii_lowercase) for _ in range(length))
        if rule == "lower":
            word = word.upper()
        prompt, answer = prompt_and_answer(rule, word)
        if rule == "first":
            wrong = rng.choice([letter for letter in string.ascii_lowercase if letter not in word])
        else:
            wrong = word
        return {
            "prompt": prompt,
            "chosen": answer,
            "rejected": wrong,
            "score_chosen": 1.0,
            "score_rejected": self.score(prompt, wrong),
        }

    def ranked(self, name: str, list_size: int = 4) -> list[dict]:
        """Records ``{prompt, responses, scores}`` of a split: the correct answer, the word
        unchanged and partly-correct answers (some letters transformed), each scored by
        :meth:`score`, the fraction of positions that match the correct answer. Lists hold up to
        ``list_size`` distinct responses (fewer when a short word has fewer distinct variants)."""
        if list_size < 2:
            raise ValueError(f"WordRulesTask.ranked: list_size must be >= 2, got {list_size}")
        rng = random.Random(f"{self.seed}:{name}:ranked")
        records = []
        for pair in self.split(name):
            rule, word = parse_prompt(pair["prompt"])
            answer = prompt_and_answer(rule, word)[1]
            responses = [answer, pair["rejected"]]
            for _ in range(20 * list_size):
                if len(responses) == list_size or len(answer) < 2:
                    break
                keep = rng.sample(range(len(answer)), rng.randint(1, len(answer) - 1))
                candidate = (
                    "".join(answer[i] if i in keep else pair["rejected"][i] for i in range(len(answer)))
                    if len(pair["rejected"]) == len(answer)
                    else answer[: len(keep)]
                )
                if candidate not in responses:
                    responses.append(candidate)
            records.append(self._ranked_record(pair["prompt"], responses))
        return records

    @staticmethod
    def score(prompt: str, response: str) -> float:
        """Graded verifier: fraction of the correct answer's positions that ``response`` matches
        (1.0 exactly when :meth:`is_correct`)."""
        answer = prompt_and_answer(*parse_prompt(prompt))[1]
        response = response.strip()
        if response == answer:
            return 1.0
        matches = sum(a == b for a, b in zip(answer, response, strict=False))
        return matches / max(len(answer), len(response))

    @staticmethod
    def is_correct(prompt: str, response: str) -> bool:
        """Verifier: does ``response`` follow the rule asked for in ``prompt``?"""
        return response.strip() == prompt_and_answer(*parse_prompt(prompt))[1]


def parse_prompt(prompt: str) -> tuple[str, str]:
    """(rule, word) of a prompt of the built-in task."""
    for rule, template in PROMPTS.items():
        head, tail = template.split("{word}")
        if prompt.startswith(head) and prompt.endswith(tail):
            return rule, prompt[len(head) : len(prompt) - len(tail)]
    raise ValueError(f"not a prompt of the built-in task: {prompt!r}")


def prompt_and_answer(rule: str, word: str) -> tuple[str, str]:
    """The prompt asking for ``rule`` applied to ``word``, and the correct answer."""
    answer = {"upper": word.upper(), "lower": word.lower(), "reverse": word[::-1], "first": word[0]}[rule]
    return PROMPTS[rule].format(word=word), answer
