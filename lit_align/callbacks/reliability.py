"""Callbacks that keep a run recoverable: a checkpoint on SIGTERM, and a policy for non-finite losses.

``lit-align fit`` adds both by default (see :class:`lit_align.cli.LitAlignCLI`); with a plain
``Trainer`` add them to ``callbacks``.

* :class:`SaveOnSigterm`: Lightning (2.x) stops at a batch boundary on SIGTERM but saves nothing
  (unless a ``ModelCheckpoint`` has ``save_on_exception=True``), and under DDP its handler runs a
  collective that can collide with another. This callback makes the processes stop together after
  the same batch and writes ``last.ckpt`` in the checkpoint folder, so ``--ckpt_path`` on that file
  (or ``last`` with a fixed ``ModelCheckpoint(dirpath=...)``) resumes exactly where it stopped.
* :class:`NonFiniteLoss`: a NaN/inf training loss is caught before its backward with the step and
  batch named, and either stops the run (``stop``) or skips that optimizer step (``skip``).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any, Literal, Optional

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_align.errors import NonFiniteLossError
from lit_align.runtime.lightning_internals import stop_as_on_sigterm
from lit_align.settings import NonNegativeInt, check_arguments

log = logging.getLogger(__name__)


def nonfinite_loss_message(
    module: LightningModule, loss: Any, step: int, batch_idx: Optional[int] = None, epoch: Optional[int] = None
) -> str:
    """The one wording of a non-finite loss error: ``"DPO: non-finite loss nan at step 3 (epoch 0,
    batch 3)"``; ``step`` counts optimizer steps already taken (the failing batch would make step+1)."""
    if isinstance(loss, torch.Tensor):
        values = loss.detach().float().reshape(-1)
        loss = float(values[~torch.isfinite(values)][0]) if not torch.isfinite(values).all() else float(values[0])
    where = "" if batch_idx is None else f" (epoch {epoch}, batch {batch_idx})"
    return f"{type(module).__name__}: non-finite loss {loss} at step {step}{where}"


def checkpoint_folder(trainer: Trainer) -> str:
    """Where the run's checkpoints go: the first ``ModelCheckpoint``'s folder, else
    ``<log_dir>/checkpoints`` (as Lightning's default ``ModelCheckpoint`` would choose)."""
    callback = trainer.checkpoint_callback
    dirpath = getattr(callback, "dirpath", None)
    if dirpath:
        return str(dirpath)
    root = trainer.log_dir if trainer.loggers else trainer.default_root_dir
    return os.path.join(root or trainer.default_root_dir, "checkpoints")


class SaveOnSigterm(Callback):
    """On SIGTERM during ``fit``, save a full checkpoint (weights, optimizer, scheduler, loop
    counters, RNG states) at the next batch boundary, then let the process exit.

    Lightning 2.6 on its own: its SIGTERM handler sets ``trainer.received_sigterm``, forwards the
    signal to the other local processes and, under DDP, runs a ``broadcast`` inside the handler;
    the running batch finishes and ``SIGTERMException`` (a ``SystemExit``) is raised at the batch
    boundary; no checkpoint is written (unless a ``ModelCheckpoint`` has ``save_on_exception``).
    A collective inside a signal handler runs wherever the process happens to be, possibly in the
    middle of another collective (a metric sync, DDP's gradient all-reduce): with 2 CPU processes
    that crashed the run about one time in five (gloo "collective mismatch").

    While ``fit`` trains, this callback therefore replaces Lightning's SIGTERM handler by one that
    only records the signal. At the end of every training batch (and validation batch during fit)
    the processes decide together (one boolean all-reduce: any process signalled) and, if so, set
    Lightning's flag on all of them, so all stop after the same batch; this callback then saves in
    ``on_exception``, on every process together (``Trainer.save_checkpoint`` is collective), and
    logs the path. ``lit-align fit`` exits with status 143 (128 + SIGTERM). A SIGTERM during
    validation stops after the current validation batch (a grace period may be short): that
    validation's metrics are lost (the resumed run logs none for that step; measured with
    Lightning 2.6), the training steps after it resume exactly.

    Args:
        filename: checkpoint file name in the checkpoint folder (``last.ckpt``: found by
            ``--ckpt_path last`` when the folder is fixed with ``ModelCheckpoint(dirpath=...)``).
        dirpath: folder to write to (default: the ``ModelCheckpoint``'s folder, else
            ``<log_dir>/checkpoints``).
    """

    def __init__(self, filename: str = "last.ckpt", dirpath: Optional[str] = None):
        self.filename, self.dirpath = filename, dirpath
        self.saved_path: Optional[str] = None
        self._signalled = False

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning registered its handlers just before; it restores the original ones at teardown
        self._signalled = False
        if hasattr(signal, "SIGTERM") and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._record_signal)

    def _record_signal(self, signum: int, frame: Any) -> None:
        self._signalled = True  # nothing else here: no collective, no exception, no lock (logging)

    def _stop_together(self, trainer: Trainer) -> None:
        stop = self._signalled
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop and not trainer.received_sigterm:
            stop_as_on_sigterm(trainer)  # Lightning raises SIGTERMException at this boundary

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._stop_together(trainer)

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._stop_together(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        path = os.path.join(self.dirpath or checkpoint_folder(trainer), self.filename)
        trainer.save_checkpoint(path, weights_only=False)
        self.saved_path = path
        if trainer.is_global_zero:
            log.warning("SIGTERM: saved %s at step %d; resume with --ckpt_path %s", path, trainer.global_step, path)


class NonFiniteLoss(Callback):
    """What to do when a training loss is NaN or infinite (automatic-optimisation methods).

    The loss is checked before its backward, every step (one scalar read per step; under DDP one
    boolean all-reduce, so every process takes the same decision and none waits for the others).

    * ``stop``: raise ``FloatingPointError("DPO: non-finite loss nan at step 3 (epoch 0, batch 3)")``
      before the backward: the weights are never updated from that loss, and as fit ends with
      an exception no later checkpoint or ``ExportHF`` export is written.
    * ``skip``: run the backward but drop the gradients before the optimizer step, so that batch
      changes no weight (with gradient accumulation, the whole accumulated step is dropped; the
      learning-rate schedule still advances); log a warning naming the step and batch, and the
      running count as ``train/skipped_nonfinite`` (logged every step, kept in checkpoints).
      ``max_skipped`` stops the run once more steps than that were skipped.

    Manual-optimisation methods (on-policy: PPO, GRPO, ..., TRPO) check their own losses and
    raise ``FloatingPointError`` with the same wording; this callback leaves them alone.

    Args:
        action: ``stop`` or ``skip``.
        max_skipped: with ``skip``, the most steps to skip before stopping (None: no limit).
    """

    def __init__(self, action: Literal["stop", "skip"] = "stop", max_skipped: Optional[NonNegativeInt] = None):
        check_arguments(self, locals())
        self.action, self.max_skipped = action, max_skipped
        self.skipped = 0
        self._drop_gradients = False
        self._batch_idx: Optional[int] = None  # of the batch training now (named in the message)

    @property
    def state_key(self) -> str:
        return "NonFiniteLoss"

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._drop_gradients = False

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch_idx = batch_idx

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        if not pl_module.automatic_optimization:
            return
        local = not bool(torch.isfinite(loss.detach()).all())
        if not trainer.strategy.reduce_boolean_decision(local, all=False):  # any process: all decide alike
            return
        value = loss if local else "on another process"
        message = nonfinite_loss_message(pl_module, value, trainer.global_step, self._batch_idx, trainer.current_epoch)
        if self.action == "stop":
            raise NonFiniteLossError(
                f"{message}; stopping (to skip such steps instead: lit-align fit --nonfinite_loss skip, "
                "or the callback NonFiniteLoss(action='skip'))"
            )
        self.skipped += 1
        self._drop_gradients = True
        if self.max_skipped is not None and self.skipped > self.max_skipped:
            raise NonFiniteLossError(
                f"{message}; {self.skipped} steps skipped, more than max_skipped={self.max_skipped}"
            )
        if trainer.is_global_zero:
            log.warning("%s; skipping this optimizer step (%d skipped so far)", message, self.skipped)

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self._drop_gradients:
            return
        self._drop_gradients = False
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = None  # the optimizer leaves parameters without a gradient untouched

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.action == "skip" and pl_module.automatic_optimization:
            pl_module.log("train/skipped_nonfinite", float(self.skipped), on_step=True, on_epoch=False)
