"""The prompt data module of on-policy methods: prompts to generate from, no responses."""

from __future__ import annotations

from typing import Any

import torch

from lit_align.data.collate import PromptCollator, PromptLayout
from lit_align.data.datamodule import PreferenceDataModule
from lit_align.data.formats import read_field, read_prompt
from lit_align.data.tokenize import tokenize_prompt


class PromptDataModule(PreferenceDataModule):
    """Prompts for PPO, REINFORCE, A2C, TRPO, RLOO, GRPO and online DPO. Every setting of
    :class:`PreferenceDataModule` applies (sources, ``columns``, ``max_prompt_length``,
    truncation, caching); ``max_length`` bounds the prompt alone here (the completion's length is
    the method's ``generation.max_new_tokens``).

    Records: ``{"prompt": text | chat messages}``; any other fields (a preference pair's
    responses, a reference answer) are ignored. The built-in task gives its prompts; the held-out
    split holds prompts never seen in training. Batches: left-padded ``prompt_ids`` and
    ``prompt_mask`` and the raw ``prompts`` (text or messages) for the reward function.
    """

    layout = PromptLayout()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.hparams.max_prompt_length is None:  # no response shares max_length here
            self.max_prompt_length = self.hparams.max_length

    def tokenize_record(self, record: dict[str, Any], source: str, index: int) -> list[dict[str, Any]]:
        h = self.hparams
        prompt = read_prompt(read_field(record, (h.columns or {}).get("prompt", "prompt"), source, index, required=True), "prompt", source, index)
        ids = tokenize_prompt(prompt, self.tokenizer, self.max_prompt_length, h.truncation, source, index)
        return [{"prompt": ids, "text": prompt if isinstance(prompt, str) else [dict(m) for m in prompt]}]

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        return PromptCollator(pad)(examples)
