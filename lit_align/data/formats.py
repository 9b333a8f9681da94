"""Normalising raw records into typed preference pairs.

Three record shapes are understood (``format="auto"`` picks per record):

* ``explicit``: ``{"prompt": str, "chosen": str, "rejected": str}``.
* ``conversational``: ``{"prompt": [messages], "chosen": [assistant message] | str, "rejected": ...}``,
  or, with no prompt, ``chosen``/``rejected`` as whole conversations whose shared leading messages
  are the prompt. Rendered later with the tokenizer's chat template.
* ``implicit``: ``{"chosen": str, "rejected": str}`` whole transcripts (Anthropic HH style); the
  prompt is their shared prefix up to and including the last assistant marker in it
  (``"\\n\\nAssistant:"`` by default), the responses are the rest.

Optional numeric ``score_chosen``/``score_rejected`` fields (e.g. reward-model or rater scores)
are kept for objectives that use them (ODPO's offset); an optional numeric ``margin`` (how
strongly chosen is preferred, e.g. from a rating gap) is kept for the reward model's margin.

A column mapping renames fields first, e.g. ``{"prompt": "question", "chosen": "good"}``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, Union

from lit_align.data.errors import DataError, DroppableRecord

Message = dict[str, str]
FormatName = Literal["auto", "explicit", "conversational", "implicit"]
KNOWN_ROLES = ("system", "user", "assistant", "tool")
PAIR_FIELDS = ("prompt", "chosen", "rejected", "score_chosen", "score_rejected", "margin")
"""The fields a paired record can have (the names ``columns`` maps from)."""
FLOAT32_MAX = 3.4028234663852886e38


@dataclass(frozen=True)
class PreferencePair:
    """One preference: ``prompt`` is text or a list of chat messages; responses are text."""

    prompt: Union[str, tuple[Message, ...]]
    chosen: str
    rejected: str
    score_chosen: float | None = None
    score_rejected: float | None = None
    margin: float | None = None

    @property
    def is_conversational(self) -> bool:
        return not isinstance(self.prompt, str)


def normalise_record(
    record: Mapping[str, Any],
    source: str,
    index: int,
    format: FormatName = "auto",
    columns: Mapping[str, str] | None = None,
    assistant_marker: str = "\n\nAssistant:",
) -> PreferencePair:
    """Turn one raw record into a :class:`PreferencePair`, or raise :class:`DataError` saying where."""
    fields = {
        name: read_field(record, (columns or {}).get(name, name), source, index, required=name != "prompt")
        for name in ("prompt", "chosen", "rejected")
    }
    prompt, chosen, rejected = fields["prompt"], fields["chosen"], fields["rejected"]
    shape = format if format != "auto" else _detect(prompt, chosen, rejected)
    if shape == "explicit":
        pair = PreferencePair(
            read_text(prompt, "prompt", source, index, allow_empty=True),
            read_text(chosen, "chosen", source, index),
            read_text(rejected, "rejected", source, index),
        )
    elif shape == "implicit":
        pair = _split_implicit(
            read_text(chosen, "chosen", source, index),
            read_text(rejected, "rejected", source, index),
            assistant_marker,
            source,
            index,
        )
    elif shape == "conversational":
        pair = _conversational(prompt, chosen, rejected, source, index)
    else:
        raise DataError(source, f"unknown format '{format}'; use one of auto, explicit, conversational, implicit")
    if pair.chosen == pair.rejected:
        raise DroppableRecord(source, "chosen and rejected responses are identical", index, "rejected")
    scores = {
        name: read_number(record.get((columns or {}).get(name, name)), name, source, index)
        for name in ("score_chosen", "score_rejected", "margin")
    }
    return replace(pair, **scores)


def read_number(value: Any, field: str, source: str, index: int) -> float | None:
    """A finite score, or None when the field is absent or null."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(source, f"expected a finite number, got {value!r}", index, field)
    if abs(value) > FLOAT32_MAX:  # batches hold scores as float32: it would become inf there
        raise DataError(
            source, f"{value!r} is too large: scores must fit float32 (|x| <= 3.4e38); rescale them", index, field
        )
    return float(value)


def read_field(record: Mapping[str, Any], key: str, source: str, index: int, required: bool) -> Any:
    if key not in record:
        if required:
            raise DataError(source, f"missing (record has fields: {', '.join(map(str, record)) or 'none'})", index, key)
        return None
    return record[key]


def _detect(prompt: Any, chosen: Any, rejected: Any) -> str:
    if any(isinstance(value, list) for value in (prompt, chosen, rejected)):
        return "conversational"
    if prompt is None:
        return "implicit"
    return "explicit"


def read_text(value: Any, field: str, source: str, index: int, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise DataError(source, f"expected a string, got {type(value).__name__}", index, field)
    if not allow_empty and not value.strip():
        raise DroppableRecord(source, "is empty", index, field)
    return value


def read_messages(value: Any, field: str, source: str, index: int) -> tuple[Message, ...]:
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise DataError(source, f"expected a list of chat messages, got {type(value).__name__}", index, field)
    messages = []
    for position, message in enumerate(value):
        where = f"{field}[{position}]"
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise DataError(source, "expected a message {'role': ..., 'content': ...}", index, where)
        if message["role"] not in KNOWN_ROLES:
            raise DataError(
                source, f"unknown chat role '{message['role']}' (known: {', '.join(KNOWN_ROLES)})", index, where
            )
        if not isinstance(message["content"], str):
            raise DataError(
                source, f"message content must be a string, got {type(message['content']).__name__}", index, where
            )
        messages.append({"role": message["role"], "content": message["content"]})
    return tuple(messages)


def read_reply(messages: tuple[Message, ...], field: str, source: str, index: int) -> str:
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise DataError(source, "expected exactly one assistant message as the response", index, field)
    return read_text(messages[0]["content"], field, source, index)


def _conversational(prompt: Any, chosen: Any, rejected: Any, source: str, index: int) -> PreferencePair:
    # the responses are read first: a malformed response is reported as itself, not as a prompt
    # that does not fit it
    chosen_msgs = (
        read_messages(chosen, "chosen", source, index)
        if isinstance(chosen, list)
        else ({"role": "assistant", "content": read_text(chosen, "chosen", source, index)},)
    )
    rejected_msgs = (
        read_messages(rejected, "rejected", source, index)
        if isinstance(rejected, list)
        else ({"role": "assistant", "content": read_text(rejected, "rejected", source, index)},)
    )
    if prompt is None:  # whole conversations: the shared leading messages are the prompt
        shared = 0
        while shared < min(len(chosen_msgs), len(rejected_msgs)) - 1 and chosen_msgs[shared] == rejected_msgs[shared]:
            shared += 1
        prompt_msgs = chosen_msgs[:shared]
        chosen_msgs, rejected_msgs = chosen_msgs[shared:], rejected_msgs[shared:]
        if not prompt_msgs:
            raise DataError(
                source,
                "chosen and rejected conversations share no leading messages, so there is no prompt to split off "
                "(a record without 'prompt' is read as whole conversations)",
                index,
                "chosen",
            )
    else:
        prompt_msgs = read_messages(prompt, "prompt", source, index)
    if not prompt_msgs:
        raise DataError(source, "conversation has no prompt messages", index, "prompt")
    return PreferencePair(
        prompt_msgs,
        read_reply(chosen_msgs, "chosen", source, index),
        read_reply(rejected_msgs, "rejected", source, index),
    )


def _split_implicit(chosen: str, rejected: str, marker: str, source: str, index: int) -> PreferencePair:
    shared = 0
    limit = min(len(chosen), len(rejected))
    while shared < limit and chosen[shared] == rejected[shared]:
        shared += 1
    cut = chosen.rfind(marker, 0, shared)
    if cut < 0:
        raise DataError(
            source,
            "implicit-prompt pair (a record without 'prompt' is read as whole transcripts): the shared prefix of "
            f"chosen and rejected contains no assistant marker {marker!r}",
            index,
            "chosen",
        )
    cut += len(marker)
    return PreferencePair(
        chosen[:cut],
        read_text(chosen[cut:], "chosen", source, index),
        read_text(rejected[cut:], "rejected", source, index),
    )


def read_prompt(value: Any, field: str, source: str, index: int) -> Union[str, tuple[Message, ...]]:
    """A text prompt (may be empty) or a non-empty list of chat messages."""
    if isinstance(value, list):
        prompt = read_messages(value, field, source, index)
        if not prompt:
            raise DataError(source, "conversation has no prompt messages", index, field)
        return prompt
    return read_text(value, field, source, index, allow_empty=True)


def read_response(value: Any, field: str, source: str, index: int) -> str:
    """A response: text, or a list holding exactly one assistant message."""
    if isinstance(value, list):
        return read_reply(read_messages(value, field, source, index), field, source, index)
    return read_text(value, field, source, index)
