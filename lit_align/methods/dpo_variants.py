"""Paired DPO variants of the alignment survey: one short class per objective.

The objectives themselves are the pure functions of :mod:`lit_align.losses.dpo_variants` and
:mod:`lit_align.losses.gpo`; the classes here only hold hyper-parameters and, for β-DPO and BCO,
running statistics (registered buffers, so they are checkpointed; updated in training only and
averaged over every process under distributed training).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated, ClassVar, Literal

import torch

from lit_align.data.errors import DataError
from lit_align.losses import (
    PreferenceLoss,
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
    gpo_loss,
    nca_pair_loss,
    odpo_loss,
    rdpo_loss,
    sppo_hard_loss,
)
from lit_align.losses.dpo import log_ratios
from lit_align.methods.paired import PairedPreferenceModule
from lit_align.methods.running import RunningMean
from lit_align.runtime.trainer import distributed
from lit_align.settings import (
    Finite,
    LabelNoise,
    Momentum,
    NonNegative,
    Positive,
    Range,
)


def _global_moments(module: PairedPreferenceModule, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of ``values`` over every process: [count, sum, sum of squares] are gathered,
    so processes may hold different numbers of values. One process or no trainer: local."""
    values = values.detach()
    values = values.float() if values.device.type == "mps" else values.double()
    sums = torch.stack([values.new_tensor(values.numel()), values.sum(), (values**2).sum()])
    if distributed(module):
        sums = module.all_gather(sums).reshape(-1, 3).sum(0)
    count, total, squares = sums
    mean = total / count.clamp(min=1)
    variance = (squares - count * mean**2) / (count - 1).clamp(min=1)
    return mean, variance.clamp(min=0).sqrt()


class RDPO(PairedPreferenceModule):
    """R-DPO (Park et al. 2024): DPO with a length regulariser, -log sigma(beta m + alpha (|y_w| - |y_l|)).

    Args:
        beta: inverse temperature, the strength of the implicit KL penalty to the reference.
        alpha: weight of the length difference |y_w| - |y_l| (tokens) in the logit; 0 is DPO.
    """

    def __init__(self, beta: Positive = 0.1, alpha: NonNegative = 0.05, **kwargs):
        super().__init__(**kwargs)
        self.beta, self.alpha = beta, alpha

    def loss(self, chosen, rejected, ref_chosen, ref_rejected) -> PreferenceLoss:
        return rdpo_loss(
            chosen.sum,
            rejected.sum,
            ref_chosen.sum,
            ref_rejected.sum,
            chosen.count,
            rejected.count,
            self.beta,
            self.alpha,
        )


class DPOP(PairedPreferenceModule):
    """DPO-Positive (Pal et al. 2024, Smaug): DPO plus a penalty when log pi(y_w) drops below the reference.

    Args:
        beta: inverse temperature, as in DPO.
        lam: lambda, weight of max(0, log pi_ref(y_w) - log pi(y_w)) inside the logit; 0 is DPO.
    """

    def __init__(self, beta: Positive = 0.3, lam: NonNegative = 50.0, **kwargs):
        super().__init__(**kwargs)
        self.beta, self.lam = beta, lam

    def loss(self, chosen, rejected, ref_chosen, ref_rejected) -> PreferenceLoss:
        return dpop_loss(chosen.sum, rejected.sum, ref_chosen.sum, ref_rejected.sum, self.beta, self.lam)


class BetaDPO(PairedPreferenceModule):
    """β-DPO (Wu et al. 2024): DPO with a batch-level beta and β-guided filtering of outlier pairs.

    In training, each batch first updates the moving mean M_0 and std of the log-ratio margin
    (all pairs, all processes), then keeps floor(B (1 - rho)) pairs drawn with Gaussian weights
    around M_0, and uses beta_batch = beta (1 + alpha (mean kept margin - M_0)). Evaluation uses
    every pair and leaves the statistics alone.

    Args:
        beta: beta_0, the base inverse temperature.
        alpha: how strongly beta follows the batch margin; 0 gives a fixed beta.
        rho: fraction of pairs filtered out of each training batch, in [0, 1); 0 keeps all.
        momentum: weight of the old value in the moving mean/std of the margin (the authors use 0.9);
            the first training batch initialises them.
        min_beta: lower bound on the batch beta.
    """

    def __init__(
        self,
        beta: Positive = 0.1,
        alpha: NonNegative = 0.6,
        rho: Annotated[float, Range(0, 1, high_open=True)] = 0.2,
        momentum: Momentum = 0.9,
        min_beta: Positive = 1e-3,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.beta, self.alpha, self.rho, self.momentum, self.min_beta = beta, alpha, rho, momentum, min_beta
        self.register_buffer("margin_mean", torch.zeros(()))
        self.register_buffer("margin_std", torch.zeros(()))
        self.register_buffer("margin_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def _update_statistics(self, margins: torch.Tensor) -> None:
        mean, std = _global_moments(self, margins)
        weight = self.momentum if self.margin_updates > 0 else 0.0
        self.margin_mean.mul_(weight).add_((1 - weight) * mean.to(self.margin_mean.dtype))
        self.margin_std.mul_(weight).add_((1 - weight) * std.to(self.margin_std.dtype))
        self.margin_updates += 1

    def loss(self, chosen, rejected, ref_chosen, ref_rejected) -> PreferenceLoss:
        h_w, h_l = log_ratios(chosen.sum, rejected.sum, ref_chosen.sum, ref_rejected.sum)
        margins = (h_w - h_l).detach()
        keep = None
        if self.training:
            self._update_statistics(margins)
            keep = beta_dpo_filter(margins, self.margin_mean, self.margin_std, self.rho)
            batch_margin, _ = _global_moments(self, margins[keep])
        else:
            batch_margin = margins.mean()
        beta_batch = beta_dpo_beta(batch_margin, self.margin_mean, self.beta, self.alpha, self.min_beta)
        return beta_dpo_loss(chosen.sum, rejected.sum, ref_chosen.sum, ref_rejected.sum, beta_batch, self.beta, keep)


class ODPO(PairedPreferenceModule):
    """ODPO (Amini et al. 2024): DPO whose margin must exceed an offset alpha f(score_w - score_l).

    Scores come from the batch fields ``score_chosen``/``score_rejected`` (``[B]``, NaN where a
    pair has none); pairs without both scores, or batches without the fields, use
    ``default_offset``.

    Args:
        beta: inverse temperature, as in DPO.
        alpha: scale of the offset.
        offset_fn: f of the score difference: ``log`` (the paper; needs score_chosen >
            score_rejected), ``log1p`` (sign(d) log(1 + |d|)) or ``identity``.
        default_offset: offset of pairs without scores (0: plain DPO on them).
    """

    def __init__(
        self,
        beta: Positive = 0.1,
        alpha: NonNegative = 1.0,
        offset_fn: Literal["log", "log1p", "identity"] = "log",
        default_offset: Finite = 0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.beta, self.alpha, self.offset_fn, self.default_offset = beta, alpha, offset_fn, default_offset

    def check_example(self, example: dict) -> tuple[str, str] | None:
        """A pair needs both scores or neither; with ``offset_fn: log``, score_chosen > score_rejected."""
        chosen, rejected = example.get("score_chosen", math.nan), example.get("score_rejected", math.nan)
        if math.isnan(chosen) != math.isnan(rejected):
            missing = "score_chosen" if math.isnan(chosen) else "score_rejected"
            return (
                missing,
                "missing while the other score is given: ODPO's offset needs both scores of a pair (or neither, for "
                "default_offset)",
            )
        if self.offset_fn == "log" and not math.isnan(chosen) and not chosen > rejected:
            return "score_chosen", (
                f"ODPO offset_fn=log needs score_chosen > score_rejected (it takes the log of their difference), got "
                f"{chosen:g} and {rejected:g}; use offset_fn log1p or identity, or drop such pairs"
            )
        return None

    def check_examples(self, split: str, source: str, examples: list[dict]) -> None:
        """Also: some training pair has scores (without any, every offset is ``default_offset``)."""
        super().check_examples(split, source, examples)
        if split == "train" and not any(not math.isnan(example.get("score_chosen", math.nan)) for example in examples):
            raise DataError(
                source,
                "no training pair has score_chosen and score_rejected, so ODPO's offset would be "
                f"default_offset={self.default_offset:g} "
                "for every pair (plain DPO with a margin); add the scores, or use DPO",
            )

    def loss(self, chosen, rejected, ref_chosen, ref_rejected) -> PreferenceLoss:
        batch = self.current_batch if self.current_batch is not None else {}
        return odpo_loss(
            chosen.sum,
            rejected.sum,
            ref_chosen.sum,
            ref_rejected.sum,
            batch.get("score_chosen"),
            batch.get("score_rejected"),
            self.beta,
            self.alpha,
            self.offset_fn,
            self.default_offset,
        )


class EXO(PairedPreferenceModule):
    """EXO, pairwise (Ji et al. 2024): reverse KL from the policy's pair distribution to the smoothed label.

    Args:
        beta: scale of the log-ratios.
        label_smoothing: eps in (0, 0.5), the target probability of the rejected response.
    """

    def __init__(
        self,
        beta: Positive = 0.1,
        label_smoothing: Annotated[float, Range(0, 0.5, low_open=True, high_open=True)] = 1e-3,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.beta, self.label_smoothing = beta, label_smoothing

    def loss(self, chosen, rejected, ref_chosen, ref_rejected) -> PreferenceLoss:
        return exo_pair_loss(
            chosen.sum, rejected.sum, ref_chosen.sum, ref_rejected.sum, self.beta, self.label_smoothing
        )


class BetaObjective(PairedPreferenceModule):
    """A paired objective whose only hyper-parameter is ``beta``: subclasses name the pure loss.

    Args:
        beta: scale of the implicit rewards beta (log pi - log pi_ref); see each subclass.
    """

    objective: ClassVar[Callable[..., PreferenceLoss]]

    def __init__(self, beta: Positive = 0.1, **kwargs):
        super().__init__(**kwargs)
        self.beta = beta

    def loss(self, chosen, rejected, ref_chosen, ref_rejected) -> PreferenceLoss:
        return type(self).objective(chosen.sum, rejected.sum, ref_chosen.sum, ref_rejected.sum, self.beta)


class NCA(BetaObjective):
    """NCA, pairwise (Chen et al. 2024): classifies each response on its own implicit reward
    (``beta``: scale of the implicit rewards)."""

    objective = staticmethod(nca_pair_loss)


class APOZero(BetaObjective):
    """APO-zero (D'Oosterlinck et al. 2024): raise chosen and lower rejected likelihood (chosen
    better than the model; ``beta``: scale of the implicit rewards)."""

    objective = staticmethod(apo_zero_loss)


class APODown(BetaObjective):
    """APO-down (D'Oosterlinck et al. 2024): lower both likelihoods, the rejected more (chosen
    worse than the model; ``beta``: scale of the implicit rewards)."""

    objective = staticmethod(apo_down_loss)


class SPPOHard(BetaObjective):
    """SPPO with hard win labels (Wu et al. 2024): log-ratios regressed to +-1/(2 beta)
    (``beta`` = 1 / eta; chosen log-ratios are driven to +1/(2 beta), rejected ones to -1/(2 beta))."""

    objective = staticmethod(sppo_hard_loss)


class BCOPair(PairedPreferenceModule):
    """BCO on pairs (Jung et al. 2024): chosen/rejected classifier on the implicit reward minus a running shift.

    The reward shift delta is a moving average of the batch-mean implicit reward (chosen and
    rejected together, all processes), updated in training before each step's loss.

    Args:
        beta: scale of the implicit rewards.
        momentum: weight of the old value in the moving average of the reward (the first
            training batch initialises it).
    """

    def __init__(self, beta: Positive = 0.1, momentum: Momentum = 0.9, **kwargs):
        super().__init__(**kwargs)
        self.beta = beta
        self.reward_shift = RunningMean(momentum)  # an average of batch means: one update per batch

    def loss(self, chosen, rejected, ref_chosen, ref_rejected) -> PreferenceLoss:
        if self.training:
            ratios = log_ratios(chosen.sum, rejected.sum, ref_chosen.sum, ref_rejected.sum)
            mean, _ = _global_moments(self, self.beta * torch.cat(ratios))
            self.reward_shift.update(mean, 1)
        return bco_pair_loss(
            chosen.sum, rejected.sum, ref_chosen.sum, ref_rejected.sum, self.beta, self.reward_shift.value
        )


AOT_VARIANTS = {"paired": aot_pair_loss, "unpaired": aot_loss}


class AOT(PairedPreferenceModule):
    """AOT (Melnyk et al. 2024): distributional alignment by sorting log-ratios across the batch.

    Args:
        beta: scale of the log-ratios.
        label_smoothing: eps in [0, 0.5), as in cDPO.
        variant: ``paired``: the policy's log pi(y_w) - log pi(y_l) should dominate the
            reference's in distribution; ``unpaired``: chosen log-ratios should dominate rejected ones.
    """

    def __init__(
        self,
        beta: Positive = 0.1,
        label_smoothing: LabelNoise = 0.0,
        variant: Literal["paired", "unpaired"] = "paired",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.beta, self.label_smoothing, self.variant = beta, label_smoothing, variant

    def loss(self, chosen, rejected, ref_chosen, ref_rejected) -> PreferenceLoss:
        return AOT_VARIANTS[self.variant](
            chosen.sum, rejected.sum, ref_chosen.sum, ref_rejected.sum, self.beta, self.label_smoothing
        )


class GPO(PairedPreferenceModule):
    """GPO (Tang et al. 2024): a convex function f of beta m; logistic is DPO, hinge is SLiC, squared is IPO-like.

    Args:
        beta: scale of the log-ratio margin (target margin 1 / beta for hinge, squared, truncated quadratic).
        function: the convex f: logistic log(1+e^-x), hinge max(0, 1-x), squared (x-1)^2,
            exponential e^-x, truncated_quadratic max(0, 1-x)^2, savage 1/(1+e^x)^2.
    """

    def __init__(
        self,
        beta: Positive = 0.1,
        function: Literal["logistic", "hinge", "squared", "exponential", "truncated_quadratic", "savage"] = "logistic",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.beta, self.function = beta, function

    def loss(self, chosen, rejected, ref_chosen, ref_rejected) -> PreferenceLoss:
        return gpo_loss(chosen.sum, rejected.sum, ref_chosen.sum, ref_rejected.sum, self.beta, self.function)
