"""The generation backends of on-policy methods (``generation.backend``), one class per name.

Each samples ``samples`` completions per prompt for a module with its policy as it is now and
returns :class:`lit_align.online.rollout.Sampled` (the training layout plus the sampler's own
log-prob of each token), and refuses, at the module's construction, the settings it would not read.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch

from lit_align.data.tokenize import end_of_turn_ids
from lit_align.errors import SettingError
from lit_align.online.rollout import GenerationSettings, Sampled, VLLMSettings, sample_completions
from lit_align.online.vllm_engine import VLLMEngine
from lit_align.settings import as_settings


class GenerationBackend:
    """What every backend does: sample for a module (:meth:`generate` with its policy and tokenizer)."""

    def __init__(self, settings: GenerationSettings) -> None:
        self.settings = settings

    @classmethod
    def check_settings(cls, owner: str, hparams: Mapping[str, Any]) -> None:
        """Refuse the module's settings this backend would not read (``owner``: the module's class)."""

    def sample(
        self, module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, samples: int, temperature: float
    ) -> Sampled:
        """``samples`` completions of each left-padded prompt with ``module``'s policy as it is now."""
        policy, tokenizer = module.backbone.policy, module.tokenizer
        return self.generate(module, policy, tokenizer, prompt_ids, prompt_mask, samples, temperature)

    def generate(self, module, policy, tokenizer, prompt_ids, prompt_mask, samples: int, temperature: float) -> Sampled:
        raise NotImplementedError


class HFGeneration(GenerationBackend):
    """``hf``: transformers ``generate`` on the policy itself (KV cache), nothing to keep in sync."""

    @classmethod
    def check_settings(cls, owner: str, hparams: Mapping[str, Any]) -> None:
        """Refuse the vLLM engine's settings and ``sampler_correction``: with ``hf`` the sampler is
        the trained model itself, so there is no engine and no mismatch to correct."""
        generation = as_settings(hparams.get("generation"), GenerationSettings)
        changed = [
            item.name
            for item in dataclasses.fields(VLLMSettings)
            if getattr(generation.vllm, item.name) != getattr(VLLMSettings(), item.name)
        ]
        if changed:
            raise SettingError(
                owner,
                f"generation.vllm.{changed[0]}",
                "only the vllm generation backend reads it, and generation.backend is hf: set "
                "generation.backend: vllm, or remove it",
            )
        if hparams.get("sampler_correction") is not None:
            raise SettingError(
                owner,
                "sampler_correction",
                "corrects for a sampler that computes the policy differently from the trainer (vLLM), but "
                "generation.backend is hf: the trainer's own model samples, every weight would be 1; set "
                "generation.backend: vllm, or remove it",
            )

    def generate(self, module, policy, tokenizer, prompt_ids, prompt_mask, samples: int, temperature: float) -> Sampled:
        return sample_completions(policy, tokenizer, prompt_ids, prompt_mask, self.settings, samples, temperature)


class VLLMGeneration(GenerationBackend):
    """``vllm``: a vLLM engine in this process (:class:`lit_align.online.vllm_engine.VLLMEngine`),
    built on first use and given the policy's weights whenever they changed since the last push
    (``module.policy_version``)."""

    def __init__(self, settings: GenerationSettings) -> None:
        super().__init__(settings)
        self.engine: VLLMEngine | None = None

    @classmethod
    def check_settings(cls, owner: str, hparams: Mapping[str, Any]) -> None:
        """Refuse a 4-bit base model: vLLM would need the merged weights requantised its own way."""
        model = hparams.get("model")
        quantization = model.get("quantization") if isinstance(model, Mapping) else getattr(model, "quantization", None)
        if quantization is not None:
            raise SettingError(
                owner,
                "generation.backend",
                "is vllm, which samples with float weights pushed from the policy, but model.quantization makes the "
                "base 4-bit (QLoRA): use generation.backend: hf, or train without quantization",
            )

    def generate(self, module, policy, tokenizer, prompt_ids, prompt_mask, samples: int, temperature: float) -> Sampled:
        if self.engine is None:
            seed = (torch.initial_seed() + module.global_rank) % 2**31
            self.engine = VLLMEngine(self.settings.vllm, policy, tokenizer, seed)
        self.engine.push(policy, module.policy_version)
        stops = end_of_turn_ids(tokenizer)
        stops = [stops] if isinstance(stops, int) else list(stops or [])
        sampled = self.engine.generate(
            prompt_ids, prompt_mask, self.settings, samples, temperature, stops, tokenizer.pad_token_id
        )
        self.engine.rest()
        return sampled


GENERATION_BACKENDS: dict[str, type[GenerationBackend]] = {"hf": HFGeneration, "vllm": VLLMGeneration}
"""``generation.backend`` -> the class that samples."""
