"""DPO and its reference-based variants: one short class per objective."""

from __future__ import annotations

from typing import Optional

from lit_align.losses import (
    PreferenceLoss,
    dpo_loss,
    hinge_loss,
    ipo_loss,
    robust_dpo_loss,
)
from lit_align.methods.paired import PairedPreferenceModule
from lit_align.model.logprobs import SequenceLogps
from lit_align.settings import LabelNoise, Positive


class DPO(PairedPreferenceModule):
    """Direct Preference Optimization (Rafailov et al. 2023); ``label_smoothing`` > 0 is cDPO.

    Args:
        beta: inverse temperature, the strength of the implicit KL penalty to the reference.
        label_smoothing: assumed label-noise rate eps (conservative DPO); 0 is plain DPO.
    """

    def __init__(self, beta: Positive = 0.1, label_smoothing: LabelNoise = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.beta, self.label_smoothing = beta, label_smoothing

    def loss(
        self,
        chosen: SequenceLogps,
        rejected: SequenceLogps,
        ref_chosen: Optional[SequenceLogps],
        ref_rejected: Optional[SequenceLogps],
    ) -> PreferenceLoss:
        return dpo_loss(chosen.sum, rejected.sum, ref_chosen.sum, ref_rejected.sum, self.beta, self.label_smoothing)


class RobustDPO(DPO):
    """Provably robust DPO (Chowdhury et al. 2024): unbiased under label-flip rate ``label_smoothing``.

    Args:
        beta: inverse temperature.
        label_smoothing: the known label-flip rate eps in [0, 0.5).
    """

    def __init__(self, beta: Positive = 0.1, label_smoothing: LabelNoise = 0.1, **kwargs):
        super().__init__(beta=beta, label_smoothing=label_smoothing, **kwargs)

    def loss(self, chosen, rejected, ref_chosen, ref_rejected) -> PreferenceLoss:
        return robust_dpo_loss(
            chosen.sum, rejected.sum, ref_chosen.sum, ref_rejected.sum, self.beta, self.label_smoothing
        )


class HingeDPO(PairedPreferenceModule):
    """Hinge loss on the DPO margin (SLiC-HF, Zhao et al. 2023).

    Args:
        beta: the loss is zero once the log-ratio margin exceeds 1 / beta.
    """

    def __init__(self, beta: Positive = 0.1, **kwargs):
        super().__init__(**kwargs)
        self.beta = beta

    def loss(self, chosen, rejected, ref_chosen, ref_rejected) -> PreferenceLoss:
        return hinge_loss(chosen.sum, rejected.sum, ref_chosen.sum, ref_rejected.sum, self.beta)


class IPO(PairedPreferenceModule):
    """Identity Preference Optimisation (Azar et al. 2023).

    Args:
        beta: tau; the log-ratio margin is regressed to 1 / (2 tau).
    """

    def __init__(self, beta: Positive = 0.1, **kwargs):
        super().__init__(**kwargs)
        self.beta = beta

    def loss(self, chosen, rejected, ref_chosen, ref_rejected) -> PreferenceLoss:
        return ipo_loss(chosen.sum, rejected.sum, ref_chosen.sum, ref_rejected.sum, self.beta)
