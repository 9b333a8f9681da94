"""The backbone every method shares: tokenizer, policy, reference, and log-probs from hidden states."""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn
from transformers import (
    PreTrainedModel,
)

from lit_align.data.collate import PackedPairCollator, PairCollator
from lit_align.data.labels import IGNORE_INDEX, shift_labels
from lit_align.data.packing import is_packed, padded_layout, response_mask
from lit_align.model.flops import flops_per_token
from lit_align.model.loading import (
    add_lora,
    load_causal_lm,
    load_tokenizer,
    model_settings_named,
)
from lit_align.model.logprobs import (
    SequenceLogps,
    chunked_label_logps,
    naive_label_logps,
)
from lit_align.model.reference import ReferenceSource, resolve_reference
from lit_align.model.sharding import head_of, head_parameters, hidden_states_of, sharded_label_logps
from lit_align.settings import ModelSettings

log = logging.getLogger(__name__)


class Backbone(nn.Module):
    """Policy (optionally LoRA / QLoRA), tokenizer and reference source for one method.

    Args:
        settings: what to load and how (see :class:`ModelSettings`).
        needs_reference: whether the method uses reference log-probs; ``reference="auto"``
            resolves to ``none`` when it does not, so reference-free methods never build one.
        method: the method's name, for errors about its settings.
    """

    def __init__(self, settings: ModelSettings, needs_reference: bool, method: str | None = None):
        super().__init__()
        self.settings = settings
        self.reference_source: ReferenceSource = resolve_reference(settings, needs_reference, method)
        self.tokenizer = load_tokenizer(settings)
        with model_settings_named(settings):
            model = load_causal_lm(settings, self.tokenizer)
        self.reference: PreTrainedModel | None = None
        if self.reference_source.builds_copy:
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        if settings.lora is not None:
            with model_settings_named(settings, "model.lora"):
                model = add_lora(model, settings)
        if settings.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        self.policy = model
        self._flops = None

    @property
    def is_peft(self) -> bool:
        return hasattr(self.policy, "disable_adapter")

    def train(self, mode: bool = True) -> "Backbone":
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()
        return self

    def logps(
        self, batch: dict[str, torch.Tensor], model: nn.Module | None = None, hidden: torch.Tensor | None = None
    ) -> SequenceLogps:
        """Per-token log-probs of ``batch["labels"]`` under ``model`` (default: the policy).

        Padded batches pass their attention mask; packed batches (:mod:`lit_align.data.packing`) pass
        ``position_ids`` and no mask, and their values come back in the padded layout.
        ``hidden``: the batch's :meth:`hidden_states` under ``model`` when the caller already has
        them (a value head reads the same pass); only the LM head then runs.
        """
        model = model if model is not None else self.policy
        labels = shift_labels(batch["labels"])
        chunk = self.settings.logp_chunk_size
        if chunk is None and hidden is None:
            tokens = padded_layout(naive_label_logps(model(**_model_inputs(batch)).logits, labels), batch)
        else:
            hidden = self.hidden_states(batch, model) if hidden is None else hidden
            chunk = chunk or hidden.shape[0] * hidden.shape[1]
            # only response positions go through the LM head: prompt and padding rows are skipped
            scored = labels != IGNORE_INDEX
            sharded = sharded_label_logps(model)
            if sharded is not None:  # FSDP2: the hooks of the unit that holds the head gather its weight
                values = sharded(hidden[scored], labels[scored], chunk)
            else:
                weight, bias = head_parameters(self.lm_head(model), hidden.dtype)
                values = chunked_label_logps(hidden[scored], weight, labels[scored], bias, chunk_size=chunk)
            tokens = padded_layout(values, batch, scored)
        return SequenceLogps(tokens, response_mask(batch))

    def hidden_states(self, batch: dict[str, torch.Tensor], model: nn.Module | None = None) -> torch.Tensor:
        """``[R, L, H]`` last decoder hidden states of ``batch`` under ``model`` (default: the policy),
        before the LM head, in the batch's own layout (packed rows stay packed).

        Padded batches pass their attention mask, packed batches their ``position_ids``; LoRA
        adapters take part unless the caller disabled them.
        """
        model = model if model is not None else self.policy
        return hidden_states_of(model, _model_inputs(batch))

    @staticmethod
    def lm_head(model: nn.Module) -> nn.Module:
        """The output embedding (LM head) of a plain or peft-wrapped causal LM."""
        return head_of(model)

    @torch.no_grad()
    def packing_isolates_sequences(
        self, device: torch.device | None = None, tolerance: float = 1e-4
    ) -> tuple[bool, float]:
        """Whether packed sequences stay isolated under this model's attention implementation:
        log-probs of two short random sequences packed into one row vs each alone."""
        generator = torch.Generator().manual_seed(0)
        vocab = min(self.policy.get_input_embeddings().num_embeddings, len(self.tokenizer))
        ids = torch.randint(0, vocab, (17,), generator=generator).tolist()
        examples = [{"prompt": ids[:4], "chosen": ids[4:9], "rejected": ids[9:17]}]
        was_training = self.training
        self.eval()
        try:
            padded = self.logps(
                {k: v.to(device) for k, v in PairCollator(self.tokenizer.pad_token_id)(examples).items()}
            )
            packed = self.logps({k: v.to(device) for k, v in PackedPairCollator(capacity=64)(examples).items()})
        finally:
            self.train(was_training)
        difference = float((padded.tokens - packed.tokens).abs().max())
        return difference <= tolerance, difference

    def step_flops(self, batch: dict[str, torch.Tensor], train: bool) -> int:
        """Analytic FLOPs of one step on ``batch``: policy forward (+ backward when training)
        plus a reference forward when the reference source runs one (see :mod:`lit_align.model.flops`)."""
        if self._flops is None:
            self._flops = flops_per_token(self.policy)
        rows, seq_len = batch["input_ids"].shape  # packed rows: attention runs over the whole row
        tokens = rows * seq_len
        head_tokens = (
            None
            if self.settings.logp_chunk_size is None
            else int((shift_labels(batch["labels"]) != IGNORE_INDEX).sum())
        )
        policy = self._flops.forward_backward if train else self._flops.forward
        total = policy(tokens, seq_len, head_tokens)
        if self.reference_source.runs_forward:  # the reference has the policy's architecture
            total += self._flops.forward(tokens, seq_len, head_tokens)
        return total

    @torch.no_grad()
    def reference_logps(self, batch: dict[str, torch.Tensor]) -> SequenceLogps:
        """Reference log-probs from the configured reference source (no gradients)."""
        return self.reference_source.logps(self, batch)


def _model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | bool]:
    """Forward inputs: the attention mask of a padded batch, the ``position_ids`` of a packed one."""
    inputs = {"input_ids": batch["input_ids"], "use_cache": False}
    if is_packed(batch):
        inputs["position_ids"] = batch["position_ids"]
    else:
        inputs["attention_mask"] = batch["attention_mask"]
    return inputs
