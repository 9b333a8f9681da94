"""Reference-free paired objectives: ORPO, SimPO, CPO (no reference model is built)."""

from __future__ import annotations

from lit_align.losses import PreferenceLoss, cpo_loss, orpo_loss, simpo_loss
from lit_align.methods.paired import PairedPreferenceModule
from lit_align.settings import NonNegative, Positive


class ORPO(PairedPreferenceModule):
    """Odds-Ratio Preference Optimization (Hong et al. 2024): SFT NLL + lambda * odds-ratio term.

    Args:
        lam: lambda, weight of the odds-ratio term.
    """

    needs_reference = False

    def __init__(self, lam: NonNegative = 0.1, **kwargs):
        super().__init__(**kwargs)
        self.lam = lam

    def loss(self, chosen, rejected, ref_chosen=None, ref_rejected=None) -> PreferenceLoss:
        return orpo_loss(chosen.sum, rejected.sum, chosen.count, rejected.count, self.lam)


class SimPO(PairedPreferenceModule):
    """Simple Preference Optimization (Meng et al. 2024): length-normalised reward, margin gamma.

    Args:
        beta: reward scale.
        gamma: target reward margin.
    """

    needs_reference = False

    def __init__(self, beta: Positive = 2.0, gamma: NonNegative = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.beta, self.gamma = beta, gamma

    def loss(self, chosen, rejected, ref_chosen=None, ref_rejected=None) -> PreferenceLoss:
        return simpo_loss(chosen.sum, rejected.sum, chosen.count, rejected.count, self.beta, self.gamma)


class CPO(PairedPreferenceModule):
    """Contrastive Preference Optimization (Xu et al. 2024): reference-free DPO term + NLL on chosen.

    Args:
        beta: inverse temperature of the preference term.
        nll_weight: weight of the NLL term on chosen responses.
    """

    needs_reference = False

    def __init__(self, beta: Positive = 0.1, nll_weight: NonNegative = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.beta, self.nll_weight = beta, nll_weight

    def loss(self, chosen, rejected, ref_chosen=None, ref_rejected=None) -> PreferenceLoss:
        return cpo_loss(chosen.sum, rejected.sum, chosen.count, self.beta, self.nll_weight)
