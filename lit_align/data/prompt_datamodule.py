"""The prompt data module of on-policy methods: prompts to generate from, no responses."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Optional

import torch

from lit_align.data.collate import PromptCollator, PromptLayout
from lit_align.data.datamodule import BUILTIN, AlignmentDataModule, RecordStore, first_rows
from lit_align.data.formats import read_field, read_prompt
from lit_align.data.sft_datamodule import SFTDataModule
from lit_align.data.tokenize import tokenize_prompt
from lit_align.settings import Count


class PromptDataModule(AlignmentDataModule):
    """Prompts for PPO, REINFORCE, A2C, TRPO, RLOO, GRPO and online DPO. Every setting of
    :class:`AlignmentDataModule` applies (sources, ``columns``, ``max_prompt_length``,
    truncation, caching); ``max_length`` bounds the prompt alone here (the completion's length is
    the method's ``generation.max_new_tokens``).

    Records: ``{"prompt": text | chat messages}``; any other fields (a preference pair's
    responses, a reference answer) are ignored. The built-in task gives its prompts; the held-out
    split holds prompts never seen in training. Batches: left-padded ``prompt_ids`` and
    ``prompt_mask`` and the raw ``prompts`` (text or messages) for the reward function.

    PPO-ptx (InstructGPT, Ouyang et al. 2022, eq. 2): with ``ptx_train`` set, every training
    batch also carries ``ptx``, a batch of demonstrations or pre-training text read like
    :class:`SFTDataModule` reads its data (``{prompt, completion}``, ``{messages}``, ``{text}``;
    ``builtin``: the built-in task's correct answers), cycled in a seeded shuffled order.

    Args:
        ptx_train: source of the ``ptx`` batches (any source :class:`SFTDataModule` reads).
        ptx_batch_size: examples per ``ptx`` batch (default: ``batch_size``).
        (everything else: :class:`AlignmentDataModule`)
    """

    layout = PromptLayout()
    record_fields = ("prompt",)
    example_features = {"prompt": "ids"}  # ``text`` (a string or chat messages) is stored pickled

    def __init__(self, *args, ptx_train: Optional[str] = None, ptx_batch_size: Optional[Count] = None, **kwargs):
        super().__init__(*args, **kwargs)
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
        prompt = read_prompt(
            read_field(record, (h.columns or {}).get("prompt", "prompt"), source, index, required=True),
            "prompt",
            source,
            index,
        )
        ids = tokenize_prompt(
            prompt, self.tokenizer, self.max_prompt_length, h.truncation, source, index, h.chat_template_kwargs
        )
        return [{"prompt": ids, "text": prompt if isinstance(prompt, str) else [dict(m) for m in prompt]}]

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        return PromptCollator(pad)(examples)


class _TrainOnly(SFTDataModule):
    """PPO-ptx demonstrations: the training split only (no held-out fraction is split off)."""

    def _raw_splits(self, store: RecordStore):
        h = self.hparams
        if h.train == BUILTIN:
            source, records = "builtin:train", store.of("train", self.builtin_records("train"))
        else:
            source, records = self.source_name(h.train), store.read(h.train, h.split)
        return {"train": (source, first_rows(records, h.max_records) if h.max_records else records)}
