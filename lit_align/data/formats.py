"""Normalising raw records into typed preference pairs.

Three record shapes are understood (``format="auto"`` picks per record):

* ``explicit``: ``{"prompt": str, "chosen": str, "rejected": str}``.
* ``conversational``: chat messages anywhere in the record. The prompt is a list of messages, or
  the leading messages that ``chosen`` and ``rejected`` share when they are whole conversations
  (with no prompt, or a text prompt: UltraFeedback-binarized's shape, where the text prompt is the
  user turn those conversations start with), or a text prompt made the user turn when the
  responses are messages alone. A response is text, one assistant message, or several messages
  (an assistant turn calling tools, the ``tool`` results, the final answer). Rendered later with
  the tokenizer's chat template.
* ``implicit``: ``{"chosen": str, "rejected": str}`` whole transcripts (Anthropic HH style); the
  prompt is their shared prefix up to and including the last assistant marker in it
  (``"\\n\\nAssistant:"`` by default), the responses are the rest.
* ``transcript``: the same whole transcripts read as chat turns (never picked by ``auto``): split
  at the user marker (``"\\n\\nHuman:"``) and the assistant marker, each turn's text stripped, then
  read as ``conversational`` (the shared turns are the prompt), so the tokenizer's chat template
  renders them. For an instruct model, whose template the HH text markers are not.

Messages are kept as they are for the chat template: besides ``role`` and ``content`` any field
(``tool_calls``, a ``tool`` message's ``name`` / ``tool_call_id``, ``reasoning_content``,
``thinking``) passes through, and content may be a list of text parts
(``[{"type": "text", "text": ...}]``). Only text can be tokenized: another part (an image) is an
error naming the record and field.

An optional ``system`` text (Intel/orca_dpo_pairs' shape: ``system``, ``question``, ``chosen``,
``rejected``) becomes the system message of a chat prompt; a text prompt beside it becomes the
user turn.

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

Message = dict[str, Any]
"""A chat message as the record has it: ``role``, ``content`` and any other field the template reads."""
Response = Union[str, tuple[Message, ...]]
"""A response: text (one plain assistant turn), or messages (an assistant turn with more than text,
or several turns: tool calls, their results, the answer)."""
FormatName = Literal["auto", "explicit", "conversational", "implicit", "transcript"]
KNOWN_ROLES = ("system", "developer", "user", "assistant", "tool", "ipython")
RESPONSE_ROLES = ("assistant", "tool", "ipython")
"""Roles a response's messages may have (the model's turns and the results of its tool calls)."""
PAIR_FIELDS = ("prompt", "chosen", "rejected", "score_chosen", "score_rejected", "margin", "system")
"""The fields a paired record can have (the names ``columns`` maps from)."""
FLOAT32_MAX = 3.4028234663852886e38


@dataclass(frozen=True)
class PreferencePair:
    """One preference: ``prompt`` is text or a list of chat messages; each response is text or
    messages (:data:`Response`, messages only with a chat prompt)."""

    prompt: Union[str, tuple[Message, ...]]
    chosen: Response
    rejected: Response
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
    user_marker: str = "\n\nHuman:",
) -> PreferencePair:
    """Turn one raw record into a :class:`PreferencePair`, or raise :class:`DataError` saying where."""
    fields = {
        name: read_field(record, (columns or {}).get(name, name), source, index, required=name != "prompt")
        for name in ("prompt", "chosen", "rejected")
    }
    prompt, chosen, rejected = fields["prompt"], fields["chosen"], fields["rejected"]
    shape = format if format != "auto" else _detect(prompt, chosen, rejected)
    if shape in ("implicit", "transcript") and record.get((columns or {}).get("system", "system")) is not None:
        raise DataError(
            source,
            "a system field needs a prompt field: whole transcripts (the implicit format) have no turn to put it "
            "before",
            index,
            "system",
        )
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
    elif shape == "transcript":
        if prompt is not None:
            raise DataError(
                source,
                "format 'transcript' reads whole transcripts in chosen and rejected; this record also has a "
                "prompt (use format auto, explicit or conversational)",
                index,
                "prompt",
            )
        markers = {"user": user_marker, "assistant": assistant_marker}
        pair = _conversational(
            None,
            transcript_turns(read_text(chosen, "chosen", source, index), markers, "chosen", source, index),
            transcript_turns(read_text(rejected, "rejected", source, index), markers, "rejected", source, index),
            source,
            index,
        )
    else:
        raise DataError(
            source, f"unknown format '{format}'; use one of auto, explicit, conversational, implicit, transcript"
        )
    system = record.get((columns or {}).get("system", "system"))
    if system is not None:
        pair = replace(pair, prompt=_with_system(pair.prompt, system, source, index))
    if pair.chosen == pair.rejected:
        raise DroppableRecord(source, "chosen and rejected responses are identical", index, "rejected")
    scores = {
        name: read_number(record.get((columns or {}).get(name, name)), name, source, index)
        for name in ("score_chosen", "score_rejected", "margin")
    }
    return replace(pair, **scores)


def _with_system(prompt: Union[str, tuple[Message, ...]], system: Any, source: str, index: int):
    """The prompt as chat messages opened by the record's ``system`` text (none when it is empty)."""
    text = read_text(system, "system", source, index, allow_empty=True)
    messages = ({"role": "user", "content": prompt},) if isinstance(prompt, str) else prompt
    if any(message["role"] == "system" for message in messages):
        raise DataError(
            source, "the record has a system field and a system message in its prompt; keep one", index, "system"
        )
    return (({"role": "system", "content": text},) if text.strip() else ()) + messages


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
    """Chat messages as the record has them (every field kept), checked: a known role, and content
    that is text, a list of text parts, or null on an assistant turn that calls tools."""
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise DataError(source, f"expected a list of chat messages, got {type(value).__name__}", index, field)
    messages = []
    for position, message in enumerate(value):
        where = f"{field}[{position}]"
        if not isinstance(message, Mapping) or "role" not in message:
            raise DataError(source, "expected a message {'role': ..., 'content': ...}", index, where)
        if "content" not in message and not message.get("tool_calls"):  # a tool call may come without content
            raise DataError(source, "expected a message {'role': ..., 'content': ...}", index, where)
        if message["role"] not in KNOWN_ROLES:
            raise DataError(
                source, f"unknown chat role '{message['role']}' (known: {', '.join(KNOWN_ROLES)})", index, where
            )
        _check_content(message, source, index, where)
        if message.get("tool_calls") is not None and not isinstance(message["tool_calls"], list):
            raise DataError(
                source, f"tool_calls must be a list, got {type(message['tool_calls']).__name__}", index, where
            )
        messages.append(dict(message))
    return tuple(messages)


def _check_content(message: Mapping[str, Any], source: str, index: int, where: str) -> None:
    content = message.get("content")
    if isinstance(content, str) or (content is None and message.get("tool_calls")):
        return
    if not isinstance(content, list):
        raise DataError(
            source,
            f"message content must be a string or a list of text parts, got {type(content).__name__}",
            index,
            where,
        )
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
        if kind != "text" or not isinstance(part.get("text"), str):
            raise DataError(
                source,
                f"content part {k} is {kind!r}: only text parts ({{'type': 'text', 'text': ...}}) can be tokenized",
                index,
                f"{where}.content[{k}]",
            )


def message_text(message: Mapping[str, Any]) -> str:
    """The text of a message's content (its text parts joined; '' for none)."""
    content = message.get("content")
    if isinstance(content, list):
        return "".join(part["text"] for part in content)
    return content or ""


def read_reply(messages: tuple[Message, ...], field: str, source: str, index: int) -> Response:
    """A response given as messages: text when it is one plain assistant turn, else the messages
    (starting with an assistant turn; tool results may follow)."""
    if not messages:
        raise DroppableRecord(source, "is empty (no response messages)", index, field)
    if messages[0]["role"] != "assistant":
        raise DataError(
            source,
            f"a response must start with an assistant message, got role '{messages[0]['role']}'",
            index,
            f"{field}[0]",
        )
    for position, message in enumerate(messages):
        if message["role"] not in RESPONSE_ROLES:
            raise DataError(
                source,
                f"a response holds the model's turns and tool results ({', '.join(RESPONSE_ROLES)}), got role "
                f"'{message['role']}'; put earlier turns into the prompt",
                index,
                f"{field}[{position}]",
            )
    if len(messages) == 1 and set(messages[0]) == {"role", "content"} and isinstance(messages[0]["content"], str):
        return read_text(messages[0]["content"], field, source, index)
    if not any(message_text(message).strip() or message.get("tool_calls") for message in messages):
        raise DroppableRecord(source, "is empty", index, field)
    return messages


def _response_messages(value: Any, field: str, source: str, index: int) -> tuple[Message, ...]:
    if isinstance(value, list):
        return read_messages(value, field, source, index)
    return ({"role": "assistant", "content": read_text(value, field, source, index)},)


def _shared_prefix(first: tuple[Message, ...], second: tuple[Message, ...]) -> int:
    """How many leading messages the two conversations share (at least one message of each is left)."""
    shared = 0
    while shared < min(len(first), len(second)) - 1 and first[shared] == second[shared]:
        shared += 1
    return shared


def _conversational(prompt: Any, chosen: Any, rejected: Any, source: str, index: int) -> PreferencePair:
    # the responses are read first: a malformed response is reported as itself, not as a prompt
    # that does not fit it
    chosen_msgs = _response_messages(chosen, "chosen", source, index)
    rejected_msgs = _response_messages(rejected, "rejected", source, index)
    if isinstance(prompt, list):
        prompt_msgs = read_messages(prompt, "prompt", source, index)
        # responses that repeat the prompt conversation before the reply: the reply is the rest
        if prompt_msgs and all(msgs[: len(prompt_msgs)] == prompt_msgs for msgs in (chosen_msgs, rejected_msgs)):
            chosen_msgs, rejected_msgs = chosen_msgs[len(prompt_msgs) :], rejected_msgs[len(prompt_msgs) :]
    else:
        shared = _shared_prefix(chosen_msgs, rejected_msgs)
        prompt_msgs = chosen_msgs[:shared]
        chosen_msgs, rejected_msgs = chosen_msgs[shared:], rejected_msgs[shared:]
        if prompt is not None:
            prompt_msgs = _text_prompt_turn(prompt_msgs, prompt, source, index)
        elif not prompt_msgs:
            raise DataError(
                source,
                "chosen and rejected conversations share no leading messages, so there is no prompt to split off "
                "(a record without 'prompt' is read as whole conversations)",
                index,
                "chosen",
            )
    if not prompt_msgs:
        raise DataError(source, "conversation has no prompt messages", index, "prompt")
    return PreferencePair(
        prompt_msgs,
        read_reply(chosen_msgs, "chosen", source, index),
        read_reply(rejected_msgs, "rejected", source, index),
    )


def _text_prompt_turn(shared: tuple[Message, ...], prompt: Any, source: str, index: int) -> tuple[Message, ...]:
    """The prompt of a text ``prompt`` beside conversational responses: the conversations' shared
    leading messages when they have them (the text must be one of their user turns, as in
    UltraFeedback-binarized), else the text as the user turn."""
    text = read_text(prompt, "prompt", source, index)
    if not shared:
        return ({"role": "user", "content": text},)
    users = [message_text(m).strip() for m in shared if m["role"] == "user"]
    if text.strip() not in users:
        raise DataError(
            source,
            "the text prompt is not a user turn of the conversation that chosen and rejected share; map the "
            "right fields with `columns`, or drop the prompt field to use the shared conversation",
            index,
            "prompt",
        )
    return shared


def as_chat(prompt: Union[str, tuple[Message, ...]], responses: Sequence[Response]):
    """The prompt to render with responses given as messages: a text prompt becomes the user turn
    (messages need a chat template, which needs a conversation to render them in)."""
    if isinstance(prompt, str) and any(not isinstance(response, str) for response in responses):
        return ({"role": "user", "content": prompt},)
    return prompt


def as_conversation(
    prompt: Union[str, Sequence[Message]], chat: bool = False, system_prompt: str | None = None
) -> Union[str, tuple[Message, ...]]:
    """A prompt as the chat template should see it: with ``chat`` (or a ``system_prompt``) a text
    prompt becomes the user turn; a ``system_prompt`` opens every conversation that has no system
    turn of its own. Without either, the prompt is unchanged (text is tokenized as it is)."""
    if isinstance(prompt, str):
        if not chat and system_prompt is None:
            return prompt
        prompt = ({"role": "user", "content": prompt},)
    messages = tuple(prompt)
    if system_prompt is not None and not (messages and messages[0].get("role") == "system"):
        messages = ({"role": "system", "content": system_prompt}, *messages)
    return messages


def transcript_turns(text: str, markers: Mapping[str, str], field: str, source: str, index: int) -> list[Message]:
    """A transcript (``"\\n\\nHuman: hi\\n\\nAssistant: hello"``) as chat messages: ``markers`` maps
    each role to the text that opens its turns; a turn's text is stripped. Text before the first
    marker is an error naming the field, so a transcript in another convention is not read as one
    long turn."""
    found = sorted((at, role, marker) for role, marker in markers.items() for at in _occurrences(text, marker))
    if not found or text[: found[0][0]].strip():
        raise DataError(
            source,
            "format 'transcript': the text does not start with a turn marker "
            f"({', '.join(repr(m) for m in markers.values())}); set assistant_marker / user_marker, or use format "
            "implicit",
            index,
            field,
        )
    ends = [at for at, _, _ in found[1:]] + [len(text)]
    return [
        {"role": role, "content": text[at + len(marker) : end].strip()}
        for (at, role, marker), end in zip(found, ends, strict=True)
    ]


def _occurrences(text: str, marker: str) -> list[int]:
    """Where ``marker`` starts in ``text`` (non-overlapping, left to right)."""
    found, at = [], text.find(marker)
    while at >= 0:
        found.append(at)
        at = text.find(marker, at + len(marker))
    return found


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


def read_response(value: Any, field: str, source: str, index: int) -> Response:
    """A response: text, or messages (one assistant turn, or several: see :func:`read_reply`)."""
    if isinstance(value, list):
        return read_reply(read_messages(value, field, source, index), field, source, index)
    return read_text(value, field, source, index)
