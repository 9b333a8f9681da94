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
from lit_align.model.prefix_sharing import shared_prompt_hidden_states, split_shared_prompts
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
        if settings.disable_dropout:
            disable_dropout(model)  # before LoRA is added: its own dropout stays as set
        self.reference: PreTrainedModel | None = None
        if self.reference_source.builds_copy:
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        if settings.lora is not None:
            with model_settings_named(settings, "model.lora"):
                model = add_lora(model, settings)
        if settings.gradient_checkpointing:
            enable_checkpointing(model)
            model.config.use_cache = False
        self.policy = model
        self._flops = None
        # transformers' from_pretrained returns a model in eval mode, and Lightning keeps each
        # module's mode through fit: a loaded policy trained in eval mode, where transformers skips
        # gradient checkpointing (model.gradient_checkpointing did nothing) and dropout. Training
        # runs in train mode; the reference stays in eval mode (``train`` below).
        self.train()

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
        if self.settings.prefix_sharing and hidden is None and not is_packed(batch):
            return self.shared_prompt_logps(batch, model)
        return self.row_logps(batch, model, hidden)

    def row_logps(
        self, batch: dict[str, torch.Tensor], model: nn.Module, hidden: torch.Tensor | None = None
    ) -> SequenceLogps:
        """:meth:`logps` with every row run whole (no prefix sharing)."""
        labels = shift_labels(batch["labels"])
        chunk = self.settings.logp_chunk_size
        if chunk is None and hidden is None:
            tokens = padded_layout(naive_label_logps(model(**_model_inputs(batch)).logits, labels), batch)
        else:
            hidden = self.hidden_states(batch, model) if hidden is None else hidden
            chunk = chunk or hidden.shape[0] * hidden.shape[1]
            # only response positions go through the LM head: prompt and padding rows are skipped
            scored = labels != IGNORE_INDEX
            tokens = padded_layout(self._head_logps(model, hidden[scored], labels[scored], chunk), batch, scored)
        return SequenceLogps(tokens, response_mask(batch))

    def _head_logps(self, model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
        """Log-probs of ``labels`` [N] from the hidden states [N, H] that predict them, through
        ``model``'s LM head in chunks."""
        sharded = sharded_label_logps(model)
        if sharded is not None:  # FSDP2: the hooks of the unit that holds the head gather its weight
            return sharded(hidden, labels, chunk)
        weight, bias = head_parameters(self.lm_head(model), hidden.dtype)
        return chunked_label_logps(hidden, weight, labels, bias, chunk_size=chunk)

    def shared_prompt_logps(self, batch: dict[str, torch.Tensor], model: nn.Module) -> SequenceLogps:
        """:meth:`logps` of a padded pair batch with each prompt run once (``model.prefix_sharing``,
        :mod:`lit_align.model.prefix_sharing`); the values land on :meth:`row_logps`' positions."""
        labels = shift_labels(batch["labels"])
        shared = split_shared_prompts(batch)
        hidden = shared_prompt_hidden_states(model, shared)
        scored = shared.response_labels != IGNORE_INDEX
        chunk = self.settings.logp_chunk_size or int(scored.sum())
        values = self._head_logps(model, hidden[scored], shared.response_labels[scored], chunk)
        return SequenceLogps(padded_layout(values, batch, labels != IGNORE_INDEX), response_mask(batch))

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
        examples = self._random_pairs([(4, 5, 8)])
        padded = PairCollator(self.tokenizer.pad_token_id)(examples)
        packed = PackedPairCollator(capacity=64)(examples)
        return self._agree(
            lambda: self.row_logps(_to(padded, device), self.policy),
            lambda: self.row_logps(_to(packed, device), self.policy),
            tolerance,
        )

    @torch.no_grad()
    def prefix_sharing_matches(self, device: torch.device | None = None, tolerance: float = 1e-4) -> tuple[bool, float]:
        """Whether this model's log-probs with each prompt run once equal those of whole rows
        (two random pairs of different lengths, so padding takes part), and by how much they differ."""
        batch = _to(PairCollator(self.tokenizer.pad_token_id)(self._random_pairs([(4, 5, 8), (7, 3, 4)])), device)
        return self._agree(
            lambda: self.row_logps(batch, self.policy), lambda: self.shared_prompt_logps(batch, self.policy), tolerance
        )

    def _random_pairs(self, lengths: list[tuple[int, int, int]]) -> list[dict[str, list[int]]]:
        """Pairs of random token ids (seeded) with the given (prompt, chosen, rejected) lengths."""
        generator = torch.Generator().manual_seed(0)
        vocab = min(self.policy.get_input_embeddings().num_embeddings, len(self.tokenizer))
        ids = torch.randint(0, vocab, (sum(map(sum, lengths)),), generator=generator).tolist()
        pairs, start = [], 0
        for prompt, chosen, rejected in lengths:
            cuts = (start, start + prompt, start + prompt + chosen, start + prompt + chosen + rejected)
            pairs.append(
                {"prompt": ids[cuts[0] : cuts[1]], "chosen": ids[cuts[1] : cuts[2]], "rejected": ids[cuts[2] : cuts[3]]}
            )
            start = cuts[3]
        return pairs

    def _agree(self, first, second, tolerance: float) -> tuple[bool, float]:
        """Whether two ways of computing the same log-probs (callables, run in eval mode) agree
        within ``tolerance``, and the largest difference."""
        was_training = self.training
        self.eval()
        try:
            difference = float((first().tokens - second().tokens).abs().max())
        finally:
            self.train(was_training)
        return difference <= tolerance, difference

    def step_flops(self, batch: dict[str, torch.Tensor], train: bool) -> int:
        """Analytic FLOPs of one step on ``batch``: policy forward (+ backward when training)
        plus a reference forward when the reference source runs one (see :mod:`lit_align.model.flops`)."""
        if self._flops is None:
            self._flops = flops_per_token(self.policy)
        passes = self._passes(batch)
        policy = self._flops.forward_backward if train else self._flops.forward
        total = sum(policy(*shape) for shape in passes)
        if self.reference_source.runs_forward:  # the reference has the policy's architecture
            total += sum(self._flops.forward(*shape) for shape in passes)
        return total

    def _passes(self, batch: dict[str, torch.Tensor]) -> list[tuple[int, int, int | None]]:
        """(tokens, attention length, LM-head tokens) of each decoder pass :meth:`logps` makes over
        ``batch``: one over its rows, or with prefix sharing one over the prompts and one over the
        responses (attending to prompt + response)."""
        scored = int((shift_labels(batch["labels"]) != IGNORE_INDEX).sum())
        if self.settings.prefix_sharing and not is_packed(batch):
            shared = split_shared_prompts(batch)
            prompts, prompt_len = shared.prompt_ids.shape
            responses, response_len = shared.response_ids.shape
            return [
                (prompts * prompt_len, prompt_len, 0),
                (responses * response_len, prompt_len + response_len, scored),
            ]
        rows, seq_len = batch["input_ids"].shape  # packed rows: attention runs over the whole row
        return [(rows * seq_len, seq_len, None if self.settings.logp_chunk_size is None else scored)]

    @torch.no_grad()
    def reference_logps(self, batch: dict[str, torch.Tensor]) -> SequenceLogps:
        """Reference log-probs from the configured reference source (no gradients)."""
        return self.reference_source.logps(self, batch)


def _to(batch: dict[str, torch.Tensor], device: torch.device | None) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | bool]:
    """Forward inputs: the attention mask of a padded batch, the ``position_ids`` of a packed one."""
    inputs = {"input_ids": batch["input_ids"], "use_cache": False}
    if is_packed(batch):
        inputs["position_ids"] = batch["position_ids"]
    else:
        inputs["attention_mask"] = batch["attention_mask"]
    return inputs


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of every decoder layer: transformers'
    ``activation_checkpointing_enable`` where the installed release has it (there the older
    ``gradient_checkpointing_enable`` warns that it goes in v6), else the older name."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def disable_dropout(model: nn.Module) -> None:
    """Dropout probability 0 in every ``nn.Dropout`` of ``model`` and in the attention layers'
    ``attention_dropout`` (Llama, Qwen, Mistral read it in their forward instead of a module). The
    config is left as it is, so an export keeps the model's own settings."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
