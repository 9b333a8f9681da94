"""Tokenizing preference pairs: prompt tokens (masked from the loss later) and response tokens.

Each pair becomes three id lists: ``prompt``, ``chosen`` and ``rejected``; the collator joins
prompt + response and masks the prompt. Chat data is rendered with the tokenizer's chat template;
the response is what the template adds after the generation prompt, so its end-of-turn tokens
come from the template. An EOS token ends a plain-text response exactly once (none is added when
it already ends with one); a rendered chat response keeps the template's end-of-turn token and
gets an EOS only when the template put none in.

Truncation (``truncation``):
* ``keep_end`` (default): a prompt longer than ``max_prompt_length`` keeps its last tokens (the
  part next to the response); responses are then cut on the right to fit ``max_length``.
* ``drop``: a pair that does not fit is dropped (counted and logged by the data module).
* ``error``: a pair that does not fit raises an error naming the record.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal, Union

from transformers import PreTrainedTokenizerBase

from lit_align.data.errors import DataError, DroppableRecord
from lit_align.data.formats import PreferencePair

TruncationMode = Literal["keep_end", "drop", "error"]
Prompt = Union[str, Sequence[dict[str, str]]]


def render_chat(
    messages: list[dict[str, str]],
    tokenizer: PreTrainedTokenizerBase,
    source: str,
    index: int,
    add_generation_prompt: bool = False,
    field: str = "prompt",
) -> str:
    """``messages`` rendered by the tokenizer's chat template, or a :class:`DataError` naming the
    record and ``field`` (the part of the record that was added last) when there is no template
    or the template rejects the conversation."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            source, "conversational data needs a tokenizer with a chat template, and this one has none", index, field
        )
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as error:  # jinja raises TemplateError for roles the template rejects
        raise DataError(source, f"the chat template rejected this conversation: {error}", index, field) from None


def render_conversation(
    prompt: Sequence[dict[str, str]],
    response: str,
    tokenizer: PreTrainedTokenizerBase,
    source: str,
    index: int,
    prompt_field: str = "prompt",
    response_field: str = "completion",
) -> tuple[str, str]:
    """(prompt text, response text) of a chat prompt and its reply, rendered by the chat template;
    a rendering the template rejects is reported in the field that was added: the prompt's
    first, then the response's."""
    messages = list(prompt)
    prompt_text = render_chat(messages, tokenizer, source, index, add_generation_prompt=True, field=prompt_field)
    full_text = render_chat(
        messages + [{"role": "assistant", "content": response}], tokenizer, source, index, field=response_field
    )
    if not full_text.startswith(prompt_text):
        raise DataError(
            source,
            "the chat template renders the prompt differently with and without the response",
            index,
            prompt_field,
        )
    return prompt_text, full_text[len(prompt_text) :]


def tokenize_responses(
    prompt: Prompt,
    responses: Mapping[str, str],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    max_prompt_length: int,
    truncation: TruncationMode = "keep_end",
    source: str = "<data>",
    index: int = 0,
    prompt_field: str = "prompt",
) -> tuple[list[int], dict[str, list[int]]]:
    """(prompt ids, {field: response ids}) for one prompt and its named responses, truncated as
    documented above (every response must fit next to the prompt). Errors name the record's
    fields: ``prompt_field`` for the prompt, each response's key for the response."""
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"max_prompt_length must be in (0, max_length={max_length}), got {max_prompt_length}")
    conversational = not isinstance(prompt, str)
    if conversational:
        rendered = {
            name: render_conversation(prompt, text, tokenizer, source, index, prompt_field, name)
            for name, text in responses.items()
        }
        prompt_text = next(iter(rendered.values()))[0]
        texts = {name: response for name, (_, response) in rendered.items()}
    else:
        texts, prompt_text = dict(responses), prompt
    prompt_ids = _prompt_ids(prompt_text, tokenizer, rendered_by_template=conversational)
    ids = {name: _response_ids(text, tokenizer, conversational) for name, text in texts.items()}
    longest = max(len(values) for values in ids.values())
    if len(prompt_ids) + longest > max_length or len(prompt_ids) > max_prompt_length:
        if truncation == "error":
            field = (
                prompt_field
                if len(prompt_ids) > max_prompt_length
                else next(name for name, values in ids.items() if len(values) == longest)
            )
            raise DataError(
                source,
                f"{len(prompt_ids)} prompt + {longest} response tokens do not fit max_length={max_length} "
                f"(max_prompt_length={max_prompt_length}); set truncation to keep_end or drop",
                index,
                field,
            )
        if truncation == "drop":
            raise DroppableRecord(source, f"longer than max_length={max_length} tokens", index, prompt_field)
        prompt_ids = prompt_ids[-max_prompt_length:]
        room = max_length - len(prompt_ids)
        ids = {name: values[:room] for name, values in ids.items()}
    return prompt_ids, ids


def tokenize_pair(
    pair: PreferencePair,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    max_prompt_length: int,
    truncation: TruncationMode = "keep_end",
    source: str = "<data>",
    index: int = 0,
) -> dict[str, list[int]]:
    """Token ids ``{"prompt", "chosen", "rejected"}`` of one pair (plus its scores and margin when it has them)."""
    prompt_ids, responses = tokenize_responses(
        pair.prompt,
        {"chosen": pair.chosen, "rejected": pair.rejected},
        tokenizer,
        max_length,
        max_prompt_length,
        truncation,
        source,
        index,
    )
    if responses["chosen"] == responses["rejected"]:
        raise DroppableRecord(
            source, "chosen and rejected are identical after tokenization and truncation", index, "rejected"
        )
    example = {"prompt": prompt_ids, **responses}
    if pair.score_chosen is not None or pair.score_rejected is not None:
        example["score_chosen"] = math.nan if pair.score_chosen is None else pair.score_chosen
        example["score_rejected"] = math.nan if pair.score_rejected is None else pair.score_rejected
    if pair.margin is not None:
        example["margin"] = pair.margin
    return example


def _prompt_ids(text: str, tokenizer: PreTrainedTokenizerBase, rendered_by_template: bool) -> list[int]:
    """Prompt ids: a chat rendering as is; plain text with the tokenizer's special tokens but no
    trailing EOS; an empty prompt becomes BOS (when the tokenizer has one)."""
    if rendered_by_template:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"] if text else []
        if tokenizer.eos_token_id is not None and ids[-1:] == [tokenizer.eos_token_id]:
            ids = ids[:-1]
    if not ids and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id]
    return ids


def _response_ids(text: str, tokenizer: PreTrainedTokenizerBase, rendered_by_template: bool) -> list[int]:
    """Response ids ending in EOS exactly once.

    Plain text gets an EOS unless it already ends with one. A chat-template rendering keeps the
    template's end of turn (which may be followed by a newline, as in ChatML) and gets an EOS only
    when the template put none in.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    has_eos = eos in ids if rendered_by_template else ids[-1:] == [eos]
    if eos is not None and not has_eos:
        ids = ids + [eos]
    return ids


def tokenize_prompt(
    prompt: Prompt,
    tokenizer: PreTrainedTokenizerBase,
    max_prompt_length: int,
    truncation: TruncationMode = "keep_end",
    source: str = "<data>",
    index: int = 0,
) -> list[int]:
    """Prompt ids to generate from, exactly as :func:`tokenize_responses` tokenizes the prompt of a
    response (chat prompts end with the template's generation prompt). A prompt longer than
    ``max_prompt_length`` keeps its last tokens, is dropped or raises, per ``truncation``."""
    conversational = not isinstance(prompt, str)
    if conversational:
        prompt = render_chat(list(prompt), tokenizer, source, index, add_generation_prompt=True)
    ids = _prompt_ids(prompt, tokenizer, rendered_by_template=conversational)
    if len(ids) > max_prompt_length:
        if truncation == "error":
            raise DataError(
                source,
                f"{len(ids)} prompt tokens do not fit max_prompt_length={max_prompt_length}; set truncation to "
                "keep_end or drop",
                index,
                "prompt",
            )
        if truncation == "drop":
            raise DroppableRecord(
                source, f"prompt longer than max_prompt_length={max_prompt_length} tokens", index, "prompt"
            )
        ids = ids[-max_prompt_length:]
    return ids
