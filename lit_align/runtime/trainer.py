"""The trainer a module runs under, through Lightning's public API only."""

from __future__ import annotations

import atexit
import sys

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
