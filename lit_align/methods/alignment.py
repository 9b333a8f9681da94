"""The LightningModule every lit-align method subclasses: backbone, reference, metrics, optimizer.

A data regime (paired, unpaired, listwise) is a subclass that implements :meth:`AlignmentModule.step`
and declares the data layout it consumes; an objective is a short subclass of a regime that
implements its ``loss``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, ClassVar

import torch
from lightning import LightningModule
from torchmetrics import MeanMetric
from transformers import get_scheduler

from lit_align.data.collate import Layout, PairLayout
from lit_align.data.contract import DataRequest, ServedData
from lit_align.data.datamodule import AlignmentDataModule
from lit_align.data.errors import DataError
from lit_align.errors import SettingError
from lit_align.methods.optimizers import build_optimizer
from lit_align.model.backbone import Backbone
from lit_align.model.export import export_policy
from lit_align.model.logprobs import SequenceLogps
from lit_align.model.reference_cache import attach_reference_logps
from lit_align.report.model_card import (
    METRICS_KEY,
    RunRecord,
    final_metrics,
    record_from_trainer,
    run_files,
    settings_config,
)
from lit_align.runtime.rng import RNG_STATES_KEY, rng_state, set_rng_state
from lit_align.runtime.trainer import (
    destroy_process_group_at_exit,
    distributed,
    quiet_eval_mode_warning_for_frozen_modules,
    restore_eval_mode_warning,
    validate_the_last_step,
)
from lit_align.settings import (
    ModelSettings,
    OptimizerSettings,
    as_settings,
    check_arguments,
)

PROGRESS_BAR = {"loss", "rewards/accuracies", "rewards/margins", "objective/scores"}
"""Metrics shown in the progress bar (train and val): the loss, preference accuracy and margin, an
on-policy method's mean reward."""
log = logging.getLogger(__name__)


class AlignmentModule(LightningModule):
    """Shared machinery of every method.

    Args:
        model: the causal LM, LoRA/QLoRA and reference source.
        optimizer: AdamW and learning-rate schedule.
    """

    needs_reference: ClassVar[bool] = True
    """Whether the objective uses reference log-probs (False: no reference is ever built)."""
    data_layouts: ClassVar[tuple[type[Layout], ...]] = (PairLayout,)
    """The data layouts (:mod:`lit_align.data.collate`) this method trains on."""
    data_module_name: ClassVar[str] = "lit_align.data.PreferenceDataModule"
    """The data module to name in the error when the configured one has another layout."""
    headline_metric: ClassVar[str] = "val/rewards/accuracies"
    """Held-out metric the CLI prints before and after fit."""
    hparams_ignore: ClassVar[tuple[str, ...]] = ()
    """Constructor arguments kept out of the checkpoint's hyper-parameters (e.g. reward functions
    holding a model: they are rebuilt from the config, not pickled)."""
    generates_held_out: ClassVar[bool] = False
    """Whether validation generates completions itself (on-policy methods): then it keeps the first
    :attr:`held_out_sample_limit` of them in :attr:`held_out_samples` for
    :class:`lit_align.callbacks.Samples` instead of the callback generating again."""
    runs_shared_prompts: ClassVar[bool] = False
    """Whether the policy and reference log-probs come from :meth:`Backbone.logps` over rows that
    share prompts, so ``model.prefix_sharing`` can run each prompt once (paired methods)."""
    exports_lora_adapter: ClassVar[bool] = True
    """Whether :meth:`export_hf` can write an adapter-only folder under LoRA (False: every export is
    a full model, so :class:`lit_align.callbacks.ExportHF` writes one folder)."""

    def __init__(self, model: ModelSettings = ModelSettings(), optimizer: OptimizerSettings = OptimizerSettings()):  # noqa: B008 (never mutated)
        super().__init__()
        self.save_hyperparameters(ignore=list(self.hparams_ignore))
        check_arguments(self, self.hparams)  # every setting of the whole class chain, before any model is loaded
        self.check_settings()
        self.model_settings = as_settings(model, ModelSettings)
        self.optimizer_settings = as_settings(optimizer, OptimizerSettings)
        if self.model_settings.prefix_sharing and not self.runs_shared_prompts:
            raise SettingError(
                None,
                "model.prefix_sharing",
                f"{type(self).__name__} does not score responses that share a prompt through one log-prob pass "
                "(prefix sharing is for paired methods: DPO and its variants, ORPO, SimPO, CPO, ...): remove "
                "model.prefix_sharing",
            )
        self.backbone = Backbone(self.model_settings, needs_reference=self.needs_reference, method=type(self).__name__)
        self.metrics = torch.nn.ModuleDict()
        self.current_batch: dict[str, torch.Tensor] | None = None
        """The batch of the step being run: objectives read per-example data columns from it (ODPO's scores)."""
        self._prefix_sharing_checked = False
        self._policy_is_initial = True  # False once trained or loaded: then no reference can be derived from it
        self._reference_attached = False
        self.served_data: ServedData | None = None
        """The data module's answer to :meth:`data_request` (None with data that is not a lit-align data module)."""
        self._rng_to_restore: list[dict[str, Any]] | None = None  # from a checkpoint; see on_train_start
        self._rng_epoch_ended = False  # whether that checkpoint had ended its epoch
        self._training_rng: dict[str, Any] | None = None  # as the last training step left it; see on_validation_end
        self._train_metric_names: list[str] = []  # the same on every process (see _log_global_step_means)
        self.held_out_samples: list[dict[str, Any]] | None = None
        """Completions kept during a validation for :class:`lit_align.callbacks.Samples` (None: none wanted)."""
        self.held_out_sample_limit = 0

    @property
    def tokenizer(self):
        return self.backbone.tokenizer

    def check_settings(self) -> None:
        """Refuse combinations of settings this method cannot use, e.g. a setting it would
        silently ignore (:class:`lit_align.errors.SettingError` naming it and what the method uses
        instead). Runs in the constructor after the range checks and before any model is loaded;
        reads the constructor arguments from ``self.hparams`` (nested settings as dataclasses or
        dicts). Nothing to refuse here; methods extend it."""

    # ---- what a data regime implements ---------------------------------------------------
    def step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        """Loss of ``batch`` (logging metrics under ``stage``: train, val or test)."""
        raise NotImplementedError

    # ---- shared machinery ------------------------------------------------------------------
    def reference_logps(self, batch: dict[str, torch.Tensor]) -> SequenceLogps:
        """Reference log-probs of the batch from the configured reference source."""
        return self.backbone.reference_logps(batch)

    @property
    def flops_per_batch(self) -> int | None:
        """Analytic FLOPs of the last batch, read by ThroughputMonitor; computed only when read."""
        if self.current_batch is None:
            return None
        return self.backbone.step_flops(self.current_batch, train=self.training)

    def export_hf(self, output_dir: str | os.PathLike, merge_lora: bool = False, run: RunRecord | None = None) -> Path:
        """Write the trained model and tokenizer to ``output_dir`` as a Hugging Face folder,
        atomically; here the policy (see :func:`lit_align.model.export.export_policy`). The folder
        also gets ``config.yaml`` and a model card (:mod:`lit_align.report.model_card`) of ``run``
        (default: what the module knows of its run, :meth:`run_record`)."""
        files = run_files(self, run or self.run_record(), merged_lora=merge_lora)
        return export_policy(self.backbone, output_dir, merge_lora=merge_lora, extra_files=files)

    def run_record(self) -> RunRecord:
        """The configuration and final metrics of the run training this module: from its trainer
        when it has one, else its own settings."""
        trainer = self._trainer
        if trainer is not None:
            return record_from_trainer(trainer, self)
        return RunRecord(settings_config(type(self), self.hparams, None))

    def decode(self, batch: dict[str, torch.Tensor]) -> list[str]:
        """The labelled tokens of each row of ``batch`` (its responses) as text, special tokens removed."""
        labels = batch["labels"]
        return [self.tokenizer.decode(row[row != -100].tolist(), skip_special_tokens=True) for row in labels]

    def log_metrics(self, stage: str, values: dict[str, torch.Tensor], batch_size: int) -> None:
        """Accumulate per-example ``values`` in torchmetrics means, logged as ``{stage}/{name}``
        (per step in training, per epoch otherwise). Means are over the examples of all processes:
        exact (sums and counts are reduced, not means of means). Empty tensors are skipped."""
        if stage == "train" and distributed(self):
            self._log_global_step_means(values, batch_size)
            return
        for name, value in values.items():
            if value.numel() == 0:
                continue
            key = f"{stage}/{name}"
            slot = key.replace("/", "__")
            if slot not in self.metrics:  # created on first use; never as inference tensors
                with torch.inference_mode(False):
                    self.metrics[slot] = MeanMetric().to(self.device)
            metric = self.metrics[slot]
            metric(value.float())  # forward: accumulates and keeps the batch value for on_step logging
            on_step = stage == "train"
            self.log(
                key,
                metric,
                on_step=on_step,
                on_epoch=not on_step,
                prog_bar=name in PROGRESS_BAR,
                batch_size=batch_size,
                metric_attribute=f"metrics.{slot}",
            )

    def _log_global_step_means(self, values: dict[str, torch.Tensor], batch_size: int) -> None:
        """Training step means over the examples of every process: one all-reduce of (sum, count)
        per metric name, counting 0 where a process has no value. The names are the union over
        processes (a metric may exist on one process only, e.g. a margin that needs both classes in
        the batch); they are exchanged only on a step where some process has a name not seen before
        (one boolean all-reduce otherwise)."""
        known = self._train_metric_names
        if self.trainer.strategy.reduce_boolean_decision(not set(values) <= set(known), all=False):
            gathered: list[list[str] | None] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, sorted(values))
            known[:] = sorted(set(known).union(*gathered))
        empty = torch.zeros(0, device=self.device)
        totals = torch.stack(
            [
                torch.stack(
                    [
                        values.get(n, empty).detach().float().sum(),
                        torch.tensor(float(values.get(n, empty).numel()), device=self.device),
                    ]
                )
                for n in known
            ]
        )
        totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        for name, (total, count) in zip(known, totals, strict=True):
            if count > 0:
                self.log(
                    f"train/{name}",
                    total / count,
                    on_step=True,
                    on_epoch=False,
                    prog_bar=name in PROGRESS_BAR,
                    batch_size=batch_size,
                )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self._policy_is_initial = False
        self.current_batch = batch
        return self.step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.current_batch = batch
        self.step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.current_batch = batch
        self.step(batch, "test")

    def configure_optimizers(self):
        settings = self.optimizer_settings
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = build_optimizer(params, settings, self.device)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = get_scheduler(
            settings.schedule, optimizer, num_warmup_steps=int(settings.warmup_ratio * total), num_training_steps=total
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """Lightning's step, then the gradients freed. Lightning's closure runs the next
        ``training_step``'s forward before it zeroes the gradients (forward, zero_grad, backward), so
        without this the previous step's gradients (a full fine-tune: one more copy of the trained
        weights) stay allocated through every forward pass and raise the peak by their size."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        optimizer.zero_grad(set_to_none=True)

    # ---- the data contract: request at setup; cached reference and packing before the first batch ----
    def data_request(self) -> DataRequest:
        """What this method needs of its data (:mod:`lit_align.data.contract`); methods that need
        more (mismatched completions, class counts, ptx batches) extend it."""
        return DataRequest(
            method=type(self).__name__,
            layouts=self.data_layouts,
            data_modules=self.data_module_name,
            tokenizer=self.tokenizer,
            check_examples=self.check_examples,
        )

    def setup(self, stage: str) -> None:
        """Hand the data module this method's request and keep its answer (a lit-align data
        module; other data is used as it is, unchecked). Under a process group (which the strategy
        has started by now), see that it is destroyed at exit
        (:func:`lit_align.runtime.trainer.destroy_process_group_at_exit`)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            destroy_process_group_at_exit()
        datamodule = self.trainer.datamodule
        self.served_data = (
            datamodule.serve(self.data_request()) if isinstance(datamodule, AlignmentDataModule) else None
        )

    def on_fit_start(self) -> None:
        quiet_eval_mode_warning_for_frozen_modules(self)  # the reference's eval mode is meant
        self.prepare_data_for_method()

    def on_validation_start(self) -> None:
        self.prepare_data_for_method()

    def on_test_start(self) -> None:
        self.prepare_data_for_method()

    def prepare_data_for_method(self) -> None:
        """With the model in place: attach cached reference log-probs, settle packing."""
        self._attach_cached_reference()
        if self.served_data is not None:
            self.served_data.settle_packing(
                lambda: self.backbone.packing_isolates_sequences(self.device),
                self.backbone.settings.attn_implementation,
            )

    # ---- what the Throughput callback counts --------------------------------------------------
    def batch_samples(self, batch: dict[str, Any]) -> int:
        """Examples in ``batch``: pairs, completions, lists or prompts, as its layout counts them."""
        return self._layout().samples(batch)

    def batch_tokens(self, batch: dict[str, Any]) -> int:
        """Real (non-padding) tokens the policy processed for ``batch``."""
        return self._layout().tokens(batch)

    def _layout(self) -> Layout:
        return self.served_data.layout if self.served_data is not None else self.data_layouts[0]()

    # ---- what an objective needs of each record ----------------------------------------------
    def check_example(self, example: dict[str, Any]) -> tuple[str, str] | None:
        """``(field, problem)`` when this objective cannot train on ``example`` (a tokenized
        example: token ids and its numeric columns, e.g. ``score_chosen``), else None. Run on
        every example of every split before the first batch (:meth:`check_examples`), so a
        problem stops the run at the start instead of thousands of steps in. Accepts everything here."""
        return None

    def check_examples(self, split: str, source: str, examples: list[dict[str, Any]]) -> None:
        """Raise :class:`lit_align.data.DataError` naming the first example :meth:`check_example`
        refuses (its source, record and field) and how many of the split it refuses; objectives
        that need something of a whole split (e.g. at least one example of a class) extend it."""
        if type(self).check_example is AlignmentModule.check_example:
            return
        problems = [(example, found) for example in examples if (found := self.check_example(example)) is not None]
        if problems:
            example, (field, problem) = problems[0]
            raise DataError(
                source,
                f"{problem} ({len(problems)} of {len(examples)} {split} records have this problem)",
                example.get("record"),
                field,
            )

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Mark the policy as trained and keep the checkpoint's RNG states for :meth:`on_train_start`."""
        self._policy_is_initial = False
        self._rng_to_restore = checkpoint.get(RNG_STATES_KEY)

    def on_train_start(self) -> None:
        """When ``fit`` resumes from a checkpoint, the random-number generators are put back as they
        were when it was saved (torch CPU and CUDA, Python ``random``, NumPy; one state per process)
        just before the first resumed batch (:meth:`on_train_batch_start`).

        Lightning restores weights, optimizer, schedulers and loop counters but not RNG states. They
        are restored as late as possible: after the train loader's iterator was created
        (``DataLoader.__iter__`` draws a seed from the torch RNG; a fit resumed mid-epoch creates it
        after this hook), so a sampling method (dropout, on-policy generation) draws what an
        uninterrupted run would. When the checkpoint ended an epoch, the uninterrupted run would
        create the next epoch's iterator (one such draw) before its next batch: that one draw is
        repeated after the states. Whether it had ended one is read here, as restored.

        (Lightning has checked the modules' modes by now: its eval-mode warning is back on.)"""
        restore_eval_mode_warning()
        if not self._rng_to_restore or not self.trainer.ckpt_path:
            self._rng_to_restore = None
            return
        self._rng_epoch_ended = self.trainer.is_last_batch

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """The first batch of a resumed fit: the checkpoint's RNG states (:meth:`on_train_start`)."""
        states, self._rng_to_restore = self._rng_to_restore, None
        if not states:
            return
        set_rng_state(states[self.global_rank % len(states)])
        if self._rng_epoch_ended:
            torch.empty((), dtype=torch.int64).random_()  # as DataLoader.__iter__ does (loader.generator is None)

    def _attach_cached_reference(self) -> None:
        """With ``reference: cached``, attach stored (or compute once) reference log-probs."""
        if not self.backbone.reference_source.precomputed or self._reference_attached:
            return
        datamodule = self.trainer.datamodule
        if not isinstance(datamodule, AlignmentDataModule):
            raise SettingError(
                None,
                "model.reference",
                "model.reference=cached needs a lit-align data module (it stores the log-probs with the tokenized "
                "data)",
            )
        attach_reference_logps(
            self.backbone, datamodule, self._policy_is_initial, self.device, self.trainer.is_global_zero
        )
        self._reference_attached = True

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Remember the random-number generators as this step left them (:meth:`on_validation_end`),
        and have the step that ends fit validated (:func:`validate_the_last_step`)."""
        self._training_rng = rng_state()
        validate_the_last_step(self.trainer, batch_idx)

    def on_validation_end(self) -> None:
        """During fit, put the random-number generators back as the last training step left them:
        a validation draws from them (its loader's seed, on-policy sampling), and without this how
        often it runs would change what training samples next, and a run resumed from a checkpoint
        (which stores the training state, :meth:`on_save_checkpoint`) would not repeat the
        uninterrupted one."""
        if self._training_rng is not None and self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            set_rng_state(self._training_rng)
            self._training_rng = None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Record the class so ``lit-align export`` can rebuild the module from the file alone, and
        every process's RNG states so a resumed run samples as an uninterrupted one
        (see :meth:`on_train_start`). Lightning calls this on every process when saving, so the
        states of all processes are gathered here."""
        checkpoint["lit_align_class"] = f"{type(self).__module__}:{type(self).__qualname__}"
        if self._trainer is not None:  # for the model card of an export made from this checkpoint
            checkpoint[METRICS_KEY] = final_metrics(self.trainer.callback_metrics)
        # saved by a validation during fit (the default ModelCheckpoint's moment): the states
        # training goes on with (:meth:`on_validation_end`), not the ones validation left
        during_validation = self._trainer is not None and self.trainer.validating and self._training_rng is not None
        state = self._training_rng if during_validation else rng_state()
        if (
            torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1
        ):
            states: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, state)
        else:
            states = [state]
        checkpoint[RNG_STATES_KEY] = states
