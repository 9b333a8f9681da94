"""The SFT data module: ``{prompt, completion}`` examples; the loss sees completion tokens only."""

from __future__ import annotations

from typing import Any

from lit_align.data.collate import CompletionLayout
from lit_align.data.datamodule import AlignmentDataModule
from lit_align.data.errors import DataError
from lit_align.data.formats import (
    PAIR_FIELDS,
    RESPONSE_ROLES,
    normalise_record,
    read_field,
    read_messages,
    read_prompt,
    read_reply,
    read_response,
    read_text,
)


class SFTDataModule(AlignmentDataModule):
    """Demonstrations for supervised fine-tuning. Every setting of :class:`AlignmentDataModule`
    applies (sources, ``columns``, truncation, packing, caching).

    Record shapes (``columns`` renames fields):

    * ``{"prompt": ..., "completion": ...}``: prompt text or chat messages; completion text or a
      list holding one assistant message.
    * ``{"messages": [...]}``: a whole conversation ending in an assistant turn; the completion is
      the model's last reply (the assistant turns after the last user or system turn, with the
      ``tool`` results between them), the messages before it the prompt.
    * ``{"text": ...}``: plain text, every token trained (continued pre-training; PPO-ptx data).
    * preference pairs, when ``from_pairs`` is set: the chosen response is the completion. The
      built-in task is always read this way (its correct answers).

    Args:
        from_pairs: the records are preference pairs (any paired format); train on ``chosen``.
    """

    layout = CompletionLayout()
    record_fields = ("prompt", "completion", "messages", "text", *PAIR_FIELDS[1:])  # pairs with ``from_pairs``
    example_features = {"prompt": "ids", "completion": "ids"}

    def __init__(self, *args, from_pairs: bool = False, **kwargs):
        super().__init__(*args, **kwargs)

    def tokenize_record(self, record: dict[str, Any], source: str, index: int) -> list[dict[str, Any]]:
        prompt, completion = self._demonstration(record, source, index)
        try:
            prompt_ids, responses = self.tokenize_responses(prompt, {"completion": completion}, source, index)
        except DataError as error:  # a {messages} record: prompt and completion are both in `messages`
            messages = self._messages_field(record)
            raise error.in_file_columns({"prompt": messages, "completion": messages} if messages else None) from None
        return [{"prompt": prompt_ids, "completion": responses["completion"]}]

    def _messages_field(self, record: dict[str, Any]) -> str | None:
        """The (file's) name of the ``messages`` field when ``record`` is read as a conversation."""
        h = self.hparams
        name = (h.columns or {}).get("messages", "messages")
        return name if not h.from_pairs and name in record else None

    def _demonstration(self, record: dict[str, Any], source: str, index: int):
        """(prompt, completion) of one raw record."""
        h = self.hparams
        if h.from_pairs or source.startswith("builtin:"):
            pair = normalise_record(record, source, index, h.format, h.columns, h.assistant_marker, h.user_marker)
            return pair.prompt, pair.chosen
        name = (h.columns or {}).get
        if name("messages", "messages") in record:
            messages = read_messages(record[name("messages", "messages")], "messages", source, index)
            start = len(messages)  # the reply: the model's turns (and tool results) after the last other turn
            while start > 0 and messages[start - 1]["role"] in RESPONSE_ROLES:
                start -= 1
            while start < len(messages) and messages[start]["role"] != "assistant":
                start += 1
            if start == 0 or start == len(messages) or messages[-1]["role"] != "assistant":
                raise DataError(
                    source,
                    "expected a conversation ending in an assistant message after at least one other message",
                    index,
                    "messages",
                )
            return messages[:start], read_reply(messages[start:], "messages", source, index)
        if name("text", "text") in record and name("completion", "completion") not in record:
            return "", read_text(record[name("text", "text")], "text", source, index)
        prompt = read_prompt(
            read_field(record, name("prompt", "prompt"), source, index, required=True), "prompt", source, index
        )
        completion = read_response(
            read_field(record, name("completion", "completion"), source, index, required=True),
            "completion",
            source,
            index,
        )
        return prompt, completion
