"""Reference models that move during training, as callbacks on any method with ``reference: copy``.

* :class:`ReferenceSync` is TR-DPO (Gorbatovski et al. 2024, "Learn Your Reference Model for Real
  Good Alignment"): every tau optimizer steps the reference becomes
  ``alpha * theta + (1 - alpha) * theta_ref`` (alpha = 1: hard update, alpha < 1: soft update).
* :class:`StepwiseDPO` is sDPO (Kim et al. 2024, "sDPO: Don't Use Your Data All at Once"): the
  training data is used in consecutive chunks, one per epoch, and at the start of every chunk
  after the first the reference is replaced by the current policy.

Both work with every paired, unpaired or listwise module, since they only touch
``module.backbone``: they write the policy's weights into ``backbone.reference`` in place
(:func:`update_reference`). Under LoRA + copy the reference is a plain model without adapters, so
the policy's effective weights are used: each LoRA layer's base weight plus its adapter delta
``scaling * B @ A`` (peft's ``get_delta_weight``), computed per layer without merging anything into
the policy (merge then unmerge would leave rounding error in the base weights).

Needs ``model.reference: copy``. ``adapter`` has no reference weights of its own (the reference is
the policy with LoRA off), ``cached`` is a fixed table of log-probs computed before training, and
``none`` has no reference: each is refused when the trainer sets up, with the reason.
"""

from __future__ import annotations

import logging
from typing import Annotated

import torch
from lightning import Callback, LightningModule, Trainer

from lit_align.data.datamodule import AlignmentDataModule
from lit_align.errors import SettingError
from lit_align.methods.alignment import AlignmentModule
from lit_align.model.loading import trained_module_names
from lit_align.settings import Count, Range, check_arguments

log = logging.getLogger(__name__)


def check_copy_reference(pl_module: LightningModule, who: str) -> None:
    """Raise unless ``pl_module`` keeps a separate, writable reference model (``reference: copy``)."""
    if not isinstance(pl_module, AlignmentModule):
        raise TypeError(
            f"{who} updates a lit-align module's reference model (module.backbone.reference); "
            f"{type(pl_module).__name__} has no backbone"
        )
    backbone = pl_module.backbone
    backbone.reference_source.require_copy(who, "updates the reference model from the policy")
    if backbone.settings.quantization is not None:
        raise SettingError(
            None,
            "model.quantization",
            f"{who} cannot write the policy's weights into a 4-bit quantized reference (QLoRA); "
            "train without model.quantization to update the reference",
        )
    if backbone.settings.lora is not None and backbone.settings.lora.use_dora:
        raise SettingError(
            None,
            "model.lora.use_dora",
            f"{who} writes the policy's weights into the reference as weight + LoRA delta, which model.lora.use_dora "
            "(DoRA's magnitude rescaling) does not fit; train with plain LoRA (use_dora false) to update the reference",
        )


def policy_weights(backbone) -> dict[str, torch.Tensor]:
    """The policy's effective weights, named as the reference's parameters.

    Full fine-tuning: the policy's parameters. LoRA: every non-adapter parameter with peft's
    ``base_layer`` renamed away, and each LoRA layer's weight plus the delta of its active,
    unmerged adapters (the policy is not modified).
    """
    policy = backbone.policy
    if not backbone.is_peft:
        return dict(policy.named_parameters())
    from peft.tuners.lora import LoraLayer

    inner = policy.get_base_model()
    weights = trained_module_names(
        {name.replace(".base_layer.", "."): param for name, param in inner.named_parameters() if "lora_" not in name}
    )
    for name, module in inner.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        adapters = [a for a in module.active_adapters if a in module.lora_A and a not in module.merged_adapters]
        for adapter in adapters:
            if adapter in getattr(module, "lora_variant", {}) or getattr(module, "lora_bias", {}).get(adapter, False):
                raise NotImplementedError(
                    f"{name}: only plain LoRA adapters can be written into the reference (no DoRA or lora_bias)"
                )
            key = f"{name}.weight"
            weights[key] = weights[key] + module.get_delta_weight(adapter).to(weights[key].dtype)
    return weights


@torch.no_grad()
def update_reference(backbone, alpha: float = 1.0) -> None:
    """``theta_ref <- alpha * theta + (1 - alpha) * theta_ref`` for every reference parameter, in place.

    ``alpha = 1`` copies the policy's effective weights exactly. The reference stays frozen
    (no gradients) and in eval mode.
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    if backbone.reference is None:
        raise ValueError("this backbone has no reference copy to update (model.reference must be copy)")
    reference = dict(backbone.reference.named_parameters())
    source = policy_weights(backbone)
    if set(reference) != set(source):
        unmatched = sorted(set(reference) ^ set(source))
        raise RuntimeError(f"the policy's and the reference's parameters do not match by name (first: {unmatched[:3]})")
    for name, ref in reference.items():
        theta = source[name].detach().to(device=ref.device, dtype=ref.dtype)
        if alpha == 1.0:
            ref.copy_(theta)
        else:
            ref.mul_(1.0 - alpha).add_(theta, alpha=alpha)


class ReferenceSync(Callback):
    """TR-DPO (Gorbatovski et al. 2024): update the reference from the policy every ``every_n_steps``
    optimizer steps, ``theta_ref <- alpha * theta + (1 - alpha) * theta_ref``.

    ``alpha = 1`` is the paper's hard update (the reference becomes the current policy) and
    ``alpha < 1`` its soft update (an exponential moving average taken every tau steps). The
    paper's recommended settings, also TRL's defaults, are tau = 512 for the hard update and
    alpha = 0.6 for the soft one. Needs ``model.reference: copy`` (with or without LoRA).

    Args:
        every_n_steps: tau, optimizer steps between updates (gradient accumulation counts once).
        alpha: weight of the policy in the update, in (0, 1].
    """

    def __init__(self, every_n_steps: Count = 512, alpha: Annotated[float, Range(0, 1, low_open=True)] = 1.0):
        check_arguments(self, locals())
        self.every_n_steps, self.alpha = every_n_steps, alpha
        self.last_update_step = 0

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        check_copy_reference(pl_module, "ReferenceSync")

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step  # optimizer steps so far; unchanged between accumulation micro-batches
        if step > self.last_update_step and step % self.every_n_steps == 0:
            update_reference(pl_module.backbone, self.alpha)
            self.last_update_step = step
            log.info("ReferenceSync: reference updated from the policy at step %d (alpha=%g)", step, self.alpha)

    def state_dict(self) -> dict:
        return {"last_update_step": self.last_update_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_update_step = state_dict.get("last_update_step", 0)


class StepwiseDPO(Callback):
    """sDPO (Kim et al. 2024): train on the data in ``num_chunks`` consecutive chunks, chunk k in
    epoch k, and make the current policy the reference at the start of every chunk after the first.

    The chunks follow the order of the training data (order the file, e.g. easy to hard, as the
    paper orders its datasets); examples are shuffled only within a chunk. Set
    ``trainer.max_epochs`` to ``num_chunks``; the callback sets
    ``trainer.reload_dataloaders_every_n_epochs = 1`` so that each epoch gets its chunk, and turns
    on the data module's ``train_chunks`` (every lit-align data module,
    :class:`lit_align.data.AlignmentDataModule`, has it). The optimizer and learning-rate schedule run on
    across chunks. Needs ``model.reference: copy``.

    Args:
        num_chunks: number of chunks (steps, in the paper's terms) the training data is split into.
    """

    def __init__(self, num_chunks: Count = 2):
        check_arguments(self, locals())
        self.num_chunks = num_chunks

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        check_copy_reference(pl_module, "StepwiseDPO")
        if stage != "fit":
            return
        datamodule = trainer.datamodule
        if not isinstance(datamodule, AlignmentDataModule):
            name = type(datamodule).__name__ if datamodule is not None else "no data module"
            raise SettingError(
                None,
                "data.class_path",
                f"StepwiseDPO needs a data module that serves one chunk of the training data per epoch "
                f"(a lit-align data module, e.g. lit_align.data.PreferenceDataModule); got {name}",
            )
        if trainer.max_epochs != self.num_chunks:
            raise SettingError(
                None,
                "trainer.max_epochs",
                f"StepwiseDPO trains chunk k during epoch k: set trainer.max_epochs to num_chunks={self.num_chunks} "
                f"(got max_epochs={trainer.max_epochs})",
            )
        datamodule.train_chunks = self.num_chunks
        if trainer.reload_dataloaders_every_n_epochs != 1:
            log.info("StepwiseDPO: setting trainer.reload_dataloaders_every_n_epochs = 1 (one chunk per epoch)")
            trainer.reload_dataloaders_every_n_epochs = 1

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # at the end of a chunk rather than the start of the next: a run resumed in the middle of
        # a chunk keeps the reference restored from its checkpoint instead of overwriting it
        if trainer.current_epoch + 1 < self.num_chunks:
            update_reference(pl_module.backbone, 1.0)
            log.info(
                "StepwiseDPO: chunk %d of %d ends; the reference is now the current policy",
                trainer.current_epoch + 1,
                self.num_chunks,
            )

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and isinstance(trainer.datamodule, AlignmentDataModule):
            trainer.datamodule.train_chunks = None
