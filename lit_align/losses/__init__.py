"""Pure objective functions: per-sequence tensors and hyper-parameters in, per-example losses out."""

from lit_align.losses.dpo import dpo_loss, hinge_loss, ipo_loss, robust_dpo_loss
from lit_align.losses.reference_free import cpo_loss, orpo_loss, simpo_loss
from lit_align.losses.types import PreferenceLoss

__all__ = ["PreferenceLoss", "cpo_loss", "dpo_loss", "hinge_loss", "ipo_loss", "orpo_loss", "robust_dpo_loss", "simpo_loss"]
