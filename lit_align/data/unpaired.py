"""Unpaired data: ``{prompt, completion, label}`` records (label true = desirable), and the
converter that turns paired data into unpaired data.

Prompts are text or chat message lists; a completion is text or a list with one assistant
message. ``label`` must be a JSON boolean: 0/1, "yes" or "true" are rejected rather than guessed.
:func:`pair_to_unpaired` splits each preference pair into one desirable example (the chosen
response) and one undesirable example (the rejected one), which is how KTO is usually trained
from paired data; :func:`convert_pairs_file` writes such a file for inspection or reuse.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from lit_align.data.errors import DataError, DroppableRecord
from lit_align.data.formats import (
    FormatName,
    Message,
    PreferencePair,
    normalise_record,
    read_field,
    read_prompt,
    read_response,
)
from lit_align.data.sources import read_records

UNPAIRED_FIELDS = ("prompt", "completion", "label")


@dataclass(frozen=True)
class UnpairedExample:
    """One completion judged on its own: ``label`` True = desirable, False = undesirable."""

    prompt: Union[str, tuple[Message, ...]]
    completion: str
    label: bool

    @property
    def is_conversational(self) -> bool:
        return not isinstance(self.prompt, str)


def normalise_unpaired(
    record: Mapping[str, Any], source: str, index: int, columns: Mapping[str, str] | None = None
) -> UnpairedExample:
    """Turn one raw record into an :class:`UnpairedExample`, or raise :class:`DataError` saying where."""
    values = {
        name: read_field(record, (columns or {}).get(name, name), source, index, required=True)
        for name in UNPAIRED_FIELDS
    }
    label = values["label"]
    if not isinstance(label, bool):
        raise DataError(
            source, f"expected a boolean (true = desirable, false = undesirable), got {label!r}", index, "label"
        )
    return UnpairedExample(
        read_prompt(values["prompt"], "prompt", source, index),
        read_response(values["completion"], "completion", source, index),
        label,
    )


def pair_to_unpaired(pair: PreferencePair) -> list[UnpairedExample]:
    """A preference pair as two unpaired examples: chosen (desirable), then rejected (undesirable)."""
    return [UnpairedExample(pair.prompt, pair.chosen, True), UnpairedExample(pair.prompt, pair.rejected, False)]


def convert_pairs_file(
    source: str,
    output: str,
    format: FormatName = "auto",
    columns: Mapping[str, str] | None = None,
    assistant_marker: str = "\n\nAssistant:",
    user_marker: str = "\n\nHuman:",
    split: str = "train",
    invalid_records: str = "skip",
) -> tuple[int, int]:
    """Write paired ``source`` as unpaired JSONL ``output`` (two records per pair); returns
    (records written, pairs skipped). Pairs that cannot train (empty or identical responses) are
    skipped, or raise with ``invalid_records="error"``; malformed records always raise. The file
    appears complete or not at all (temp file, then rename)."""
    records, skipped = [], 0
    for index, record in enumerate(read_records(source, split)):
        try:
            pair = normalise_record(record, source, index, format, columns, assistant_marker, user_marker)
        except DroppableRecord:
            if invalid_records == "error":
                raise
            skipped += 1
            continue
        for example in pair_to_unpaired(pair):
            prompt = example.prompt if isinstance(example.prompt, str) else list(example.prompt)
            records.append({"prompt": prompt, "completion": example.completion, "label": example.label})
    target = Path(output)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as stream:
            for record in records:
                stream.write(json.dumps(record) + "\n")
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return len(records), skipped
