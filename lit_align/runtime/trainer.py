"""The trainer a module runs under, through Lightning's public API only."""

from __future__ import annotations

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
