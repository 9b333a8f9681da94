"""Every private Lightning name lit-align uses, here and nowhere else.

Lightning offers no public way to do what lit-align does with the six names below; each is
wrapped here under a name of our own. ``tests/test_lightning_internals.py`` touches each one
(the attribute exists, takes the arguments used here and does what is relied on), so an upgrade
of Lightning that renames or changes one fails there, with the internal named.

1. ``FSDPStrategy._setup_model(model)``: the step where Lightning's FSDP strategy wraps the model.
   :class:`lit_align.runtime.strategies.FSDPStrategy` plans the FSDP units from the model there
   (only known at that point) and wraps on CPU itself (Lightning's passes a CUDA device index).
   Here: :class:`FSDPStrategyBase` (``wrap_model``).
2. ``FSDPStrategy._activation_checkpointing_kwargs``: the activation-checkpointing settings the
   strategy applies after wrapping; the policy's decoder layers are only known from the model.
   Here: ``FSDPStrategyBase.activation_checkpointing_kwargs``.
3. ``lightning.pytorch.strategies.fsdp._setup_activation_checkpointing(module, kwargs)``: applies
   those settings to a wrapped model the way Lightning does (its CPU wrapping path needs it too).
   Here: :func:`setup_activation_checkpointing`.
4. ``Trainer._signal_connector.received_sigterm``: the flag behind the read-only
   ``Trainer.received_sigterm``; set, Lightning stops at its next batch boundary with
   ``SIGTERMException``. :class:`lit_align.callbacks.SaveOnSigterm` sets it on every process at
   the same batch instead of letting Lightning's own handler run a collective inside a signal
   handler (``Trainer.should_stop`` is no substitute: it ends fit normally, without the
   exception, the checkpoint and the exit status). Here: :func:`stop_as_on_sigterm`.
5. ``ThroughputMonitor._throughputs``: the per-stage ``Throughput`` meters, built in ``setup``
   from Lightning's FLOP table; :class:`lit_align.callbacks.Throughput` gives them the user's
   ``peak_flops`` (needed on CPUs and GPUs the table lacks). Here: :func:`throughput_meters`.
6. ``RichProgressBar._get_train_description(current_epoch)``: the training bar's label. With
   ``max_steps`` and no ``max_epochs`` Lightning sets ``max_epochs`` to -1 (no limit) and 2.6 labels
   the bar ``Epoch 1/-2``; fixed upstream after 2.6 (Lightning PR #21924: no total when the epochs
   are unlimited). Here: :class:`RichProgressBarUnlimitedEpochs`, which ``lit-align fit`` uses
   where Lightning would pick its Rich bar; drop it once the requirement starts at a fixed release.

Tested with Lightning 2.6.0 and 2.6.6 (the test above, the exact-resume tests and the FSDP test),
the range :data:`TESTED_LIGHTNING` covers and ``pyproject.toml`` requires. Every internal above is
also in 2.4.0 and 2.5.6 (their tests pass there), but ``lit-align``'s CLI does not work with them:
with 2.4.0 ``fit`` stops at once (LightningCLI gives the model's and the data module's
hyper-parameters different ``_class_path`` entries, which Lightning then refuses to merge), and
with 2.5.6 ``fit --ckpt_path`` does (LightningCLI re-parses the checkpoint's hyper-parameters and
rejects ``_class_path``).

Behaviour of public APIs that lit-align relies on, checked by the same test (no private names):
Lightning fetches no batch ahead from a train loader that has a length (the position a
:class:`lit_align.data.sampling.ResumableLoader` saves is the number of batches trained);
a training step that sets ``Trainer.should_stop`` is validated, once, before fit ends (how
:func:`lit_align.runtime.trainer.validate_the_last_step` has the final weights validated);
``Trainer.is_last_batch`` is, at ``on_train_start`` of a resumed fit, the value the checkpoint
recorded (``AlignmentModule.on_train_start`` repeats one RNG draw when the checkpoint had ended its
epoch); ``lit-align fit`` silences Lightning's warning that a mid-epoch checkpoint is "not
resumable" by its text, and every fit its warning about modules "in eval mode at the start of
training" when those are all frozen (a reference), by its text too; ``lit-align export`` runs
Lightning's documented converter of sharded checkpoints, ``python -m
lightning.pytorch.utilities.consolidate_checkpoint``.
"""

from __future__ import annotations

from typing import Any

from lightning import Trainer
from lightning.pytorch.callbacks import RichProgressBar, ThroughputMonitor
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.strategies.fsdp import _setup_activation_checkpointing
from torch import nn

TESTED_LIGHTNING = (">=2.6", "<2.7")
"""The Lightning versions lit-align is tested with (``pyproject.toml``'s requirement)."""


class FSDPStrategyBase(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` with its model-wrapping step and activation-checkpointing
    settings under names of our own (internals 1 and 2)."""

    def _setup_model(self, model: nn.Module) -> nn.Module:
        return self.wrap_model(model)

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """Wrap ``model`` in FSDP: Lightning's own wrapping unless overridden."""
        return super()._setup_model(model)

    @property
    def activation_checkpointing_kwargs(self) -> dict[str, Any]:
        """What ``apply_activation_checkpointing`` gets after wrapping (empty: none)."""
        return self._activation_checkpointing_kwargs

    @activation_checkpointing_kwargs.setter
    def activation_checkpointing_kwargs(self, kwargs: dict[str, Any]) -> None:
        self._activation_checkpointing_kwargs = kwargs


def setup_activation_checkpointing(module: nn.Module, kwargs: dict[str, Any]) -> None:
    """Apply activation-checkpointing ``kwargs`` to a wrapped ``module``, as Lightning does (internal 3)."""
    _setup_activation_checkpointing(module, kwargs)


def stop_as_on_sigterm(trainer: Trainer) -> None:
    """Make Lightning stop at its next batch boundary as after a SIGTERM (internal 4)."""
    trainer._signal_connector.received_sigterm = True


def throughput_meters(monitor: ThroughputMonitor) -> list[Any]:
    """The ``Throughput`` meters a ``ThroughputMonitor`` built in ``setup`` (internal 5)."""
    return list(monitor._throughputs.values())


class RichProgressBarUnlimitedEpochs(RichProgressBar):
    """Lightning's Rich progress bar, labelled ``Epoch N`` rather than ``Epoch N/-2`` when the
    epochs are unlimited (``max_epochs`` -1, as with ``max_steps``; internal 6)."""

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs is None or self.trainer.max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        return f"Epoch {current_epoch}".ljust(len(self.validation_description))
