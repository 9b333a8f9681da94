"""Listwise objectives on K scored responses per prompt: RRHF, PRO (reference-free) and LiPO-lambda.

Use with :class:`lit_align.data.ListwiseDataModule`.
"""

from __future__ import annotations

from lit_align.losses.listwise import lipo_lambda_loss, pro_loss, rrhf_loss
from lit_align.losses.types import ListwiseLoss
from lit_align.methods.listwise import ListwisePreferenceModule
from lit_align.settings import NonNegative, Positive


class RRHF(ListwisePreferenceModule):
    """Rank Responses to align with Human Feedback (Yuan et al. 2023): a hinge on every misordered
    pair of length-normalised log-probs, plus SFT on the best-scored response.

    Args:
        sft_weight: weight of the SFT (per-token NLL) term on the best response.
    """

    needs_reference = False

    def __init__(self, sft_weight: NonNegative = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.sft_weight = sft_weight

    def loss(self, policy, reference, scores) -> ListwiseLoss:
        return rrhf_loss(policy.mean, scores, policy.valid, self.sft_weight)


class PRO(ListwisePreferenceModule):
    """Preference Ranking Optimization (Song et al. 2023): Plackett-Luce over length-normalised
    log-probs (each response against those ranked below it), plus SFT on the best response.

    Args:
        beta: reward scale (inverse temperature of every softmax).
        sft_weight: weight of the SFT (per-token NLL) term on the best response.
        score_temperature: scale each competitor by its score gap (the paper's reward-weighted form).
    """

    needs_reference = False

    def __init__(self, beta: Positive = 1.0, sft_weight: NonNegative = 0.1, score_temperature: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.beta, self.sft_weight, self.score_temperature = beta, sft_weight, score_temperature

    def loss(self, policy, reference, scores) -> ListwiseLoss:
        return pro_loss(policy.mean, scores, policy.valid, self.beta, self.sft_weight, self.score_temperature)


class LiPO(ListwisePreferenceModule):
    """LiPO-lambda (Liu et al. 2024): DPO rewards ranked with LambdaLoss-weighted pairwise logistic
    losses (pairs weighted by their gain and rank-discount differences).

    Args:
        beta: inverse temperature of the implicit reward beta log(pi / pi_ref).
    """

    def __init__(self, beta: Positive = 0.1, **kwargs):
        super().__init__(**kwargs)
        self.beta = beta

    def loss(self, policy, reference, scores) -> ListwiseLoss:
        return lipo_lambda_loss(policy.sum, reference.sum, scores, policy.valid, self.beta)
