"""Pure objective functions: per-sequence tensors and hyper-parameters in, per-example losses out."""

from lit_align.losses.dpo import dpo_loss, hinge_loss, ipo_loss, robust_dpo_loss
from lit_align.losses.dpo_variants import (
    ODPO_OFFSET_FUNCTIONS,
    aot_loss,
    aot_pair_loss,
    apo_down_loss,
    apo_zero_loss,
    bco_pair_loss,
    beta_dpo_beta,
    beta_dpo_filter,
    beta_dpo_loss,
    dpop_loss,
    exo_pair_loss,
    nca_pair_loss,
    odpo_loss,
    rdpo_loss,
    sppo_hard_loss,
)
from lit_align.losses.gpo import GPO_FUNCTIONS, gpo_loss
from lit_align.losses.listwise import (
    lambda_weights,
    lipo_lambda_loss,
    pro_loss,
    rrhf_loss,
)
from lit_align.losses.reference_free import cpo_loss, orpo_loss, simpo_loss
from lit_align.losses.reward import (
    RewardLoss,
    bradley_terry_loss,
    listwise_bradley_terry_loss,
)
from lit_align.losses.tdpo import tdpo_loss
from lit_align.losses.trpo import (
    backtracking_line_search,
    categorical_kl,
    conjugate_gradient,
    fisher_vector_product,
    trpo_surrogate,
    trust_region_step_size,
)
from lit_align.losses.types import ListwiseLoss, PreferenceLoss, UnpairedLoss
from lit_align.losses.unpaired import bco_loss, kto_loss, kto_reference_point, npo_loss

__all__ = [
    "GPO_FUNCTIONS",
    "ODPO_OFFSET_FUNCTIONS",
    "ListwiseLoss",
    "PreferenceLoss",
    "RewardLoss",
    "UnpairedLoss",
    "aot_loss",
    "aot_pair_loss",
    "apo_down_loss",
    "apo_zero_loss",
    "backtracking_line_search",
    "bco_loss",
    "bco_pair_loss",
    "beta_dpo_beta",
    "beta_dpo_filter",
    "beta_dpo_loss",
    "bradley_terry_loss",
    "categorical_kl",
    "conjugate_gradient",
    "cpo_loss",
    "dpo_loss",
    "dpop_loss",
    "exo_pair_loss",
    "fisher_vector_product",
    "gpo_loss",
    "hinge_loss",
    "ipo_loss",
    "kto_loss",
    "kto_reference_point",
    "lambda_weights",
    "lipo_lambda_loss",
    "listwise_bradley_terry_loss",
    "nca_pair_loss",
    "npo_loss",
    "odpo_loss",
    "orpo_loss",
    "pro_loss",
    "rdpo_loss",
    "robust_dpo_loss",
    "rrhf_loss",
    "simpo_loss",
    "sppo_hard_loss",
    "tdpo_loss",
    "trpo_surrogate",
    "trust_region_step_size",
]
