"""The prompt data module of on-policy methods: prompts to generate from, no responses."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Optional

import torch

from lit_align.data.collate import PromptCollator, PromptLayout
from lit_align.data.datamodule import BUILTIN, AlignmentDataModule, RecordStore, first_rows
from lit_align.data.formats import as_conversation, read_field, read_prompt
from lit_align.data.sft_datamodule import SFTDataModule
from lit_align.data.tokenize import tokenize_prompt
from lit_align.errors import SettingError
from lit_align.settings import Count


class PromptDataModule(AlignmentDataModule):
    """Prompts for PPO, REINFORCE, A2C, TRPO, RLOO, GRPO and online DPO. Every setting of
    :class:`AlignmentDataModule` applies (sources, ``columns``, ``max_prompt_length``,
    truncation, caching); ``max_length`` bounds the prompt alone here (the completion's length is
    the method's ``generation.max_new_tokens``).

    Records: ``{"prompt": text | chat messages}``, optionally with a reference ``answer`` for
    verifiable rewards (:class:`lit_align.online.verifiable.MathVerifyReward`). Read without
    configuration: the prompt from ``prompt``, else ``messages`` (a conversation to continue),
    else ``question`` (GSM8K); the answer from ``answer``, else ``solution``; a GSM8K answer (a
    worked solution ending in a ``#### 72`` line) gives the number after ``####``. ``columns``
    maps other names (``{prompt: problem, answer: final}``). Other fields are ignored. The built-in
    task gives its prompts; the held-out split holds prompts never seen in training. Batches:
    left-padded ``prompt_ids`` and ``prompt_mask``, the raw ``prompts`` (text or messages) for the
    reward function, and ``answers`` when the records have them.

    PPO-ptx (InstructGPT, Ouyang et al. 2022, eq. 2): with ``ptx_train`` set, every training
    batch also carries ``ptx``, a batch of demonstrations or pre-training text read like
    :class:`SFTDataModule` reads its data (``{prompt, completion}``, ``{messages}``, ``{text}``;
    ``builtin``: the built-in task's correct answers), cycled in a seeded shuffled order.

    Chat models: text prompts (GSM8K's questions, MATH problems) are tokenized as they are unless
    ``chat`` sends each as the user turn through the tokenizer's chat template; ``system_prompt``
    opens every conversation (text prompts then become the user turn too) that has no system turn
    of its own. The reward still sees each prompt as the data gave it.

    Args:
        ptx_train: source of the ``ptx`` batches (any source :class:`SFTDataModule` reads).
        ptx_batch_size: examples per ``ptx`` batch (default: ``batch_size``).
        chat: send text prompts as a user message through the tokenizer's chat template.
        system_prompt: a system message before every prompt without one (implies ``chat`` for
            text prompts), e.g. DeepSeek-R1's instruction to reason inside ``<think>`` tags.
        (everything else: :class:`AlignmentDataModule`)
    """

    layout = PromptLayout()
    record_fields = ("prompt", "answer")
    example_features = {"prompt": "ids"}  # ``text`` (a string or chat messages) and ``answer`` are stored pickled

    def __init__(
        self,
        *args,
        ptx_train: Optional[str] = None,
        ptx_batch_size: Optional[Count] = None,
        chat: bool = False,
        system_prompt: Optional[str] = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if chat and system_prompt is not None:
            raise SettingError(
                "PromptDataModule",
                "chat",
                "must be unset with system_prompt, which already sends text prompts as the user turn",
            )
        if self.hparams.max_prompt_length is None:  # no response shares max_length here
            self.max_prompt_length = self.hparams.max_length
        self.ptx_data: SFTDataModule | None = None
        self._ptx_batches: Iterator[dict[str, torch.Tensor]] | None = None
        if ptx_train is not None:
            h = self.hparams
            self.ptx_data = _TrainOnly(
                train=ptx_train,
                task=self.task,
                max_length=h.max_length,
                truncation=h.truncation,
                invalid_records=h.invalid_records,
                max_records=h.max_records,
                batch_size=ptx_batch_size or h.batch_size,
                seed=h.seed,
                cache_dir=h.cache_dir,
                use_cache=h.use_cache,
                num_proc=h.num_proc,
            )

    @property
    def provides_ptx(self) -> bool:
        """Whether training batches carry ``ptx`` (what PPO's ``ptx_coef`` needs)."""
        return self.ptx_data is not None

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.ptx_data is not None and not self.ptx_data.datasets:
            self.ptx_data.tokenizer = self.tokenizer
            self.ptx_data.setup(stage)

    def _cycle_ptx(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:  # a new shuffled pass each time the demonstrations run out
            yield from self.ptx_data.train_dataloader()

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Add the next ``ptx`` batch to each training batch (in the main process, so the order
        does not depend on ``num_workers``)."""
        if self.ptx_data is not None and self.trainer is not None and self.trainer.training:
            if self._ptx_batches is None:
                self._ptx_batches = self._cycle_ptx()
            batch["ptx"] = next(self._ptx_batches)
        return batch

    def tokenize_record(self, record: dict[str, Any], source: str, index: int) -> list[dict[str, Any]]:
        h = self.hparams
        field = first_present(record, (h.columns or {}).get("prompt"), PROMPT_FIELDS)
        prompt = read_prompt(read_field(record, field, source, index, required=True), field, source, index)
        ids = tokenize_prompt(
            as_conversation(prompt, h.chat, h.system_prompt),
            self.tokenizer,
            self.max_prompt_length,
            h.truncation,
            source,
            index,
            h.chat_template_kwargs,
        )
        example = {"prompt": ids, "text": prompt if isinstance(prompt, str) else [dict(m) for m in prompt]}
        answer_field = first_present(record, (h.columns or {}).get("answer"), ANSWER_FIELDS)
        if answer_field in record and record[answer_field] is not None:
            example["answer"] = final_answer(record[answer_field])
        return [example]

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        return PromptCollator(pad)(examples)


PROMPT_FIELDS = ("prompt", "messages", "question")
"""Where a prompt record's prompt is read from, the first present (unless ``columns`` names one)."""
ANSWER_FIELDS = ("answer", "solution")
"""Where its reference answer is read from, the first present (unless ``columns`` names one)."""


def first_present(record: dict[str, Any], mapped: str | None, names: tuple[str, ...]) -> str:
    """The field to read: the one ``columns`` maps, else the first of ``names`` in ``record``
    (else the first name, so a missing prompt is reported under it)."""
    if mapped is not None:
        return mapped
    return next((name for name in names if name in record), names[0])


def final_answer(value: Any) -> str:
    """A reference answer as text; a GSM8K worked solution (ending in ``#### <answer>``) gives
    what follows the last ``####``."""
    text = str(value)
    return text.rpartition("####")[2].strip() if "####" in text else text.strip()


class _TrainOnly(SFTDataModule):
    """PPO-ptx demonstrations: the training split only (no held-out fraction is split off)."""

    def _raw_splits(self, store: RecordStore):
        h = self.hparams
        if h.train == BUILTIN:
            source, records = "builtin:train", store.of("train", self.builtin_records("train"))
        else:
            source, records = self.source_name(h.train), store.read(h.train, h.split)
        return {"train": (source, first_rows(records, h.max_records) if h.max_records else records)}
