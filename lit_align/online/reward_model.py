"""A reward model exported by :class:`lit_align.methods.RewardModel` as an on-policy reward."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Optional

import torch

from lit_align.data.tokenize import tokenize_responses
from lit_align.errors import SettingError
from lit_align.model.loading import ModelLoadError, config_writing
from lit_align.online.rewards import RewardFunction
from lit_align.settings import Count, Range, check_arguments


class RewardModelReward(RewardFunction):
    """Scores completions with a reward model exported by :class:`RewardModel` (a Hugging Face
    sequence-classification folder, e.g. ``outputs/reward`` from ``configs/reward.yaml``).

    Each (prompt, completion) is tokenized exactly as training data was
    (:func:`lit_align.data.tokenize.tokenize_responses`: plain or chat prompts, one EOS ending the
    completion, ``keep_end`` truncation), right-padded with the classifier's pad token and scored
    without gradients. Set ``max_length``/``max_prompt_length`` as the training data had them.

    Args:
        path: the exported folder.
        batch_size: sequences per classifier forward.
        max_length: longest prompt + completion in tokens (as the training data's ``max_length``).
        max_prompt_length: longest prompt in tokens (default ``max_length // 2``, as the data modules').
    """

    def __init__(
        self,
        path: str,
        batch_size: Count = 32,
        max_length: Annotated[int, Range(2)] = 512,
        max_prompt_length: Optional[Count] = None,
    ):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        check_arguments(self, locals())
        if max_prompt_length is not None and max_prompt_length >= max_length:
            raise SettingError(
                type(self).__name__,
                "max_prompt_length",
                f"must be < max_length={max_length}, got {max_prompt_length}: completions need room",
            )

        writer = None if Path(path).exists() else config_writing(path)
        if writer is not None:  # a previous stage's output, not a hub id: say which config writes it
            error = ModelLoadError(
                f"RewardModelReward: the reward model {path!r} does not exist yet: {writer} writes it"
            )
            error.hint = f"run `lit-align fit --config {writer}` first"
            raise error
        try:
            self.model = AutoModelForSequenceClassification.from_pretrained(path).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as error:
            raise ModelLoadError(
                f"RewardModelReward: cannot load the reward model {path!r}: "
                f"{(str(error).strip().splitlines() or [''])[0]}"
            ) from None
        self.batch_size, self.max_length = batch_size, max_length
        self.max_prompt_length = max_length // 2 if max_prompt_length is None else max_prompt_length

    def to(self, device: torch.device | str) -> RewardModelReward:
        self.model.to(device)
        return self

    def token_ids(self, prompt, completion: str) -> list[int]:
        """prompt + completion ids, as the data modules tokenize a response."""
        prompt_ids, responses = tokenize_responses(
            prompt, {"completion": completion}, self.tokenizer, self.max_length, self.max_prompt_length
        )
        return prompt_ids + responses["completion"]

    @torch.no_grad()
    def score(self, prompts: Sequence, completions: Sequence[str]) -> torch.Tensor:
        sequences = [
            self.token_ids(prompt, completion) for prompt, completion in zip(prompts, completions, strict=True)
        ]
        pad = self.model.config.pad_token_id
        device = next(self.model.parameters()).device
        rewards = []
        for start in range(0, len(sequences), self.batch_size):
            chunk = sequences[start : start + self.batch_size]
            width = max(len(ids) for ids in chunk)
            input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in chunk], device=device)
            mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in chunk], device=device)
            rewards.append(self.model(input_ids=input_ids, attention_mask=mask).logits[:, 0].float().cpu())
        return torch.cat(rewards) if rewards else torch.zeros(0)
