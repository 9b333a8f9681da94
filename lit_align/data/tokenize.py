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

from typing import Literal

from transformers import PreTrainedTokenizerBase

from lit_align.data.errors import DataError, DroppableRecord
from lit_align.data.formats import PreferencePair

TruncationMode = Literal["keep_end", "drop", "error"]


def render_conversation(pair: PreferencePair, response: str, tokenizer: PreTrainedTokenizerBase, source: str, index: int) -> tuple[str, str]:
    """(prompt text, response text) of a conversational pair, rendered by the chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(source, "conversational data needs a tokenizer with a chat template, and this one has none", index, "prompt")
    messages = list(pair.prompt)
    try:
        prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
    except Exception as error:  # jinja raises TemplateError for roles the template rejects
        raise DataError(source, f"the chat template rejected this conversation: {error}", index, "prompt") from None
    if not full_text.startswith(prompt_text):
        raise DataError(source, "the chat template renders the prompt differently with and without the response", index, "prompt")
    return prompt_text, full_text[len(prompt_text):]


def tokenize_pair(
    pair: PreferencePair,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    max_prompt_length: int,
    truncation: TruncationMode = "keep_end",
    source: str = "<data>",
    index: int = 0,
) -> dict[str, list[int]]:
    """Token ids ``{"prompt", "chosen", "rejected"}`` of one pair, truncated as documented above."""
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"max_prompt_length must be in (0, max_length={max_length}), got {max_prompt_length}")
    if pair.is_conversational:
        prompt_text, chosen_text = render_conversation(pair, pair.chosen, tokenizer, source, index)
        _, rejected_text = render_conversation(pair, pair.rejected, tokenizer, source, index)
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    else:
        prompt_text, chosen_text, rejected_text = pair.prompt, pair.chosen, pair.rejected
        prompt_ids = tokenizer(prompt_text, add_special_tokens=True)["input_ids"] if prompt_text else []
        if tokenizer.eos_token_id is not None and prompt_ids[-1:] == [tokenizer.eos_token_id]:
            prompt_ids = prompt_ids[:-1]
    if not prompt_ids and tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id]
    responses = {name: _response_ids(text, tokenizer, pair.is_conversational) for name, text in (("chosen", chosen_text), ("rejected", rejected_text))}
    longest = max(len(ids) for ids in responses.values())
    if len(prompt_ids) + longest > max_length or len(prompt_ids) > max_prompt_length:
        if truncation == "error":
            field = "prompt" if len(prompt_ids) > max_prompt_length else "chosen" if len(responses["chosen"]) == longest else "rejected"
            raise DataError(source, f"{len(prompt_ids)} prompt + {longest} response tokens do not fit max_length={max_length} (max_prompt_length={max_prompt_length}); set truncation to keep_end or drop", index, field)
        if truncation == "drop":
            raise DroppableRecord(source, f"longer than max_length={max_length} tokens", index, "prompt")
        prompt_ids = prompt_ids[-max_prompt_length:]
        room = max_length - len(prompt_ids)
        responses = {name: ids[:room] for name, ids in responses.items()}
    if responses["chosen"] == responses["rejected"]:
        raise DroppableRecord(source, "chosen and rejected are identical after tokenization and truncation", index, "rejected")
    return {"prompt": prompt_ids, **responses}


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
