"""The reward model: a scalar head on the policy's last hidden state, trained with Bradley-Terry
on pairs or ranked lists, exported as a Hugging Face sequence classifier, and scored as a reward.

The reward of a sequence is read at its last token that is not the pad token: the EOS that ends
the response (or the last response token when truncation cut the EOS). A tokenizer that pads with
its EOS (many real ones) has the reward read at the token before that EOS instead. This is
exactly the token ``AutoModelForSequenceClassification`` pools for a right-padded batch, so the
exported classifier gives the module's rewards.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

from lit_align.data.collate import ListLayout, PairLayout
from lit_align.data.packing import is_packed, unpack_rows
from lit_align.losses.reward import (
    RewardLoss,
    bradley_terry_loss,
    listwise_bradley_terry_loss,
)
from lit_align.methods.alignment import AlignmentModule
from lit_align.model.export import staged_folder, write_files
from lit_align.model.flops import flops_per_token
from lit_align.model.loading import DTYPES, trained_module_names
from lit_align.model.sharding import base_model_of
from lit_align.report.model_card import RunRecord, run_files
from lit_align.settings import ModelSettings, OptimizerSettings


class RewardModel(AlignmentModule):
    """Reward model r(x, y) = w^T h_last(x, y) (InstructGPT, Ouyang et al. 2022; Llama 2, Touvron
    et al. 2023): a linear head on the backbone's last decoder hidden state at each sequence's
    reward token (see the module docstring), trained with the Bradley-Terry loss.

    Data: :class:`lit_align.data.PreferenceDataModule` pairs (loss
    -log sigma(r_w - r_l - m), with the optional per-pair ``margin`` column as m; missing = 0), or
    :class:`lit_align.data.ListwiseDataModule` lists (every pair of responses with different
    scores, averaged per prompt). Each response is one row of one forward: K rows for a list of K.

    Logged: ``loss``; ``accuracy`` (pairwise: the preferred response gets the higher reward, ties
    1/2); ``margin`` (mean r_w - r_l); ``rewards/mean``, ``rewards/min``, ``rewards/max`` (over a
    batch's responses; min and max are per-batch values, averaged over batches in validation).
    The LM head is frozen (unused); with LoRA only adapters and the reward head train.

    Args:
        model: the causal LM whose decoder is the reward model's body; LoRA/QLoRA as elsewhere.
        optimizer: AdamW and learning-rate schedule.
    """

    needs_reference = False
    data_layouts = (PairLayout, ListLayout)
    data_module_name = "lit_align.data.PreferenceDataModule (pairs) or lit_align.data.ListwiseDataModule (ranked lists)"
    headline_metric = "val/accuracy"
    exports_lora_adapter = False

    def __init__(self, model: ModelSettings = ModelSettings(), optimizer: OptimizerSettings = OptimizerSettings()):  # noqa: B008 (never mutated)
        super().__init__(model=model, optimizer=optimizer)
        policy = self.backbone.policy
        self.head = nn.Linear(policy.config.get_text_config().hidden_size, 1, bias=False)  # a bias cancels in r_w - r_l
        nn.init.zeros_(self.head.weight)  # every reward starts at 0: held-out accuracy starts at exactly 1/2
        lm_head = self.backbone.lm_head(policy)
        if lm_head.weight is not policy.get_input_embeddings().weight:  # tied weights are the embeddings: keep them
            lm_head.requires_grad_(False)
        self._flops = None

    # ---- rewards ----------------------------------------------------------------------------
    def score(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[rows]`` reward of every sequence of a collated batch (padded or packed), in layout order."""
        hidden = self.backbone.hidden_states(batch)
        rows, columns = reward_positions(batch, self.tokenizer.pad_token_id)
        return self.head(hidden[rows, columns].to(self.head.weight.dtype)).squeeze(-1)

    def reward_loss(self, rewards: torch.Tensor, batch: dict[str, torch.Tensor]) -> RewardLoss:
        """Bradley-Terry over a list batch's ranked responses or a pair batch's pairs."""
        if "list_index" in batch:
            valid = batch["list_index"] >= 0
            table = torch.where(valid, rewards[batch["list_index"].clamp(min=0)], torch.zeros_like(rewards[:1]))
            return listwise_bradley_terry_loss(table, batch["scores"].masked_fill(~valid, float("nan")))
        chosen, rejected = rewards.chunk(2)
        return bradley_terry_loss(chosen, rejected, batch.get("margin"))

    def step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        rewards = self.score(batch)
        output = self.reward_loss(rewards, batch)
        seen = rewards.detach()
        values = {
            "loss": output.losses.detach(),
            "accuracy": output.accuracies,
            "margin": output.margins,
            "rewards/mean": seen,
            "rewards/min": seen.min()[None],
            "rewards/max": seen.max()[None],
        }
        self.log_metrics(stage, values, batch_size=output.losses.shape[0])
        return output.losses.mean()

    # ---- checks and FLOPs -------------------------------------------------------------------
    @property
    def flops_per_batch(self) -> int | None:
        """Analytic FLOPs of the last batch: the decoder's forward (+ backward when training); the
        LM head never runs and the reward head (2H per row) is negligible."""
        if self.current_batch is None:
            return None
        if self._flops is None:
            self._flops = flops_per_token(self.backbone.policy)
        rows, seq_len = self.current_batch["input_ids"].shape
        count = self._flops.forward_backward if self.training else self._flops.forward
        return count(rows * seq_len, seq_len, head_tokens=0)

    # ---- export -------------------------------------------------------------------------------
    def sequence_classifier(self):
        """A standalone ``AutoModelForSequenceClassification`` (``num_labels=1``) with this model's
        rewards: the policy's config and decoder weights (see :func:`merged_decoder_state`), the
        reward head as its ``score`` layer, and ``pad_token_id`` set to the tokenizer's."""
        from transformers import AutoModelForSequenceClassification

        policy = self.backbone.policy
        config = copy.deepcopy((policy.get_base_model() if self.backbone.is_peft else policy).config)
        config.num_labels, config.pad_token_id, config.architectures = 1, self.tokenizer.pad_token_id, None
        if hasattr(config, "quantization_config"):  # the export holds plain floating-point weights
            del config.quantization_config
        with torch.random.fork_rng(devices=[]):  # from_config initialises weights randomly; keep the run's RNG
            classifier = AutoModelForSequenceClassification.from_config(config, dtype=DTYPES[self.model_settings.dtype])
        source = merged_decoder_state(policy)
        target = classifier.base_model.state_dict()
        missing = sorted(set(target) - set(source))
        if missing:
            raise RuntimeError(
                f"cannot export {type(self).__name__}: the policy's decoder has no weights for {missing[:5]}"
            )
        classifier.base_model.load_state_dict({key: source[key] for key in target})
        with torch.no_grad():
            classifier.score.weight.copy_(self.head.weight)
        return classifier.eval()

    def export_hf(self, output_dir: str | os.PathLike, merge_lora: bool = False, run: RunRecord | None = None) -> Path:
        """Write the reward model as an ``AutoModelForSequenceClassification`` folder (with the
        tokenizer, ``config.yaml`` and a model card), atomically; LoRA is always merged
        (``merge_lora`` is ignored). Load it with :class:`RewardModelReward` or
        ``AutoModelForSequenceClassification.from_pretrained``."""
        with staged_folder(output_dir) as staging:
            self.sequence_classifier().save_pretrained(staging)
            self.tokenizer.save_pretrained(staging)
            write_files(staging, run_files(self, run or self.run_record(), merged_lora=True))
        return Path(output_dir)


@torch.no_grad()
def merged_decoder_state(policy: nn.Module) -> dict[str, torch.Tensor]:
    """The decoder's weights of a plain, LoRA or QLoRA causal LM as plain tensors, named as in the
    unwrapped decoder: each LoRA layer's base weight (de-quantized first if 4-bit) plus its active
    adapters' deltas, so merging never re-quantizes; the policy itself is left unchanged."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.integrations import dequantize_module_weight

    base = base_model_of(policy)
    decoder = base.get_decoder()
    state = trained_module_names(dict(decoder.state_dict()))
    for name, module in decoder.named_modules():
        tuner = isinstance(module, BaseTunerLayer)
        layer = module.get_base_layer() if tuner else module
        if not tuner and type(getattr(layer, "weight", None)).__name__ not in ("Params4bit", "Int8Params"):
            continue
        weight = dequantize_module_weight(layer).detach().clone()
        for adapter in module.active_adapters if tuner else ():
            weight = weight + module.get_delta_weight(adapter).to(weight)
        prefix = f"{name}." if name else ""
        state[f"{prefix}weight"] = weight
        if getattr(layer, "bias", None) is not None:
            state[f"{prefix}bias"] = layer.bias.detach()
    return state


def reward_positions(batch: dict[str, torch.Tensor], pad_token_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) in ``batch``'s own layout of each sequence's reward token: its last token that
    is not ``pad_token_id`` (its last token if all are). Sequences in layout order; works for
    padded (``attention_mask``) and packed (``seq_rows``/``seq_starts``/``seq_lens``) batches."""
    ids = batch["input_ids"]
    if is_packed(batch):
        ids = unpack_rows(ids, batch, fill=-1)
        real = torch.arange(ids.shape[1], device=ids.device)[None, :] < batch["seq_lens"].to(ids.device)[:, None]
        rows, start = batch["seq_rows"].to(ids.device), batch["seq_starts"].to(ids.device)
    else:
        real = batch["attention_mask"].bool()
        rows, start = torch.arange(ids.shape[0], device=ids.device), 0
    keep = real & (ids != pad_token_id) if pad_token_id is not None else real
    keep = torch.where(keep.any(dim=1, keepdim=True), keep, real)
    last = (torch.arange(ids.shape[1], device=ids.device)[None, :] * keep).argmax(dim=1)
    return rows, start + last
