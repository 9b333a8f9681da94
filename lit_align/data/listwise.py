"""Listwise data: ``{prompt, responses: [...], scores: [...]}`` (higher = better) or
``{prompt, responses, ranks}`` (1 = best), for RRHF, PRO and LiPO.

Responses are text or one-assistant-message lists; scores must be finite numbers, one per
response. A list needs at least two responses and two different scores (otherwise it holds no
preference and is a droppable record); ranks become scores ``-rank``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union

from lit_align.data.errors import DataError, DroppableRecord
from lit_align.data.formats import (
    Message,
    read_field,
    read_number,
    read_prompt,
    read_response,
)


@dataclass(frozen=True)
class RankedResponses:
    """A prompt with several responses and a score each (higher = better)."""

    prompt: Union[str, tuple[Message, ...]]
    responses: tuple[str, ...]
    scores: tuple[float, ...]

    @property
    def is_conversational(self) -> bool:
        return not isinstance(self.prompt, str)


def normalise_listwise(
    record: Mapping[str, Any], source: str, index: int, columns: Mapping[str, str] | None = None
) -> RankedResponses:
    """Turn one raw record into :class:`RankedResponses`, or raise :class:`DataError` saying where."""
    name = lambda key: (columns or {}).get(key, key)  # noqa: E731
    prompt = read_prompt(read_field(record, name("prompt"), source, index, required=True), "prompt", source, index)
    responses = read_field(record, name("responses"), source, index, required=True)
    if not isinstance(responses, list):
        raise DataError(source, f"expected a list of responses, got {type(responses).__name__}", index, "responses")
    if name("scores") in record:
        field, values, sign = "scores", record[name("scores")], 1.0
    elif name("ranks") in record:
        field, values, sign = "ranks", record[name("ranks")], -1.0
    else:
        raise DataError(
            source,
            f"missing: a listwise record needs 'scores' or 'ranks' (record has fields: {', '.join(map(str, record))})",
            index,
            "scores",
        )
    if not isinstance(values, list) or len(values) != len(responses):
        raise DataError(
            source, f"expected a list of {len(responses)} numbers (one per response), got {values!r}", index, field
        )
    texts = tuple(read_response(value, f"responses[{k}]", source, index) for k, value in enumerate(responses))
    scores = tuple(
        sign * read_number(value, f"{field}[{k}]", source, index)
        if value is not None
        else _null(source, index, field, k)
        for k, value in enumerate(values)
    )
    if len(texts) < 2:
        raise DroppableRecord(source, "a list needs at least two responses", index, "responses")
    if len(set(scores)) < 2:
        raise DroppableRecord(source, "all responses have the same score: no preference to learn", index, field)
    return RankedResponses(prompt, texts, scores)


def _null(source: str, index: int, field: str, k: int):
    raise DataError(source, "expected a finite number, got null", index, f"{field}[{k}]")
