"""LightningModules: a base per data regime, a short subclass per objective."""

from lit_align.backbone import SequenceLogps
from lit_align.losses.types import PreferenceLoss
from lit_align.methods.base import PairedPreferenceModule
from lit_align.methods.dpo import DPO, IPO, HingeDPO, RobustDPO
from lit_align.methods.reference_free import CPO, ORPO, SimPO

__all__ = ["CPO", "DPO", "IPO", "ORPO", "HingeDPO", "PairedPreferenceModule", "PreferenceLoss", "RobustDPO", "SequenceLogps", "SimPO"]
