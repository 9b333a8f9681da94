"""LightningModules: a base per data regime, a short subclass per objective."""

from lit_align.backbone import SequenceLogps
from lit_align.losses.types import PreferenceLoss
from lit_align.methods.alignment import AlignmentModule
from lit_align.methods.base import PairedPreferenceModule
from lit_align.methods.listwise import ListwiseLoss, ListwisePreferenceModule, ResponseLists
from lit_align.methods.unpaired import UnpairedLoss, UnpairedPreferenceModule
from lit_align.methods.dpo import DPO, IPO, HingeDPO, RobustDPO
from lit_align.methods.dpo_variants import AOT, DPOP, EXO, GPO, NCA, ODPO, RDPO, APODown, APOZero, BCOPair, BetaDPO, SPPOHard
from lit_align.methods.reference_free import CPO, ORPO, SimPO
from lit_align.methods.tdpo import TDPO
from lit_align.methods.listwise_objectives import PRO, RRHF, LiPO
from lit_align.methods.unpaired_objectives import BCO, KTO, NPO

__all__ = ["AlignmentModule", "ListwiseLoss", "ListwisePreferenceModule", "ResponseLists", "UnpairedLoss", "UnpairedPreferenceModule", "CPO", "DPO", "IPO", "ORPO", "HingeDPO", "PairedPreferenceModule", "PreferenceLoss", "RobustDPO", "SequenceLogps", "SimPO"]
__all__ += ["AOT", "APODown", "APOZero", "BCOPair", "BetaDPO", "DPOP", "EXO", "GPO", "NCA", "ODPO", "RDPO", "SPPOHard"]  # dpo_variants.py
__all__ += ["BCO", "KTO", "NPO"]  # unpaired_objectives.py
__all__ += ["PRO", "RRHF", "LiPO"]  # listwise_objectives.py
__all__ += ["TDPO"]  # tdpo.py
