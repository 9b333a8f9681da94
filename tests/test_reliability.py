"""Reliability: exact resume after SIGKILL or SIGTERM, non-finite losses, atomic outputs.

The resume tests run ``configs/dpo.yaml`` through the CLI in subprocesses (one thread each, so runs
are bitwise reproducible) with a DPO subclass whose loss is scaled by noise drawn from torch,
Python ``random`` and NumPy: a resumed run matches the uninterrupted one only if both the data
order and the RNG states are restored. The built-in task has 80 training pairs (5 batches of 16 per
epoch), runs 12 steps and never validates, so the runs cross two epoch boundaries.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import inspect
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import quiet_trainer

from lit_align.callbacks import ExportHF, NonFiniteLoss, SaveOnSigterm
from lit_align.callbacks.reliability import nonfinite_loss_message
from lit_align.data import PreferenceDataModule, WordRulesTask
from lit_align.methods import DPO
from lit_align.model.tiny import build_tiny_tokenizer
from lit_align.runtime.atomic import AtomicCheckpointIO, atomic_torch_save, load_or_none
from lit_align.settings import OptimizerSettings

ROOT = Path(__file__).resolve().parents[1]
DPO_YAML = ROOT / "configs" / "dpo.yaml"
MAX_STEPS = 12
STEPS_PER_EPOCH = 5

HELPERS = '''
"""Test helpers imported by the CLI subprocesses of tests/test_reliability.py."""
import os
import random
import signal

import numpy as np
import torch
from lightning import Callback

from lit_align.methods import DPO
from lit_align.model.tiny import build_tiny_tokenizer


class NoisyDPO(DPO):
    """DPO whose per-pair losses are scaled by noise from torch, random and numpy (a stand-in for a
    method that samples: it resumes exactly only if the RNG states do)."""

    def loss(self, chosen, rejected, ref_chosen, ref_rejected):
        out = super().loss(chosen, rejected, ref_chosen, ref_rejected)
        noise = 0.5 * torch.rand(out.losses.shape) + random.random() + float(np.random.rand())
        return out._replace(losses=out.losses * noise)


class SigtermAt(Callback):
    """Sends SIGTERM to this process when the batch of optimizer step ``step`` starts."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)
'''


# ---- CLI subprocess helpers -------------------------------------------------------------------
@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reliability")
    (folder / "helpers").mkdir()
    (folder / "helpers" / "reliability_helpers.py").write_text(HELPERS)
    return folder


def cli_env(workspace: Path) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(ROOT), str(workspace / "helpers"), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, OMP_NUM_THREADS="1", LIT_ALIGN_CACHE=str(workspace / "cache"), PYTHONPATH=path)


def fit_command(*extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "lit_align.cli",
        "fit",
        "--config",
        str(DPO_YAML),
        "--model.class_path",
        "reliability_helpers.NoisyDPO",
        "--data.init_args.task.num_train",
        "80",
        "--trainer.max_steps",
        str(MAX_STEPS),
        "--trainer.val_check_interval",
        "1000",
        "--validate_before_fit",
        "false",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.logger.init_args.flush_logs_every_n_steps",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        *extra,
    ]


def every_step_checkpoints(folder: Path) -> list[str]:
    return [
        "--trainer.callbacks+=ModelCheckpoint",
        "--trainer.callbacks.dirpath",
        str(folder),
        "--trainer.callbacks.every_n_train_steps",
        "1",
        "--trainer.callbacks.save_top_k",
        "-1",
        "--trainer.callbacks.save_last",
        "true",
    ]


def start(workspace: Path, name: str, *extra: str) -> tuple[subprocess.Popen, Path]:
    cwd = workspace / name
    cwd.mkdir()
    with open(cwd / "output.txt", "w") as log:
        process = subprocess.Popen(
            fit_command(*extra), cwd=cwd, env=cli_env(workspace), stdout=log, stderr=subprocess.STDOUT
        )
    return process, cwd


def run(workspace: Path, name: str, *extra: str, expect: int = 0) -> Path:
    process, cwd = start(workspace, name, *extra)
    code = process.wait(timeout=600)
    assert code == expect, (cwd / "output.txt").read_text()[-4000:]
    return cwd


def train_metrics(cwd: Path) -> dict[int, tuple[float, float]]:
    """step -> (train/loss, train/rewards/accuracies) of the run in ``cwd``."""
    (path,) = (cwd / "runs").rglob("metrics.csv")
    with open(path) as handle:
        return {
            int(row["step"]): (float(row["train/loss"]), float(row["train/rewards/accuracies"]))
            for row in csv.DictReader(handle)
            if row.get("train/loss")
        }


def assert_continues_reference(resumed: dict, reference: dict, first_step: int) -> None:
    assert sorted(resumed) == list(range(first_step, MAX_STEPS)), sorted(resumed)
    for step, values in resumed.items():
        assert values == pytest.approx(reference[step], rel=1e-6, abs=1e-7), (step, values, reference[step])


def checkpoint_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


@pytest.fixture(scope="module")
def reference(workspace):
    """The uninterrupted run (a checkpoint every step in reference/ckpts): its per-step metrics."""
    cwd = run(workspace, "reference", *every_step_checkpoints(workspace / "reference-ckpts"))
    metrics = train_metrics(cwd)
    assert sorted(metrics) == list(range(MAX_STEPS))
    return SimpleNamespace(metrics=metrics, checkpoints=workspace / "reference-ckpts")


# ---- 1. exact resume after SIGKILL, and at an epoch boundary ---------------------------------
@pytest.mark.slow
def test_sigkill_then_resume_from_last_matches_the_uninterrupted_run(workspace, reference):
    checkpoints = workspace / "kill-ckpts"
    process, cwd = start(workspace, "killed", *every_step_checkpoints(checkpoints))
    wanted = checkpoints / "epoch=1-step=7.ckpt"  # mid-epoch (epoch 1 has steps 5..9)
    deadline = time.monotonic() + 300
    while not wanted.exists():
        assert process.poll() is None, (cwd / "output.txt").read_text()[-4000:]
        assert time.monotonic() < deadline, "no checkpoint for step 7"
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    # ModelCheckpoint writes epoch=1-step=7.ckpt, then last.ckpt: last is step 6 if the kill landed
    # in between, 7, or later if training went on before the kill landed
    resumed_from = checkpoint_step(checkpoints / "last.ckpt")
    assert 6 <= resumed_from < MAX_STEPS

    cwd = run(workspace, "resumed-after-kill", *every_step_checkpoints(checkpoints), "--ckpt_path", "last")
    assert "Restored all states" in (cwd / "output.txt").read_text()
    assert_continues_reference(train_metrics(cwd), reference.metrics, first_step=resumed_from)


@pytest.mark.slow
def test_resume_from_the_last_batch_of_an_epoch_matches_the_uninterrupted_run(workspace, reference):
    """A checkpoint written in on_train_batch_end of an epoch's last batch: the resumed run must
    start the next epoch from its first batch (and draw what the uninterrupted run drew)."""
    path = reference.checkpoints / f"epoch=0-step={STEPS_PER_EPOCH}.ckpt"
    cwd = run(workspace, "resumed-at-epoch-end", "--ckpt_path", str(path))
    assert_continues_reference(train_metrics(cwd), reference.metrics, first_step=STEPS_PER_EPOCH)


class BatchRecorder(L.LightningModule):
    """Records a fingerprint of every training batch; its configure_optimizers reads
    estimated_stepping_batches, as AlignmentModule's does (in an epoch-based run Lightning then
    builds and iterates the train loader before it restores a checkpoint)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.tokenizer = build_tiny_tokenizer()
        self.seen: list[tuple[int, str]] = []

    def training_step(self, batch, batch_idx):
        digest = hashlib.sha1(batch["input_ids"].numpy().tobytes()).hexdigest()[:12]
        self.seen.append((self.current_epoch, digest))
        return self.weight * batch["input_ids"].float().mean()

    def configure_optimizers(self):
        assert self.trainer.estimated_stepping_batches > 0
        return torch.optim.SGD([self.weight], lr=0.1)


def record_batches(tmp_path: Path, num_workers: int, limits: dict, ckpt_path=None, callbacks=()) -> list:
    module = BatchRecorder()
    data = PreferenceDataModule(
        batch_size=4, max_length=48, num_workers=num_workers, task=WordRulesTask(num_train=24, num_val=4)
    )
    data.tokenizer = module.tokenizer  # a plain LightningModule serves no data request: the tokenizer is given
    trainer = quiet_trainer(
        **limits,
        enable_checkpointing=bool(callbacks),
        callbacks=list(callbacks),
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    # the data module's hyper-parameters hold a WordRulesTask, which a weights_only load refuses
    # (Lightning 2.6 loads weights_only unless told; 2.4 and 2.5 have no such argument and load everything)
    loading = {"weights_only": False} if "weights_only" in inspect.signature(L.Trainer.fit).parameters else {}
    trainer.fit(module, data, ckpt_path=ckpt_path, **loading)
    return module.seen


@pytest.mark.parametrize("num_workers", [0, 1])
@pytest.mark.parametrize("limits", [{"max_steps": 14}, {"max_epochs": 3}], ids=["max_steps", "max_epochs"])
def test_resumed_fit_sees_the_batches_of_the_uninterrupted_one(tmp_path, limits, num_workers):
    """24 pairs in batches of 4: 6 steps per epoch. Resumed from a mid-epoch checkpoint, from one
    written after an epoch's last batch, and from one written at the end of an epoch, a fit trains
    on exactly the batches the uninterrupted fit trained on from there (the train loader's position
    travels in the data module's checkpoint state), also in an epoch-based run (Lightning builds
    the train loader before it restores the checkpoint) and with a worker process (which takes
    the order when Lightning creates the iterator, before it sets the epoch)."""
    every_step = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "steps", every_n_train_steps=1, save_top_k=-1)
    epoch_end = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "epochs", save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True
    )
    reference = record_batches(tmp_path, num_workers, limits, callbacks=[every_step, epoch_end])
    assert len(reference) == (14 if "max_steps" in limits else 18) and len(set(reference)) == len(reference)
    checkpoints = [
        (tmp_path / "steps" / "epoch=1-step=9.ckpt", (1, 3)),  # mid-epoch
        (tmp_path / "steps" / "epoch=0-step=6.ckpt", (0, 6)),  # after the epoch's last batch
    ]
    if "max_epochs" in limits:
        # at the epoch's end (on_train_epoch_end); with max_steps, Lightning 2.6 itself resumes
        # such a checkpoint wrongly (one batch of the next epoch, then a new epoch), whatever the data
        checkpoints.append((tmp_path / "epochs" / "epoch=0-step=6.ckpt", (0, 6)))
    for path, position in checkpoints:
        saved = torch.load(path, weights_only=False)["PreferenceDataModule"]["train_position"]
        assert (saved["epoch"], saved["batches"]) == position
        done = 6 * position[0] + position[1]
        assert record_batches(tmp_path, num_workers, limits, ckpt_path=path) == reference[done:], path


@pytest.mark.slow
def test_epoch_based_run_resumes_mid_epoch_exactly(workspace):
    """max_epochs instead of max_steps: Lightning then builds and iterates the train loader (for
    the scheduler's estimated_stepping_batches) before it restores the checkpoint; a run resumed
    mid-epoch still continues the uninterrupted one, step for step."""
    epochs = ["--trainer.max_steps", "-1", "--trainer.max_epochs", "3"]
    checkpoints = workspace / "epochs-ckpts"
    reference = train_metrics(run(workspace, "epochs-reference", *every_step_checkpoints(checkpoints), *epochs))
    assert sorted(reference) == list(range(3 * STEPS_PER_EPOCH))
    resumed = train_metrics(
        run(workspace, "epochs-resumed", *epochs, "--ckpt_path", str(checkpoints / "epoch=1-step=7.ckpt"))
    )
    assert sorted(resumed) == list(range(7, 3 * STEPS_PER_EPOCH))
    for step, values in resumed.items():
        assert values == pytest.approx(reference[step], rel=1e-6, abs=1e-7), (step, values, reference[step])


def test_checkpoints_carry_every_rng_state(tmp_path):
    """Lightning (2.6) saves no RNG state; lit-align modules add torch, random and numpy states."""
    module = DPO()
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, PreferenceDataModule(batch_size=4, max_length=48, task=WordRulesTask(num_train=8, num_val=4)))
    trainer.save_checkpoint(tmp_path / "x.ckpt")
    (state,) = torch.load(tmp_path / "x.ckpt", weights_only=False)["lit_align_rng_states"]
    assert {"torch", "python", "numpy"} <= set(state)


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    """Saved, loaded with weights_only=True and set back, every generator draws what it drew."""
    import random

    import numpy as np

    from lit_align.runtime.rng import rng_state, set_rng_state

    torch.save({"states": [rng_state()]}, tmp_path / "rng.pt")
    drawn = (torch.rand(3), random.random(), np.random.rand())
    (state,) = torch.load(tmp_path / "rng.pt", weights_only=True)["states"]
    set_rng_state(state)
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(drawn[0], again[0]) and drawn[1:] == again[1:]


# ---- 2. SIGTERM: a checkpoint at the next batch boundary, exit status 143 ----------------------
@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_at_the_next_batch_boundary_and_resumes_exactly(workspace, reference):
    cwd = run(
        workspace,
        "terminated",
        "--trainer.callbacks+=reliability_helpers.SigtermAt",
        "--trainer.callbacks.step",
        "7",
        expect=128 + signal.SIGTERM,
    )
    output = (cwd / "output.txt").read_text()
    (saved,) = (cwd / "runs").rglob("last.ckpt")  # the default ModelCheckpoint's folder
    assert f"SIGTERM: saved {saved.relative_to(cwd)} at step 8" in output
    assert "Traceback" not in output
    checkpoint = torch.load(saved, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 8  # the batch running when SIGTERM arrived finished, no other started
    # the data module's position: epoch 1 had handed out its first 3 batches, no fourth was fetched
    assert checkpoint["PreferenceDataModule"]["train_position"] == {"epoch": 1, "batches": 8 - STEPS_PER_EPOCH}
    assert sorted(train_metrics(cwd)) == list(range(8))  # every finished step was logged
    assert train_metrics(cwd) == {step: reference.metrics[step] for step in range(8)}

    resumed = run(workspace, "resumed-after-sigterm", "--ckpt_path", str(saved))
    assert_continues_reference(train_metrics(resumed), reference.metrics, first_step=8)


def built_cli(*args: str):
    """``lit-align fit --config configs/dpo.yaml ARGS``'s CLI object, built but not run."""
    from lit_align.cli import TRAINER_DEFAULTS, LitAlignCLI
    from lit_align.data.datamodule import PreferenceDataModule as Base
    from lit_align.methods.alignment import AlignmentModule

    return LitAlignCLI(
        AlignmentModule,
        Base,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        trainer_defaults=TRAINER_DEFAULTS,
        run=False,
        args=["--config", str(DPO_YAML), *args],
    )


def test_cli_adds_the_reliability_callbacks_without_duplicating_configured_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def callbacks(*args):
        return built_cli(*args).trainer.callbacks

    default = callbacks()
    assert [type(c) for c in default].count(SaveOnSigterm) == 1
    (guard,) = [c for c in default if isinstance(c, NonFiniteLoss)]
    assert guard.action == "stop"
    (guard,) = [c for c in callbacks("--nonfinite_loss", "skip") if isinstance(c, NonFiniteLoss)]
    assert guard.action == "skip"
    configured = callbacks(
        "--trainer.callbacks+=lit_align.callbacks.NonFiniteLoss",
        "--trainer.callbacks.max_skipped",
        "3",
        "--trainer.callbacks+=ExportHF",
        "--trainer.callbacks.output_dir",
        str(tmp_path / "out"),
    )
    (guard,) = [c for c in configured if isinstance(c, NonFiniteLoss)]
    assert guard.max_skipped == 3
    assert any(isinstance(c, ExportHF) for c in configured)
    assert [type(c) for c in configured].count(SaveOnSigterm) == 1
    cli = built_cli()
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_cli_labels_the_progress_bar_without_a_negative_epoch_total(tmp_path, monkeypatch):
    """A max_steps run (epochs unlimited) gets lit-align's Rich bar, labelled "Epoch 1", not
    Lightning 2.6's "Epoch 1/-2"; a configured bar, or --trainer.enable_progress_bar false, is kept."""
    from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar

    from lit_align.runtime.lightning_internals import RichProgressBarUnlimitedEpochs

    monkeypatch.chdir(tmp_path)

    def bars(*args):
        trainer = built_cli("--trainer.max_steps", "5", *args).trainer
        return trainer, [c for c in trainer.callbacks if isinstance(c, ProgressBar)]

    run, (bar,) = bars("--trainer.enable_progress_bar", "true")  # its label: test_lightning_internals.py
    assert type(bar) is RichProgressBarUnlimitedEpochs and run.max_steps == 5
    _, (bar,) = bars("--trainer.callbacks+=TQDMProgressBar")
    assert type(bar) is TQDMProgressBar
    assert bars("--trainer.enable_progress_bar", "false")[1] == []


# ---- 3. non-finite losses ------------------------------------------------------------------------
class NaNDPO(DPO):
    """DPO whose training loss is NaN at optimizer step 3."""

    def loss(self, chosen, rejected, ref_chosen, ref_rejected):
        out = super().loss(chosen, rejected, ref_chosen, ref_rejected)
        if self.training and self.global_step == 3:
            out = out._replace(losses=out.losses * float("nan"))
        return out


class Snapshots(L.Callback):
    """Trainable weights before and after batch 3."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == 3:
            self.before = [p.detach().clone() for p in module.parameters() if p.requires_grad]

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx == 3:
            self.after = [p.detach().clone() for p in module.parameters() if p.requires_grad]


def nan_fit(tmp_path, guard, callbacks=(), logger=False, steps=6):
    L.seed_everything(0)
    module = NaNDPO(optimizer=OptimizerSettings(lr=1e-2))
    data = PreferenceDataModule(batch_size=4, max_length=48, task=WordRulesTask(num_train=64, num_val=4))
    checkpointing = any(isinstance(c, L.pytorch.callbacks.ModelCheckpoint) for c in callbacks)
    trainer = quiet_trainer(
        max_steps=steps,
        logger=logger,
        enable_checkpointing=checkpointing,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        default_root_dir=tmp_path,
        callbacks=[guard, *callbacks],
    )
    return module, trainer, data


def all_finite(module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


def test_nonfinite_loss_stop_names_step_and_batch_and_saves_nothing_after(tmp_path):
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=1, save_top_k=-1)
    module, trainer, data = nan_fit(tmp_path, NonFiniteLoss("stop"), [checkpoints, ExportHF(str(tmp_path / "export"))])
    with pytest.raises(
        FloatingPointError, match=r"^NaNDPO: non-finite loss nan at step 3 \(epoch 0, batch 3\); stopping"
    ):
        trainer.fit(module, data)
    assert all_finite(module)  # stopped before the backward
    saved = sorted(tmp_path.joinpath("ckpts").glob("*.ckpt"))
    assert [checkpoint_step(p) for p in saved] == [1, 2, 3]
    for path in saved:
        state = torch.load(path, weights_only=False)["state_dict"]
        assert all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())
    assert not (tmp_path / "export").exists()  # no export of a failed run


def test_nonfinite_loss_skip_drops_that_step_keeps_training_and_logs_the_count(tmp_path, caplog):
    snapshots = Snapshots()
    logger = L.pytorch.loggers.CSVLogger(tmp_path, name="", version="")
    module, trainer, data = nan_fit(tmp_path, NonFiniteLoss("skip"), [snapshots], logger=logger)
    with caplog.at_level(logging.WARNING, logger="lit_align.callbacks.reliability"):
        trainer.fit(module, data)
    assert trainer.global_step == 6  # the skipped batch still counts as a step
    # step 3 changed nothing
    assert all(torch.equal(a, b) for a, b in zip(snapshots.before, snapshots.after, strict=True))
    assert all_finite(module)
    assert (
        "NaNDPO: non-finite loss nan at step 3 (epoch 0, batch 3); skipping this optimizer step (1 skipped so far)"
        in caplog.text
    )
    with open(tmp_path / "metrics.csv") as handle:
        counts = {
            int(row["step"]): float(row["train/skipped_nonfinite"])
            for row in csv.DictReader(handle)
            if row.get("train/skipped_nonfinite")
        }
    assert counts == {0: 0.0, 1: 0.0, 2: 0.0, 3: 1.0, 4: 1.0, 5: 1.0}


def test_nonfinite_loss_max_skipped_stops(tmp_path):
    module, trainer, data = nan_fit(tmp_path, NonFiniteLoss("skip", max_skipped=0))
    with pytest.raises(
        FloatingPointError, match=r"at step 3 \(epoch 0, batch 3\); 1 steps skipped, more than max_skipped=0"
    ):
        trainer.fit(module, data)


def test_nonfinite_decision_is_taken_by_all_processes_together():
    """A finite local loss still skips when another process's loss was not (the strategy's
    any-reduction says so); otherwise ranks would disagree on the optimizer step (and DDP hang)."""
    decisions = []

    def any_process(decision, all=True):
        decisions.append((decision, all))
        return True  # another rank saw NaN

    module = SimpleNamespace(automatic_optimization=True)
    trainer = SimpleNamespace(
        strategy=SimpleNamespace(reduce_boolean_decision=any_process),
        global_step=2,
        current_epoch=0,
        is_global_zero=True,
    )
    guard = NonFiniteLoss("skip")
    guard.on_train_batch_start(trainer, module, None, 2)
    guard.on_before_backward(trainer, module, torch.tensor(0.5))
    assert decisions == [(False, False)]
    param = torch.nn.Parameter(torch.ones(2))
    param.grad = torch.ones(2)
    guard.on_before_optimizer_step(trainer, module, torch.optim.SGD([param], lr=1.0))
    assert param.grad is None and guard.skipped == 1
    with pytest.raises(FloatingPointError, match="non-finite loss on another process at step 2"):
        NonFiniteLoss("stop").on_before_backward(trainer, module, torch.tensor(0.5))


DDP_SCRIPT = '''
"""Two processes (DDP, gloo): rank 1's loss is NaN at step 2 (NonFiniteLoss skip), then rank 0
gets SIGTERM while step 4 trains (SaveOnSigterm)."""
import hashlib
import inspect
import os
import signal
import sys

import lightning as L
import torch

from lit_align.callbacks import NonFiniteLoss, SaveOnSigterm
from lit_align.data import PreferenceDataModule, WordRulesTask
from lit_align.methods import DPO
from lit_align.model.tiny import build_tiny_tokenizer


class NaNOnRankOne(DPO):
    def loss(self, chosen, rejected, ref_chosen, ref_rejected):
        out = super().loss(chosen, rejected, ref_chosen, ref_rejected)
        if self.training and self.global_step == 2 and self.global_rank == 1:
            out = out._replace(losses=out.losses * float("nan"))
        return out


class Watch(L.Callback):
    """Weights around the NaN step; SIGTERM to rank 0 at step 4."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == 2:
            self.before = [p.detach().clone() for p in module.parameters() if p.requires_grad]
        if trainer.global_step == 4 and trainer.global_rank == 0:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx == 2:
            after = [p for p in module.parameters() if p.requires_grad]
            self.unchanged = all(torch.equal(a, p) for a, p in zip(self.before, after))


if __name__ == "__main__":
    L.seed_everything(0)
    module = NaNOnRankOne()
    data = PreferenceDataModule(
        batch_size=4, max_length=48, task=WordRulesTask(num_train=40, num_val=8), cache_dir=sys.argv[1]
    )
    guard, saver, watch = NonFiniteLoss(action="skip"), SaveOnSigterm(dirpath=sys.argv[1]), Watch()
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=8, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[guard, saver, watch],
    )
    try:
        trainer.fit(module, data)
    except SystemExit:
        weights = torch.cat([p.detach().reshape(-1) for p in module.parameters() if p.requires_grad])
        finite = torch.isfinite(weights).all()
        digest = hashlib.sha256(weights.numpy().tobytes()).hexdigest()[:16] if finite else "non-finite"
        # one write: lines never mix
        sys.stdout.write(f"rank {trainer.global_rank}: stopped at step {trainer.global_step}, skipped {guard.skipped}, "
                         f"step 2 unchanged {watch.unchanged}, weights {digest}, saved {saver.saved_path}\\n")
        sys.stdout.flush()
        raise
'''


@pytest.mark.slow
def test_two_process_ddp_nan_on_one_rank_and_sigterm_to_the_other(tmp_path):
    """Rank 1's NaN at step 2 is skipped on both processes (decided together: no hang, no
    divergence); a SIGTERM to rank 0 only, during step 4: both processes stop after that batch and
    write one checkpoint together (holding both processes' RNG states). With Lightning's own
    handler (a broadcast inside the signal handler) this crashed about one run in five."""
    script = tmp_path / "ddp_reliability.py"
    script.write_text(DDP_SCRIPT)
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "c")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    lines = sorted(line for line in done.stdout.splitlines() if line.startswith("rank "))
    assert len(lines) == 2, done.stdout + done.stderr[-4000:]
    path = tmp_path / "c" / "last.ckpt"
    expected = f"stopped at step 5, skipped 1, step 2 unchanged True, weights {{}}, saved {path}"
    digests = [line.split("weights ")[1].split(",")[0] for line in lines]
    assert lines == [f"rank {rank}: " + expected.format(digests[0]) for rank in (0, 1)], lines  # same weights on both
    assert digests[0] != "non-finite"
    assert "non-finite loss on another process at step 2 (epoch 0, batch 2)" in done.stderr  # logged by rank 0
    checkpoint = torch.load(path, weights_only=False)
    assert checkpoint["global_step"] == 5 and len(checkpoint["lit_align_rng_states"]) == 2
    assert checkpoint["callbacks"]["NonFiniteLoss"] == {"skipped": 1}


def test_nonfinite_message_matches_the_on_policy_wording():
    """On-policy methods raise "<Class>: non-finite loss <value> at step <n>"; the callback adds where."""
    module = DPO.__new__(DPO)
    assert nonfinite_loss_message(module, torch.tensor([1.0, float("inf")]), 4) == "DPO: non-finite loss inf at step 4"
    assert (
        nonfinite_loss_message(module, torch.tensor(float("nan")), 4, 1, 0)
        == "DPO: non-finite loss nan at step 4 (epoch 0, batch 1)"
    )


# ---- 4. atomic outputs ---------------------------------------------------------------------------
def folder_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def exported(tmp_path):
    from lit_align.model.backbone import Backbone
    from lit_align.model.export import export_policy
    from lit_align.settings import ModelSettings

    backbone = Backbone(ModelSettings(), needs_reference=False)
    target = tmp_path / "outputs" / "policy"
    export_policy(backbone, target)
    with torch.no_grad():  # the next export differs from the one on disk
        next(backbone.policy.parameters()).add_(1.0)
    return SimpleNamespace(backbone=backbone, target=target, digest=folder_digest(target))


def disk_full_after_partial_write(name: str):
    """A ``save_pretrained`` that writes half a file into the folder, then runs out of space."""

    def save_pretrained(self, folder, *args, **kwargs):
        Path(folder, name).write_bytes(b"\x00" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(folder, name)))

    return save_pretrained


def test_export_that_runs_out_of_space_leaves_the_previous_export_byte_identical(exported, monkeypatch):
    from lit_align.model.export import export_policy

    monkeypatch.setattr(
        type(exported.backbone.policy), "save_pretrained", disk_full_after_partial_write("model.safetensors")
    )
    with pytest.raises(OSError) as failure:
        export_policy(exported.backbone, exported.target)
    assert failure.value.errno == errno.ENOSPC
    assert folder_digest(exported.target) == exported.digest
    assert [p.name for p in exported.target.parent.iterdir()] == ["policy"]  # no staging folder left behind


def test_export_failing_in_the_tokenizer_also_leaves_the_previous_export(exported, monkeypatch):
    from lit_align.model.export import export_policy

    monkeypatch.setattr(
        type(exported.backbone.tokenizer), "save_pretrained", disk_full_after_partial_write("tokenizer.json")
    )
    with pytest.raises(OSError):
        export_policy(exported.backbone, exported.target)
    assert folder_digest(exported.target) == exported.digest
    assert [p.name for p in exported.target.parent.iterdir()] == ["policy"]


def test_failed_export_error_names_the_output_folder(exported, monkeypatch):
    from lit_align.model.export import export_policy

    monkeypatch.setattr(
        type(exported.backbone.policy), "save_pretrained", disk_full_after_partial_write("model.safetensors")
    )
    with pytest.raises(OSError, match=f"{exported.target}[^/.]"):
        export_policy(exported.backbone, exported.target)


def test_cli_export_out_of_space_names_the_folder_and_keeps_it(exported, tmp_path, monkeypatch):
    from lit_align.cli import main

    module = DPO()
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, PreferenceDataModule(batch_size=4, max_length=48, task=WordRulesTask(num_train=8, num_val=4)))
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    monkeypatch.setattr(
        type(module.backbone.policy), "save_pretrained", disk_full_after_partial_write("model.safetensors")
    )
    with pytest.raises(
        SystemExit, match=f"writing '{exported.target}' failed .*No space left on device.*previous contents"
    ):
        main(["export", "--ckpt_path", str(tmp_path / "run.ckpt"), "--output_dir", str(exported.target)])
    assert folder_digest(exported.target) == exported.digest


KILLED_EXPORT = """
import os, signal, sys
from pathlib import Path

from lit_align.model.backbone import Backbone
from lit_align.model.export import export_policy
from lit_align.settings import ModelSettings

backbone = Backbone(ModelSettings(), needs_reference=False)
target = Path(sys.argv[1])
export_policy(backbone, target)
print("FIRST-DONE", flush=True)


def killed(self, folder, *args, **kwargs):
    Path(folder, "model.safetensors").write_bytes(b"half")
    os.kill(os.getpid(), signal.SIGKILL)


type(backbone.policy).save_pretrained = killed
export_policy(backbone, target)
"""


@pytest.mark.slow
def test_export_killed_midway_leaves_the_previous_export_intact(tmp_path):
    from transformers import AutoModelForCausalLM

    script = tmp_path / "killed_export.py"
    script.write_text(KILLED_EXPORT)
    target = tmp_path / "outputs" / "policy"
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    done = subprocess.run(
        [sys.executable, str(script), str(target)], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == -signal.SIGKILL and "FIRST-DONE" in done.stdout, done.stderr[-3000:]
    assert (target / "model.safetensors").stat().st_size > 1000  # the first export, whole
    AutoModelForCausalLM.from_pretrained(target)  # loads


def torch_save_that_fails_midway(monkeypatch):
    """``torch.save`` (as called by lit_align.runtime.atomic) writes some bytes, then the disk is full."""

    def failing(payload, target, *args, **kwargs):
        data = b"PK\x03\x04 partial zip"
        if hasattr(target, "write"):
            target.write(data)
        else:
            Path(target).write_bytes(data)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("lit_align.runtime.atomic.torch.save", failing)


def test_atomic_torch_save_failure_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    atomic_torch_save({"version": 1}, path)
    before = path.read_bytes()
    torch_save_that_fails_midway(monkeypatch)
    with pytest.raises(OSError):
        atomic_torch_save({"version": 2}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]
    with pytest.raises(OSError):
        atomic_torch_save({"version": 2}, tmp_path / "new.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]  # no half-written new file either
    monkeypatch.undo()
    assert load_or_none(path) == {"version": 1}


def test_checkpoint_write_failure_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """AtomicCheckpointIO (the CLI's checkpoint writer): a failed save of last.ckpt leaves the one
    before it loadable, and nothing else in the folder."""
    module = DPO()
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0, default_root_dir=tmp_path, plugins=[AtomicCheckpointIO()])
    trainer.fit(module, PreferenceDataModule(batch_size=4, max_length=48, task=WordRulesTask(num_train=8, num_val=4)))
    path = tmp_path / "ckpts" / "last.ckpt"
    trainer.save_checkpoint(path)
    before = path.read_bytes()
    torch_save_that_fails_midway(monkeypatch)
    with pytest.raises(OSError):
        trainer.save_checkpoint(path)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_atomic_torch_save_gives_default_permissions(tmp_path):
    path = tmp_path / "state.pt"
    atomic_torch_save([1], path)
    mask = os.umask(0o022)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def small_dm(**kwargs) -> PreferenceDataModule:
    from lit_align.model.tiny import build_tiny_tokenizer

    dm = PreferenceDataModule(batch_size=4, max_length=48, task=WordRulesTask(num_train=24, num_val=8), **kwargs)
    dm.tokenizer = build_tiny_tokenizer()
    return dm


def arrow_writes_that_fail_midway_under(folder: Path, monkeypatch) -> None:
    """Arrow files written under ``folder`` (the tokenized cache's) get some bytes, then the disk is full."""
    from lit_align.data import storage

    original = storage.write_arrow

    def failing(path, schema, tables):
        if Path(path).is_relative_to(folder):
            Path(path).write_bytes(b"ARROW1 partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(path, schema, tables)

    monkeypatch.setattr(storage, "write_arrow", failing)


def test_tokenized_cache_write_failure_leaves_no_half_written_cache(tmp_path, monkeypatch, caplog):
    """A cache that cannot be written (here: the disk fills midway) leaves nothing behind; the run
    goes on without it (its Arrow files in a temporary folder), saying so."""
    cache = tmp_path / "cache"
    arrow_writes_that_fail_midway_under(cache, monkeypatch)
    failed = small_dm(cache_dir=str(cache))
    with caplog.at_level(logging.WARNING, logger="lit_align.data.datamodule"):
        failed.setup("fit")
    assert failed.datasets["train"]
    assert (
        f"cannot write the tokenized-data cache in {cache / 'tokenized'}" in caplog.text
        and "continuing without it" in caplog.text
    )
    assert list(cache.rglob("*")) == [cache / "tokenized"]  # the folder, no file
    monkeypatch.undo()
    dm = small_dm(cache_dir=str(cache))
    dm.setup("fit")
    (written,) = (cache / "tokenized").iterdir()
    assert sorted(p.name for p in written.iterdir()) == ["meta.json", "train.arrow", "val.arrow"]
    assert dm.datasets == failed.datasets


def test_truncated_tokenized_cache_is_detected_and_rebuilt(tmp_path, caplog):
    """tests/test_data.py covers a garbage file; here a file of the cache is cut in half."""
    cache = tmp_path / "cache"
    first = small_dm(cache_dir=str(cache))
    first.setup("fit")
    expected = {name: list(examples) for name, examples in first.datasets.items()}
    (written,) = (cache / "tokenized").iterdir()
    whole = (written / "train.arrow").read_bytes()
    (tmp_path / "half").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "half").replace(written / "train.arrow")  # a new file: `first` keeps its memory-mapped pages
    second = small_dm(cache_dir=str(cache))
    with caplog.at_level(logging.WARNING, logger="lit_align.data.datamodule"):
        second.setup("fit")
    assert "unreadable; rebuilding" in caplog.text
    assert second.datasets == expected
    assert (written / "train.arrow").read_bytes() == whole
