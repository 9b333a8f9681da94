"""The paired-preference LightningModule that every paired objective subclasses.

A subclass overrides :meth:`PairedPreferenceModule.loss` (and sets ``needs_reference``); the base
does the concatenated forward, the reference log-probs, metrics and the optimizer.
"""

from __future__ import annotations

import logging
from typing import ClassVar, Optional

import torch
from lightning import LightningModule
from torchmetrics import MeanMetric
from transformers import get_scheduler

from lit_align.backbone import Backbone, SequenceLogps
from lit_align.losses.types import PreferenceLoss
from lit_align.settings import ModelSettings, OptimizerSettings, as_settings

PROGRESS_BAR = {"loss", "rewards/accuracies"}
log = logging.getLogger(__name__)


class PairedPreferenceModule(LightningModule):
    """Base for objectives on (prompt, chosen, rejected) pairs.

    Args:
        model: the causal LM, LoRA/QLoRA and reference strategy.
        optimizer: AdamW and learning-rate schedule.
    """

    needs_reference: ClassVar[bool] = True
    """Whether :meth:`loss` receives reference log-probs (False: no reference is ever built)."""

    def __init__(self, model: ModelSettings = ModelSettings(), optimizer: OptimizerSettings = OptimizerSettings()):  # noqa: B008 (never mutated)
        super().__init__()
        self.save_hyperparameters()
        self.model_settings = as_settings(model, ModelSettings)
        self.optimizer_settings = as_settings(optimizer, OptimizerSettings)
        self.backbone = Backbone(self.model_settings, needs_reference=self.needs_reference)
        self.metrics = torch.nn.ModuleDict()
        self._policy_is_initial = True  # False once trained or loaded: then no reference can be derived from it
        self._reference_attached = False
        self._packing_checked = False
        self._last_batch: dict[str, torch.Tensor] | None = None

    @property
    def tokenizer(self):
        return self.backbone.tokenizer

    # ---- the one method a new objective overrides -----------------------------------------
    def loss(self, chosen: SequenceLogps, rejected: SequenceLogps, ref_chosen: Optional[SequenceLogps], ref_rejected: Optional[SequenceLogps]) -> PreferenceLoss:
        """Per-pair losses and implicit rewards from policy (and reference) log-probs.

        ``chosen``/``rejected`` carry ``.sum`` (log pi(y|x)), ``.count`` (|y|), ``.mean`` and
        per-token ``.tokens``; ``ref_*`` are the same for the reference, or None when
        ``needs_reference`` is False.
        """
        raise NotImplementedError

    # ---- shared machinery ------------------------------------------------------------------
    def forward_pair(self, batch: dict[str, torch.Tensor]) -> PreferenceLoss:
        """One concatenated policy forward over chosen+rejected, then the objective."""
        chosen, rejected = self.backbone.logps(batch).split()
        ref_chosen = ref_rejected = None
        if self.needs_reference:
            ref_chosen, ref_rejected = self.reference_logps(batch).split()
        output = self.loss(chosen, rejected, ref_chosen, ref_rejected)
        metrics = {"logps/chosen": chosen.sum.detach(), "logps/rejected": rejected.sum.detach(), **output.metrics}
        return output._replace(metrics=metrics)

    def reference_logps(self, batch: dict[str, torch.Tensor]) -> SequenceLogps:
        """Reference log-probs of the batch under the configured strategy."""
        return self.backbone.reference_logps(batch)

    @property
    def flops_per_batch(self) -> int | None:
        """Analytic FLOPs of the last batch, read by ThroughputMonitor; computed only when read."""
        if self._last_batch is None:
            return None
        return self.backbone.step_flops(self._last_batch, train=self.training)

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        self._last_batch = batch
        output = self.forward_pair(batch)
        loss = output.losses.mean()
        margins = output.chosen_rewards - output.rejected_rewards
        values = {
            "loss": output.losses.detach(),
            "rewards/chosen": output.chosen_rewards,
            "rewards/rejected": output.rejected_rewards,
            # a tie (e.g. every DPO margin at step 0) is a coin flip: it counts one half
            "rewards/accuracies": (margins > 0).float() + 0.5 * (margins == 0).float(),
            "rewards/margins": margins,
            **output.metrics,
        }
        self._log_metrics(stage, values, batch_size=output.losses.shape[0])
        return loss

    def _log_metrics(self, stage: str, values: dict[str, torch.Tensor], batch_size: int) -> None:
        for name, value in values.items():
            key = f"{stage}/{name}"
            slot = key.replace("/", "__")
            if slot not in self.metrics:  # created on first use; never as inference tensors
                with torch.inference_mode(False):
                    self.metrics[slot] = MeanMetric().to(self.device)
            metric = self.metrics[slot]
            metric(value.float())  # forward: accumulates and keeps the batch value for on_step logging
            on_step = stage == "train"
            self.log(key, metric, on_step=on_step, on_epoch=not on_step, prog_bar=name in PROGRESS_BAR, batch_size=batch_size, metric_attribute=f"metrics.{slot}")

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self._policy_is_initial = False
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self):
        settings = self.optimizer_settings
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=settings.lr, betas=tuple(settings.betas), eps=settings.eps, weight_decay=settings.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = get_scheduler(settings.schedule, optimizer, num_warmup_steps=int(settings.warmup_ratio * total), num_training_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- before the first batch: cached reference, packing check ----------------------------
    def on_fit_start(self) -> None:
        self._prepare_data()

    def on_validation_start(self) -> None:
        self._prepare_data()

    def on_test_start(self) -> None:
        self._prepare_data()

    def _prepare_data(self) -> None:
        self._attach_cached_reference()
        self._check_packing()

    def _check_packing(self) -> None:
        """Keep packing only if packed and padded log-probs agree under this model's attention."""
        datamodule = self.trainer.datamodule
        if not getattr(datamodule, "packing_active", False) or self._packing_checked:
            return
        self._packing_checked = True
        isolated, difference = self.backbone.packing_isolates_sequences(self.device)
        if not isolated:
            datamodule.packing_active = False
            log.warning("packing disabled, using padding: attention %r lets packed sequences see each other "
                        "(packed vs padded log-probs differ by %.2e)", self.backbone.settings.attn_implementation, difference)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._policy_is_initial = False

    def _attach_cached_reference(self) -> None:
        """With ``reference: cached``, attach stored (or compute once) reference log-probs."""
        if not self.backbone.strategy.precomputed or self._reference_attached:
            return
        from lit_align.reference_cache import attach_reference_logps

        datamodule = self.trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "cache_key"):
            raise RuntimeError("model.reference=cached needs a lit-align data module (it stores the log-probs with the tokenized data)")
        attach_reference_logps(self.backbone, datamodule, self._policy_is_initial, self.device, self.trainer.is_global_zero)
        self._reference_attached = True

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Record the class so ``lit-align export`` can rebuild the module from the file alone."""
        checkpoint["lit_align_class"] = f"{type(self).__module__}:{type(self).__qualname__}"
