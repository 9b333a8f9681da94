"""LightningModules: a base per data regime, a short subclass per objective."""

from lit_align.losses.types import ListwiseLoss, PreferenceLoss, UnpairedLoss
from lit_align.methods.actor_critic import A2C, PPO
from lit_align.methods.alignment import AlignmentModule
from lit_align.methods.dpo import DPO, IPO, HingeDPO, RobustDPO
from lit_align.methods.dpo_variants import (
    AOT,
    DPOP,
    EXO,
    GPO,
    NCA,
    ODPO,
    RDPO,
    APODown,
    APOZero,
    BCOPair,
    BetaDPO,
    SPPOHard,
)
from lit_align.methods.grpo import GRPO
from lit_align.methods.listwise import ListwisePreferenceModule, ResponseLists
from lit_align.methods.listwise_objectives import PRO, RRHF, LiPO
from lit_align.methods.on_policy import ActorCriticModule, OnPolicyModule, PolicyPass
from lit_align.methods.online_dpo import OnlineDPO
from lit_align.methods.paired import PairedPreferenceModule
from lit_align.methods.policy_gradient import REINFORCE, RLOO
from lit_align.methods.reference_free import CPO, ORPO, SimPO
from lit_align.methods.reinforce_pp import REINFORCEPlusPlus
from lit_align.methods.reward_model import RewardModel
from lit_align.methods.sft import SFT
from lit_align.methods.tdpo import TDPO
from lit_align.methods.trpo import TRPO
from lit_align.methods.unpaired import UnpairedPreferenceModule
from lit_align.methods.unpaired_objectives import BCO, KTO, NPO
from lit_align.model.logprobs import SequenceLogps
from lit_align.online.reward_model import RewardModelReward
from lit_align.online.self_judge import SelfJudge

__all__ = [
    "A2C",
    "ActorCriticModule",
    "GRPO",
    "OnPolicyModule",
    "PPO",
    "REINFORCEPlusPlus",
    "PolicyPass",
    "REINFORCE",
    "RLOO",
    "AOT",
    "BCO",
    "CPO",
    "DPO",
    "DPOP",
    "EXO",
    "GPO",
    "IPO",
    "KTO",
    "NCA",
    "NPO",
    "ODPO",
    "ORPO",
    "PRO",
    "RDPO",
    "RRHF",
    "TDPO",
    "TRPO",
    "APODown",
    "APOZero",
    "AlignmentModule",
    "BCOPair",
    "BetaDPO",
    "HingeDPO",
    "LiPO",
    "ListwiseLoss",
    "ListwisePreferenceModule",
    "OnlineDPO",
    "PairedPreferenceModule",
    "PreferenceLoss",
    "ResponseLists",
    "RewardModel",
    "RewardModelReward",
    "RobustDPO",
    "SFT",
    "SPPOHard",
    "SelfJudge",
    "SequenceLogps",
    "SimPO",
    "UnpairedLoss",
    "UnpairedPreferenceModule",
]
