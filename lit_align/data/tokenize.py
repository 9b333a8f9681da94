"""Tokenizing preference pairs: prompt tokens (masked from the loss later) and response tokens.

Each pair becomes three id lists: ``prompt``, ``chosen`` and ``rejected``; the collator joins
prompt + response and masks the prompt. Chat data is rendered with the tokenizer's chat template
(with ``template_kwargs`` such as ``{"enable_thinking": false}``):

* the prompt is the conversation rendered with the generation prompt: exactly the text the model
  continues when it generates;
* the response is what the template adds after it when the reply is rendered too, so the reply's
  end-of-turn tokens come from the template. Templates that render the final turn differently from
  how they prompt for it are handled by :func:`render_conversation`: DeepSeek-R1's opens
  ``<think>\n`` in its generation prompt and drops the reasoning of every assistant turn; the reply
  then continues the generation prompt with its reasoning kept (earlier turns, in the prompt, stay
  as the template renders them).

An EOS token ends a plain-text response exactly once (none is added when it already ends with
one); a rendered chat response keeps the template's end-of-turn token (``<|eot_id|>``,
``<|im_end|>``, ``<end_of_turn>``: a special token, even when it is not the tokenizer's EOS) and
gets an EOS only when the template ends the turn with no special token.

Truncation (``truncation``):
* ``keep_end`` (default): a prompt longer than ``max_prompt_length`` keeps its last tokens (the
  part next to the response); responses are then cut on the right to fit ``max_length``.
* ``drop``: a pair that does not fit is dropped (counted and logged by the data module).
* ``error``: a pair that does not fit raises an error naming the record.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union

from transformers import PreTrainedTokenizerBase

from lit_align.data.errors import DataError, DroppableRecord
from lit_align.data.formats import Message, PreferencePair, Response, as_chat

TruncationMode = Literal["keep_end", "drop", "error"]
Prompt = Union[str, Sequence[Message]]
_MARK = "\ue000lit-align reply\ue001"
"""Stands in for a reply's text to find where a template puts it (private-use characters, which
no template alters)."""


def render_chat(
    messages: list[Message],
    tokenizer: PreTrainedTokenizerBase,
    source: str,
    index: int,
    add_generation_prompt: bool = False,
    field: str = "prompt",
    template_kwargs: Mapping[str, Any] | None = None,
) -> str:
    """``messages`` rendered by the tokenizer's chat template, or a :class:`DataError` naming the
    record and ``field`` (the part of the record that was added last) when there is no template
    or the template rejects the conversation."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            source, "conversational data needs a tokenizer with a chat template, and this one has none", index, field
        )
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **(template_kwargs or {})
        )
    except Exception as error:  # jinja raises TemplateError for roles the template rejects
        detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DataError(source, f"the chat template cannot render this conversation: {detail}", index, field) from None


def render_conversation(
    prompt: Sequence[Message],
    response: Response,
    tokenizer: PreTrainedTokenizerBase,
    source: str,
    index: int,
    prompt_field: str = "prompt",
    response_field: str = "completion",
    template_kwargs: Mapping[str, Any] | None = None,
) -> tuple[str, str]:
    """(prompt text, response text) of a chat prompt and its reply, rendered by the chat template.

    The prompt is the generation-prompt rendering; the response is what the full rendering adds
    to it. When the full rendering does not continue the prompt, or loses the reply's reasoning
    (DeepSeek-R1's template: ``<｜Assistant｜><think>\\n`` as the generation prompt, reasoning
    cut from every assistant turn), a one-turn text reply is placed where the template puts a
    reply's text (:func:`_continue_prompt`). A rendering the template rejects is reported in the
    field that was added: the prompt's first, then the response's."""
    messages, reply = list(prompt), _reply_messages(response)
    render = lambda extra, generation, field: render_chat(  # noqa: E731
        messages + extra, tokenizer, source, index, generation, field, template_kwargs
    )
    prompt_text = render([], True, prompt_field)
    full_text = render(reply, False, response_field)
    if full_text.startswith(prompt_text) and not _loses_reasoning(reply, full_text[len(prompt_text) :]):
        return prompt_text, full_text[len(prompt_text) :]
    if len(reply) == 1 and isinstance(reply[0].get("content"), str):
        marked = render([{**reply[0], "content": _MARK, "reasoning_content": None}], False, response_field)
        return prompt_text, _continue_prompt(prompt_text, marked, reply[0], source, index, prompt_field)
    raise DataError(
        source,
        "the chat template renders the prompt differently with and without the response",
        index,
        prompt_field,
    )


def _reply_messages(response: Response) -> list[Message]:
    return [{"role": "assistant", "content": response}] if isinstance(response, str) else list(response)


def _reasoning(message: Message) -> str:
    """The reasoning of an assistant turn: its ``reasoning_content``, or a leading
    ``<think>...</think>`` block of its text content."""
    if message.get("reasoning_content"):
        return str(message["reasoning_content"]).strip()
    content = message.get("content")
    if isinstance(content, str) and "</think>" in content:
        return content.split("</think>")[0].replace("<think>", "").strip()
    return ""


def _loses_reasoning(reply: list[Message], rendered: str) -> bool:
    """Whether the rendered reply lacks the reasoning of one of its assistant turns."""
    return any(_reasoning(m) and _reasoning(m) not in rendered for m in reply if m["role"] == "assistant")


def _continue_prompt(
    prompt_text: str, marked: str, message: Message, source: str, index: int, prompt_field: str
) -> str:
    """The reply to ``prompt_text`` when the template's own rendering of the final turn cannot be
    used: the reply's text (reasoning kept; ``reasoning_content`` as a leading
    ``<think>\\n...\\n</think>\\n\\n`` block) where ``marked`` (the conversation rendered with a
    stand-in reply) puts it, followed by the template's end of turn. What the generation prompt
    already opened after the turn header (``<think>\\n``) is not repeated."""
    if marked.count(_MARK) != 1:
        raise DataError(source, "the chat template does not render an assistant reply's text once", index, prompt_field)
    head, end_of_turn = marked.split(_MARK)
    if not prompt_text.startswith(head):
        raise DataError(
            source,
            "the chat template renders the prompt differently with and without the response (a template that "
            "places a message by whether its turn is the last one, such as Mistral v0.3's system message in the "
            "last user turn, cannot be split into a prompt and a reply: fold that message into the user turn)",
            index,
            prompt_field,
        )
    opened = prompt_text[len(head) :]
    text = message["content"]
    if message.get("reasoning_content"):
        text = f"<think>\n{str(message['reasoning_content']).strip()}\n</think>\n\n{text.lstrip()}"
    if opened and text.startswith(opened):
        text = text[len(opened) :]
    elif opened.strip() and text.lstrip().startswith(opened.strip()):
        text = text.lstrip()[len(opened.strip()) :].lstrip("\n")
    return text + end_of_turn


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
    template_kwargs: Mapping[str, Any] | None = None,
) -> tuple[list[int], dict[str, list[int]]]:
    """(prompt ids, {field: response ids}) for one prompt and its named responses, truncated as
    documented above (every response must fit next to the prompt). Responses given as messages
    make a text prompt the user turn. Errors name the record's fields: ``prompt_field`` for the
    prompt, each response's key for the response."""
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"max_prompt_length must be in (0, max_length={max_length}), got {max_prompt_length}")
    prompt = as_chat(prompt, list(responses.values()))
    conversational = not isinstance(prompt, str)
    if conversational:
        rendered = {
            name: render_conversation(prompt, text, tokenizer, source, index, prompt_field, name, template_kwargs)
            for name, text in responses.items()
        }
        prompt_text = next(iter(rendered.values()))[0]
        texts = {name: response for name, (_, response) in rendered.items()}
    else:
        texts, prompt_text = dict(responses), prompt
    prompt_ids = _prompt_ids(prompt_text, tokenizer, rendered_by_template=conversational)
    if conversational and len({rendered_prompt for rendered_prompt, _ in rendered.values()}) > 1:
        raise DataError(  # a template that renders the prompt from the reply (none known): name it
            source, "the chat template renders this prompt differently for each response", index, prompt_field
        )
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
    template_kwargs: Mapping[str, Any] | None = None,
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
        template_kwargs=template_kwargs,
    )
    return pair_example(pair, prompt_ids, responses, source, index)


def pair_example(
    pair: PreferencePair, prompt_ids: list[int], responses: dict[str, list[int]], source: str, index: int
) -> dict[str, Any]:
    """The example of a tokenized pair: its ids, plus its scores and margin when it has them."""
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
    """Response ids ending their turn exactly once.

    Plain text gets an EOS unless it already ends with one. A chat-template rendering keeps the
    template's end of turn (a special token, possibly followed by a newline as in ChatML) and gets
    an EOS only when the template ends the turn with no special token.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if rendered_by_template:
        ended = eos in ids or _ends_with_special(text, tokenizer)
    else:
        ended = ids[-1:] == [eos]
    if eos is not None and not ended:
        ids = ids + [eos]
    return ids


def _ends_with_special(text: str, tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether ``text`` ends (before trailing whitespace) with one of the tokenizer's special tokens."""
    end = text.rstrip()
    specials = set(tokenizer.all_special_tokens)
    specials.update(str(token) for token in getattr(tokenizer, "added_tokens_decoder", {}).values() if token.special)
    return any(end.endswith(token) for token in specials if token.strip())


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens that end a reply: EOS, and the special token the chat template closes an assistant
    turn with when it is another (Llama 3's ``<|eot_id|>`` beside the base model's
    ``<|end_of_text|>``, Gemma's ``<end_of_turn>``). Generation stops at any of them, as the
    tokenized responses end with them."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if not getattr(tokenizer, "chat_template", None):
        return ids
    try:
        marked = tokenizer.apply_chat_template(
            [{"role": "user", "content": "?"}, {"role": "assistant", "content": _MARK}], tokenize=False
        )
    except Exception:  # a template with other rules (a required system turn, ...): EOS alone
        return ids
    if marked.count(_MARK) != 1:
        return ids
    specials = set(tokenizer.all_special_ids)
    specials.update(i for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special)
    end = [i for i in tokenizer(marked.split(_MARK)[1], add_special_tokens=False)["input_ids"] if i in specials]
    return ids + [i for i in end[:1] if i not in ids]


def tokenize_prompt(
    prompt: Prompt,
    tokenizer: PreTrainedTokenizerBase,
    max_prompt_length: int,
    truncation: TruncationMode = "keep_end",
    source: str = "<data>",
    index: int = 0,
    template_kwargs: Mapping[str, Any] | None = None,
) -> list[int]:
    """Prompt ids to generate from, exactly as :func:`tokenize_responses` tokenizes the prompt of a
    response (chat prompts end with the template's generation prompt). A prompt longer than
    ``max_prompt_length`` keeps its last tokens, is dropped or raises, per ``truncation``."""
    conversational = not isinstance(prompt, str)
    if conversational:
        prompt = render_chat(
            list(prompt), tokenizer, source, index, add_generation_prompt=True, template_kwargs=template_kwargs
        )
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
