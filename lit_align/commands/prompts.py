"""Prompts the commands generate from, and a policy's completions of them in batches.

Prompts come from the command line (text) or a file: a ``.txt`` file holds one prompt per line
(blank lines skipped); any other file is read as the data modules read one (JSONL, JSON, parquet,
a saved ``datasets`` folder, a hub dataset) and each record gives its ``prompt`` (text or chat
messages), its ``messages`` (a conversation; the assistant turns that end it, a reply to it, are
left out, so the policy writes that reply), its ``question`` (GSM8K) or, for a preference pair
without a prompt field (Anthropic HH's whole transcripts), the start its ``chosen`` and
``rejected`` share, as the preference data module splits it; and optionally a reference
``answer`` (else ``solution``; a GSM8K worked solution gives what follows its ``####``), which
verifiable rewards check completions against, as :class:`lit_align.data.PromptDataModule` reads
them. Other fields (a preference pair's responses) are ignored.

Prompts are tokenized exactly as training tokenizes them (:func:`lit_align.data.tokenize.tokenize_prompt`:
text as it is, chat messages rendered by the tokenizer's chat template with the generation
prompt), so a policy answers a prompt as it did in validation. Completions stop at the end of
turn the template closes a reply with (:func:`lit_align.data.tokenize.end_of_turn_ids`).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lit_align.data.collate import PromptCollator
from lit_align.data.errors import DataError, DroppableRecord
from lit_align.data.formats import normalise_record, read_messages, read_prompt
from lit_align.data.labels import IGNORE_INDEX
from lit_align.data.prompt_datamodule import ANSWER_FIELDS, final_answer, first_present
from lit_align.data.sources import iter_records
from lit_align.data.tokenize import Prompt, tokenize_prompt
from lit_align.online.rollout import GenerationSettings, sample_completions
from lit_align.runtime.progress import progress

PROMPT_FIELDS = ("prompt", "messages")
"""The record fields a prompt is read from, in this order."""


def read_prompt_file(source: str, split: str = "train") -> list[Prompt]:
    """The prompts of ``source`` (a ``.txt`` file or a data source, see the module's docstring),
    in order; a :class:`DataError` names the file, record and field of a bad one."""
    return read_prompts_and_answers(source, split)[0]


def read_prompts_and_answers(
    source: str, split: str = "train", columns: Mapping[str, str] | None = None
) -> tuple[list[Prompt], list[str | None], list[int]]:
    """The prompts of ``source``, each one's reference answer (None where a record gives none,
    and for every line of a ``.txt`` file) and record number; ``columns`` maps other field names
    as the data modules' ``columns`` setting does (``{prompt: problem, answer: final}``). A
    preference pair the data modules would skip (an empty response: HH has some) is skipped here
    too, with a note on stderr."""
    if source.lower().endswith(".txt"):
        lines = _text_lines(source)
        return lines, [None] * len(lines), list(range(len(lines)))
    prompts, answers, records, skipped = [], [], [], []
    for index, record in enumerate(iter_records(source, split)):
        try:
            prompts.append(record_prompt(record, source, index, (columns or {}).get("prompt")))
        except DroppableRecord as reason:
            skipped.append(reason)
            continue
        field = first_present(record, (columns or {}).get("answer"), ANSWER_FIELDS)
        answers.append(final_answer(record[field]) if record.get(field) is not None else None)
        records.append(index)
    if skipped:
        note = f"note: skipped {len(skipped)} records of {source} as training would (first: {skipped[0]})"
        print(note, file=sys.stderr)
    if not prompts:
        raise DataError(source, f"no usable records ({len(skipped)} skipped)")
    return prompts, answers, records


def _text_lines(source: str) -> list[str]:
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(source, "file not found")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(source, f"cannot be read as UTF-8 text ({error})") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise DataError(source, "no prompts (the file is empty)")
    return prompts


def record_prompt(record: Mapping[str, Any], source: str, index: int, field: str | None = None) -> Prompt:
    """The prompt of one record: its ``field`` when given, else its ``prompt`` (text or messages),
    else its ``messages`` without the assistant turns that end them, else its ``question``."""
    if field is not None:
        if field not in record:
            raise DataError(
                source, f"missing (columns maps the prompt to it; record has: {', '.join(record)})", index, field
            )
        return read_prompt(record[field], field, source, index)
    if "prompt" in record:
        return read_prompt(record["prompt"], "prompt", source, index)
    if "messages" in record:
        messages = read_messages(record["messages"], "messages", source, index)
        while messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages:
            raise DataError(source, "the conversation has no turn before the assistant's reply", index, "messages")
        return messages
    if "question" in record:
        return read_prompt(record["question"], "question", source, index)
    if "chosen" in record and "rejected" in record:  # a preference pair without a prompt field (HH's transcripts)
        return normalise_record(record, source, index).prompt
    fields = ", ".join(map(str, record)) or "none"
    raise DataError(
        source,
        f"missing: a prompt is read from a 'prompt' field (text or chat messages), a 'messages' field, a "
        f"'question' field or the shared start of 'chosen' and 'rejected' (record has fields: {fields})",
        index,
        "prompt",
    )


def tokenize_prompts(
    prompts: Sequence[Prompt],
    tokenizer,
    template_kwargs: Mapping[str, Any] | None = None,
    max_prompt_length: int | None = None,
    source: str = "--prompt",
) -> list[list[int]]:
    """Token ids of each prompt, as training tokenizes prompts; a prompt longer than
    ``max_prompt_length`` keeps its last tokens (None: no limit)."""
    limit = max_prompt_length or sys.maxsize
    return [
        tokenize_prompt(prompt, tokenizer, limit, "keep_end", source, index, template_kwargs)
        for index, prompt in enumerate(prompts)
    ]


def complete(
    policy,
    tokenizer,
    prompt_ids: Sequence[list[int]],
    generation: GenerationSettings,
    batch_size: int,
    temperature: float,
    description: str = "Generating",
) -> list[str]:
    """One completion of each prompt (``temperature`` 0: greedy), in order, generated
    ``batch_size`` prompts at a time on the policy's device, with a progress bar over the prompts.
    Completions are decoded without special tokens, as on-policy methods decode them."""
    device = next(policy.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = PromptCollator(pad)
    completions: list[str] = []
    with progress(len(prompt_ids), description, unit="prompts") as bar:
        for start in range(0, len(prompt_ids), batch_size):
            chunk = prompt_ids[start : start + batch_size]
            batch = collate([{"prompt": ids, "text": None} for ids in chunk])
            tokens = sample_completions(
                policy,
                tokenizer,
                batch["prompt_ids"].to(device),
                batch["prompt_mask"].to(device),
                generation,
                1,
                temperature,
            ).batch
            completions.extend(decode_completions(tokenizer, tokens["labels"]))
            bar.update(len(chunk))
    return completions


def decode_completions(tokenizer, labels: torch.Tensor) -> list[str]:
    """The completion text of each row (its labelled tokens), special tokens removed."""
    return [tokenizer.decode(row[row != IGNORE_INDEX].tolist(), skip_special_tokens=True) for row in labels]
