"""The Lightning internals lit-align relies on (listed in lit_align/runtime/lightning_internals.py)
are still there and still do what lit-align relies on: an upgrade that changes one fails here,
with the internal named."""

from __future__ import annotations

import importlib.util
import inspect
import re
import signal
import warnings
from pathlib import Path

import lightning
import pytest
import torch
from conftest import quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ThroughputMonitor
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from lightning.pytorch.loops import fit_loop, training_epoch_loop
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from lit_align.callbacks import Throughput
from lit_align.data import PreferenceDataModule
from lit_align.data.sampling import GlobalBatchOrder, ResumableLoader
from lit_align.methods import DPO, SFT
from lit_align.runtime import lightning_internals as internals

ROOT = Path(__file__).resolve().parents[1]


def changed(internal: str, use: str) -> str:
    return (
        f"Lightning {lightning.__version__} changed {internal}, which {use}: adapt "
        "lit_align/runtime/lightning_internals.py (and its list) or bound the lightning requirement"
    )


def trainer(tmp_path: Path, **kwargs) -> lightning.Trainer:
    settings = dict(accelerator="cpu", limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=tmp_path)
    return quiet_trainer(**{**settings, **kwargs})


def test_installed_lightning_is_in_the_tested_range_pyproject_requires():
    (requirement,) = re.findall(r'^\s*"(lightning[<>=!~ ].*?)",', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    tested = SpecifierSet(",".join(internals.TESTED_LIGHTNING))
    assert SpecifierSet(requirement.removeprefix("lightning")) == tested, (requirement, tested)
    assert Version(lightning.__version__) in tested, (
        f"lightning {lightning.__version__} is outside the tested range {tested}: run this file and the "
        "resume tests with it, then widen TESTED_LIGHTNING and pyproject.toml together"
    )


# ---- 1, 2: FSDPStrategy._setup_model and _activation_checkpointing_kwargs --------------------------
def test_fsdp_strategy_still_wraps_the_model_in_setup_model():
    message = changed("FSDPStrategy._setup_model(model)", "lit_align.runtime.strategies.FSDPStrategy overrides")
    assert "_setup_model" in vars(FSDPStrategy), message
    assert list(inspect.signature(FSDPStrategy._setup_model).parameters) == ["self", "model"], message
    assert "self._setup_model(" in inspect.getsource(FSDPStrategy.setup), message  # where Lightning wraps
    wrapped = []

    class Recording(internals.FSDPStrategyBase):
        def wrap_model(self, model):
            wrapped.append(model)
            return model

    model = torch.nn.Linear(2, 2)
    assert Recording()._setup_model(model) is model and wrapped == [model]


def test_fsdp_strategy_keeps_activation_checkpointing_settings_and_the_attributes_used_to_wrap():
    message = changed("FSDPStrategy._activation_checkpointing_kwargs", "FSDPStrategy(checkpoint_layers=True) sets")
    strategy = internals.FSDPStrategyBase()
    assert strategy.activation_checkpointing_kwargs == {}, message
    assert (
        "auto_wrap_policy"
        in internals.FSDPStrategyBase(activation_checkpointing_policy={torch.nn.Linear}).activation_checkpointing_kwargs
    ), message
    strategy.activation_checkpointing_kwargs = {"check_fn": bool}
    assert strategy._activation_checkpointing_kwargs == {"check_fn": bool}, message
    # public attributes (no underscore, but undocumented) the CPU wrapping passes to FullyShardedDataParallel
    for name in ("kwargs", "cpu_offload", "mixed_precision_config", "sharding_strategy"):
        assert hasattr(strategy, name), changed(f"FSDPStrategy.{name}", "the CPU wrapping passes to FSDP")


# ---- 3: _setup_activation_checkpointing ------------------------------------------------------------
def test_setup_activation_checkpointing_wraps_the_chosen_layers():
    from lightning.pytorch.strategies import fsdp
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    message = changed(
        "lightning.pytorch.strategies.fsdp._setup_activation_checkpointing(module, activation_checkpointing_kwargs)",
        "the CPU FSDP wrapping calls",
    )
    assert list(inspect.signature(fsdp._setup_activation_checkpointing).parameters) == [
        "module",
        "activation_checkpointing_kwargs",
    ], message
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 2))
    internals.setup_activation_checkpointing(model, {"check_fn": lambda m: isinstance(m, torch.nn.Linear)})
    assert [type(m).__name__ for m in model.children()] == ["CheckpointWrapper", "ReLU", "CheckpointWrapper"], message
    assert isinstance(model[0], CheckpointWrapper)
    internals.setup_activation_checkpointing(model, {})  # empty settings: nothing happens
    assert model(torch.ones(1, 2)).shape == (1, 2)


# ---- 4: Trainer._signal_connector.received_sigterm -------------------------------------------------
def test_the_sigterm_flag_stops_fit_at_the_next_batch_boundary(tmp_path):
    message = changed("Trainer._signal_connector.received_sigterm", "SaveOnSigterm sets to stop every process")

    class StopAfterBatch2(lightning.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 1:
                internals.stop_as_on_sigterm(trainer)
                assert trainer.received_sigterm, message

    run = trainer(tmp_path, max_steps=10, callbacks=[StopAfterBatch2()])
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SIGTERMException):
            run.fit(BoringModel())
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert run.global_step == 2, message  # the batch running finished, no other started


# ---- 5: ThroughputMonitor._throughputs -------------------------------------------------------------
def test_throughput_monitor_meters_take_the_given_peak_flops(tmp_path):
    message = changed("ThroughputMonitor._throughputs", "Throughput(peak_flops=...) reads")
    run = trainer(tmp_path)
    run.state.fn, run.state.stage = TrainerFn.FITTING, RunningStage.TRAINING
    monitor = Throughput(peak_flops=123e9)
    monitor.setup(run, SFT(), "fit")  # a lit-align method: Throughput counts through it
    assert isinstance(monitor._throughputs, dict), message
    meters = internals.throughput_meters(monitor)
    assert meters and all(meter.available_flops == 123e9 for meter in meters), message
    assert isinstance(monitor, ThroughputMonitor)


# ---- 6: RichProgressBar._get_train_description ------------------------------------------------------
def test_the_rich_bar_labels_training_through_get_train_description(tmp_path):
    """With max_steps and no max_epochs the epochs are unlimited (-1); the training bar's label,
    which Lightning still takes from _get_train_description, names the epoch without a total."""
    message = changed("RichProgressBar._get_train_description", "RichProgressBarUnlimitedEpochs overrides")
    labels = []

    class Recording(internals.RichProgressBarUnlimitedEpochs):
        def _get_train_description(self, current_epoch: int) -> str:
            labels.append(super()._get_train_description(current_epoch))
            return labels[-1]

    run = trainer(tmp_path, max_steps=7, limit_train_batches=4, enable_progress_bar=True, callbacks=[Recording()])
    run.fit(BoringModel())
    assert run.max_epochs == -1, run.max_epochs
    assert [label.strip() for label in labels] == ["Epoch 0", "Epoch 1"], message
    labels.clear()
    trainer(tmp_path, max_epochs=2, limit_train_batches=2, enable_progress_bar=True, callbacks=[Recording()]).fit(
        BoringModel()
    )
    assert [label.strip() for label in labels] == ["Epoch 0/1", "Epoch 1/1"], message  # a real total is kept


# ---- behaviour of public APIs that lit-align relies on ---------------------------------------------
class CountedBoring(BoringModel):
    """BoringModel on a ResumableLoader; checks at every batch end how many batches it handed out."""

    def __init__(self):
        super().__init__()
        self.handed_out: list[tuple[int, int]] = []

    def train_dataloader(self):
        self.loader = ResumableLoader(RandomDataset(32, 40), batch_size=4, sampler=GlobalBatchOrder(40, 4))
        return self.loader

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.handed_out.append((batch_idx, self.loader.batches_out))


def test_lightning_fetches_no_batch_ahead_from_a_loader_with_a_length(tmp_path):
    """At every checkpoint point the loader has handed out exactly the batches trained: the
    position ResumableLoader saves. Lightning prefetches one batch only from loaders without a length."""
    model = CountedBoring()
    trainer(tmp_path, max_steps=15).fit(model)
    assert model.handed_out == [(i % 10, i % 10 + 1) for i in range(15)], changed(
        "the prefetching of sized train loaders (_PrefetchDataFetcher)", "ResumableLoader's saved position counts on"
    )


def test_is_last_batch_at_train_start_of_a_resumed_fit_is_the_checkpoints(tmp_path):
    """AlignmentModule.on_train_start reads Trainer.is_last_batch to know whether the checkpoint had
    ended its epoch (then it repeats the next epoch's loader RNG draw)."""
    seen = []

    class Probe(CountedBoring):  # 10 batches an epoch
        def on_train_start(self):
            seen.append(self.trainer.is_last_batch)

    every_step = ModelCheckpoint(dirpath=tmp_path / "steps", every_n_train_steps=1, save_top_k=-1)
    epoch_end = ModelCheckpoint(
        dirpath=tmp_path / "ends", save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True
    )
    trainer(tmp_path, max_steps=14, enable_checkpointing=True, callbacks=[every_step, epoch_end]).fit(Probe())
    for path, ended in [
        (tmp_path / "steps" / "epoch=0-step=4.ckpt", False),  # mid-epoch
        (tmp_path / "steps" / "epoch=0-step=10.ckpt", True),  # after the epoch's last batch
        (tmp_path / "ends" / "epoch=0-step=10.ckpt", True),  # at the epoch's end
    ]:
        trainer(tmp_path, max_steps=14).fit(Probe(), ckpt_path=path)
        assert seen[-1] is ended, changed("Trainer.is_last_batch at on_train_start of a resumed fit", "lit-align reads")


@pytest.mark.parametrize("stop_at, validated", [(3, [2, 3]), (4, [2, 4])])
def test_a_step_that_sets_should_stop_is_validated_once(tmp_path, stop_at, validated):
    """validate_the_last_step (lit_align/runtime/trainer.py) sets Trainer.should_stop at the step that
    ends fit so that Lightning validates it: a step that sets it is validated, once when a
    validation was due there anyway, and fit ends after it."""
    seen = []

    class Stopping(BoringModel):
        def on_train_batch_end(self, outputs, batch, batch_idx):
            if self.trainer.global_step == stop_at:
                self.trainer.should_stop = True

        def on_validation_end(self):
            seen.append(self.trainer.global_step)

    run = trainer(tmp_path, max_steps=10, val_check_interval=2, check_val_every_n_epoch=None, limit_val_batches=1)
    run.fit(Stopping())
    assert (seen, run.global_step) == (validated, stop_at), changed(
        "whether a training step that sets Trainer.should_stop is validated", "lit-align's last-step validation uses"
    )


@pytest.mark.parametrize(
    "limits, validated",
    [
        (dict(max_steps=5, val_check_interval=2, check_val_every_n_epoch=None), [2, 4, 5]),
        (dict(max_epochs=2, limit_train_batches=5, val_check_interval=3), [3, 8, 10]),
    ],
)
def test_lit_align_validates_the_step_that_ends_fit(tmp_path, limits, validated):
    """The step that ends fit (max_steps, or the last batch of the last epoch) is validated even
    between two scheduled validations (the first epoch's end, step 5, is not: only the end of fit)."""
    seen = []

    class Recorded(DPO):
        def on_validation_end(self):
            super().on_validation_end()
            seen.append(self.trainer.global_step)

    trainer(tmp_path, limit_val_batches=1, **limits).fit(Recorded(), datamodule=PreferenceDataModule(max_length=64))
    assert seen == validated


def test_the_not_resumable_warning_lit_align_fit_silences_is_still_worded_so():
    assert "You're resuming from a checkpoint that ended before the epoch ended" in inspect.getsource(
        training_epoch_loop
    ), changed("the wording of the 'not resumable' resume warning", "lit-align fit silences by its text")


def test_the_eval_mode_warning_is_silenced_only_when_every_module_in_eval_mode_is_frozen(tmp_path):
    """A frozen reference is in eval mode on purpose: no Lightning warning for it; a policy left in
    eval mode still gets the warning; no filter outlives the fit."""

    def warnings_of_a_fit(method) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer(tmp_path, max_steps=1).fit(method, datamodule=PreferenceDataModule(max_length=64, batch_size=4))
        assert not [entry for entry in warnings.filters if "eval mode" in getattr(entry[1], "pattern", "")]
        messages = [str(warning.message) for warning in caught]
        return [message for message in messages if "in eval mode at the start of training" in message]

    assert "in eval mode at the start of training" in inspect.getsource(fit_loop), changed(
        "the wording of the eval-mode warning at the start of fit", "lit-align silences by its text for frozen modules"
    )
    with_reference = DPO(model={"reference": "copy"})
    assert not with_reference.backbone.reference.training
    assert warnings_of_a_fit(with_reference) == []
    policy_in_eval_mode = DPO(model={"reference": "copy"})
    policy_in_eval_mode.backbone.policy.eval()
    assert len(warnings_of_a_fit(policy_in_eval_mode)) == 1


def test_the_documented_checkpoint_converter_is_there():
    assert importlib.util.find_spec("lightning.pytorch.utilities.consolidate_checkpoint") is not None, changed(
        "python -m lightning.pytorch.utilities.consolidate_checkpoint", "lit-align export runs on sharded checkpoints"
    )
