"""The trainer a module runs under, through Lightning's public API only."""

from __future__ import annotations

import atexit
import sys
import warnings

import torch
from lightning import LightningModule, Trainer


def attached_trainer(module: LightningModule) -> Trainer | None:
    """The trainer ``module`` is attached to, or None outside one (Lightning's ``module.trainer``
    raises ``RuntimeError`` then; its ``_trainer`` attribute is private)."""
    try:
        return module.trainer
    except RuntimeError:
        return None


def distributed(module: LightningModule) -> bool:
    """Whether ``module`` runs under a trainer with more than one process."""
    trainer = attached_trainer(module)
    return trainer is not None and trainer.world_size > 1


def validate_the_last_step(trainer: Trainer, batch_idx: int) -> None:
    """Have Lightning validate after the training step that ends fit (call at every
    ``on_train_batch_end``).

    Lightning validates every ``val_check_interval`` steps; a run that ends between two (``max_steps``
    not a multiple of it, or the last epoch's last batch) never validates its final weights: no
    held-out score of them (``lit-align fit``'s closing line showed the last validated step's, or
    nothing), no checkpoint of them and no samples (a 30-step try of a config that validates every
    50 left no checkpoint at all). Lightning validates a step that sets ``Trainer.should_stop`` (its
    early-stopping path, public behaviour checked in ``tests/test_lightning_internals.py``) and fit
    ends after this step anyway; a validation already due at that step runs once, not twice."""
    last_step = trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps
    last_epoch = (
        trainer.max_epochs is not None
        and trainer.max_epochs > 0
        and trainer.current_epoch + 1 >= trainer.max_epochs
        and batch_idx + 1 >= trainer.num_training_batches
    )
    if last_step or last_epoch:
        trainer.should_stop = True


EVAL_MODE_WARNING = r"Found \d+ module\(s\) in eval mode at the start of training"
"""Lightning's warning (at the start of every fit) about modules in eval mode."""


def quiet_eval_mode_warning_for_frozen_modules(module: LightningModule) -> None:
    """Silence Lightning's eval-mode warning for this fit when every module in eval mode is frozen.

    The frozen reference (and a frozen reward model) stays in eval mode on purpose: its
    forward must not drop out. Lightning warns about any module in eval mode at the start of
    training ("This may lead to unexpected behavior"), which told every run with a reference that
    something was wrong. A module in eval mode with a parameter that trains still gets the warning.
    Undone by :func:`restore_eval_mode_warning` once Lightning has checked."""
    trainable_in_eval = [
        name
        for name, sub in module.named_modules()
        if not sub.training and any(p.requires_grad for p in sub.parameters(recurse=False))
    ]
    if not trainable_in_eval:
        warnings.filterwarnings("ignore", message=EVAL_MODE_WARNING)


def restore_eval_mode_warning() -> None:
    """Take out the filter :func:`quiet_eval_mode_warning_for_frozen_modules` added, if it is
    there (an "ignore" filter leaves nothing in the warning registries to reset)."""
    warnings.filters[:] = [entry for entry in warnings.filters if not is_eval_mode_filter(entry)]


def is_eval_mode_filter(entry: tuple) -> bool:
    action, message = entry[0], entry[1]
    return action == "ignore" and getattr(message, "pattern", None) == EVAL_MODE_WARNING


def destroy_process_group_at_exit() -> None:
    """Destroy torch.distributed's default process group when the interpreter exits, if it is
    still there then (registered once per process).

    Lightning registers this for NCCL only. A gloo group left for the interpreter's finalisation
    can abort the process there ("terminate called without an active exception", exit status
    -6) after training has finished: its worker threads still hold work whose tensors need the
    interpreter to free (the cause given in PyTorch PR #179291, which proposed this for every
    backend and was withdrawn). Seen in this project's CI after a two-process test had finished
    training.

    A colocated vLLM engine (the ``vllm`` generation backend) has process groups of its own,
    subgroups of the default one (under ``external_launcher``) or a one-process group it started;
    vLLM tears them down from a ``weakref.finalize`` hook, which runs after this one. Destroying the
    default group first left vLLM's teardown to raise "Invalid process group specified" at every
    exit, so vLLM's own teardown runs here first (it ends with the default group, and is a no-op
    when its finalizer runs it again)."""
    global _registered
    if not _registered:
        atexit.register(_destroy_process_group)
        _registered = True


def _destroy_process_group() -> None:
    vllm_groups = sys.modules.get("vllm.distributed.parallel_state")  # loaded only if an engine was built
    if vllm_groups is not None and vllm_groups.model_parallel_is_initialized():
        vllm_groups.cleanup_dist_env_and_memory()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


_registered = False
