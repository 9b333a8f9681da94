"""Unpaired objectives (KTO, NPO, BCO): one short class per objective on
:class:`lit_align.methods.unpaired.UnpairedPreferenceModule`.

The objectives themselves are the pure functions of :mod:`lit_align.losses.unpaired`; the
classes hold hyper-parameters and the statistics the losses need: KTO's reference point z0
(averaged over every process's rows of the step) and BCO's reward shift (a registered buffer,
so it is checkpointed; updated in training only, from every process's rewards).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Optional

import torch

from lit_align.data.contract import DataRequest
from lit_align.data.errors import DataError
from lit_align.errors import SettingError
from lit_align.losses.types import UnpairedLoss
from lit_align.losses.unpaired import bco_loss, kto_loss, kto_reference_point, npo_loss
from lit_align.methods.running import RunningMean
from lit_align.methods.unpaired import UnpairedPreferenceModule
from lit_align.runtime.trainer import attached_trainer
from lit_align.settings import Momentum, NonNegative, Positive

log = logging.getLogger(__name__)


def _gather_totals(module: UnpairedPreferenceModule):
    """A function mapping this process's ``[sum, count]`` to every process's (``all_gather``;
    the tensor itself on one process), or None when no trainer is attached."""
    if attached_trainer(module) is None:
        return None
    return lambda totals: module.all_gather(totals).reshape(-1, totals.numel())


class KTO(UnpairedPreferenceModule):
    """KTO (Ethayarajh et al. 2024): Kahneman-Tversky value of each completion's log-ratio against a KL reference point.

    The reference point z0 is the mean log-ratio of mismatched (prompt, completion) rows, one
    per example, fixed when the data is prepared (so it works at batch size 1 and with the
    cached reference); the sums and counts are gathered over every process before the mean,
    then clamped at 0 and detached. Logged as ``kl``.

    Args:
        beta: scale of the log-ratios inside the sigmoid; larger keeps the policy closer to the reference.
        desirable_weight: lambda_D, weight of the desirable examples' losses.
        undesirable_weight: lambda_U, weight of the undesirable examples' losses (replaced when
            ``balance_classes`` is set).
        balance_classes: before fit (and validate/test), set lambda_U = lambda_D n_D / n_U from the
            data module's training ``class_counts``, so that lambda_D n_D / (lambda_U n_U) = 1: both
            classes carry the same total weight. The paper recommends this ratio in [1, 4/3]; 1 is
            its lower end.
    """

    needs_mismatched_completions = True

    def __init__(
        self,
        beta: Positive = 0.1,
        desirable_weight: Positive = 1.0,
        undesirable_weight: Positive = 1.0,
        balance_classes: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.beta, self.desirable_weight, self.undesirable_weight, self.balance_classes = (
            beta,
            desirable_weight,
            undesirable_weight,
            balance_classes,
        )

    def data_request(self) -> DataRequest:
        return replace(super().data_request(), class_counts=self.balance_classes)

    def prepare_data_for_method(self) -> None:
        super().prepare_data_for_method()
        if self.balance_classes and self.served_data is not None:
            self.balance_class_weights(self.served_data.class_counts)

    def balance_class_weights(self, class_counts: Optional[dict[str, int]]) -> None:
        """Set lambda_U so that lambda_D n_D / (lambda_U n_U) = 1."""
        counts = class_counts or {}
        desirable, undesirable = counts.get("desirable", 0), counts.get("undesirable", 0)
        if desirable <= 0 or undesirable <= 0:
            raise SettingError(
                None,
                "balance_classes",
                "KTO balance_classes needs desirable and undesirable training examples; the data module counted "
                f"{counts or 'none'}",
            )
        self.undesirable_weight = self.desirable_weight * desirable / undesirable
        log.info(
            "KTO balance_classes: %d desirable, %d undesirable examples -> desirable_weight %.4g, undesirable_weight "
            "%.4g",
            desirable,
            undesirable,
            self.desirable_weight,
            self.undesirable_weight,
        )

    def loss(self, completions, ref_completions, desirable, mismatched, ref_mismatched) -> UnpairedLoss:
        z0 = kto_reference_point(mismatched.sum, ref_mismatched.sum, _gather_totals(self))
        return kto_loss(
            completions.sum,
            ref_completions.sum,
            desirable,
            z0,
            self.beta,
            self.desirable_weight,
            self.undesirable_weight,
        )


class NPO(UnpairedPreferenceModule):
    """NPO (Zhang et al. 2024): unlearning by lowering undesirable completions' likelihood with a saturating loss.

    Undesirable examples are the forget set: each contributes (2/beta) log(1 + (pi/pi_ref)^beta).
    Desirable examples contribute nothing to that term; with ``retain_weight > 0`` they are the
    retain set of the paper's NPO+RT: ``retain_weight`` times their length-normalised NLL,
    -log pi(y|x) / |y|, is added (logged as ``retain_nll``). Losses are averaged over all
    examples of the batch, so each term is weighted by its class's share of the batch.

    Args:
        beta: inverse temperature; how quickly the push-down saturates once a completion's
            likelihood is below the reference's.
        retain_weight: weight of the NLL of desirable completions (0: plain NPO; 1: NPO+RT as in the paper).
    """

    def __init__(self, beta: Positive = 0.1, retain_weight: NonNegative = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.beta, self.retain_weight = beta, retain_weight

    def check_examples(self, split: str, source: str, examples: list[dict]) -> None:
        """The training split has undesirable examples (the forget set), and desirable ones (the
        retain set) when ``retain_weight > 0``: without them a term would silently be zero."""
        if split != "train":
            return
        labels = [bool(example["label"]) for example in examples]
        if not any(not label for label in labels):
            raise DataError(
                source,
                "NPO lowers the likelihood of undesirable completions (label false), and no training record has one",
                None,
                "label",
            )
        if self.retain_weight > 0 and not any(labels):
            raise DataError(
                source,
                f"retain_weight={self.retain_weight:g} trains on desirable completions (label true, the retain set), "
                "and no training record has one; set retain_weight to 0 or add them",
                None,
                "label",
            )

    def loss(self, completions, ref_completions, desirable, mismatched, ref_mismatched) -> UnpairedLoss:
        output = npo_loss(completions.sum, ref_completions.sum, self.beta, desirable)
        if self.retain_weight == 0:
            return output
        nll = -completions.mean
        retain = torch.where(desirable, nll, torch.zeros_like(nll))
        return output._replace(
            losses=output.losses + self.retain_weight * retain,
            metrics={**output.metrics, "retain_nll": nll.detach()[desirable]},
        )


class BCO(UnpairedPreferenceModule):
    """BCO (Jung et al. 2024): desirable/undesirable classifier on the implicit reward minus a reward shift delta.

    delta is the running mean of the (detached) implicit rewards of both classes, gathered over
    every process; it is updated in training before each step's loss and kept in a buffer
    (checkpointed). Evaluation uses the stored value. The paper's density-ratio weighting (UDM)
    is not implemented.

    Args:
        beta: scale of the implicit rewards beta (log pi - log pi_ref).
        delta_momentum: ``null`` (default): delta is the mean of every reward seen in training
            so far (the authors' implementation, TRL's running moments); a value in [0, 1):
            an exponential moving average with this weight on the old value (the first training
            batch initialises it).
    """

    def __init__(self, beta: Positive = 0.1, delta_momentum: Optional[Momentum] = None, **kwargs):
        super().__init__(**kwargs)
        self.beta = beta
        self.reward_shift = RunningMean(delta_momentum)

    @torch.no_grad()
    def update_reward_shift(self, rewards: torch.Tensor) -> None:
        """Fold a batch's rewards (every process's) into delta."""
        rewards = rewards.detach().float()
        totals = torch.stack([rewards.sum(), rewards.new_tensor(rewards.numel())])
        gather = _gather_totals(self)
        if gather is not None:
            totals = gather(totals).sum(0)
        self.reward_shift.update(totals[0], totals[1])

    def loss(self, completions, ref_completions, desirable, mismatched, ref_mismatched) -> UnpairedLoss:
        if self.training:
            self.update_reward_shift(self.beta * (completions.sum - ref_completions.sum))
        return bco_loss(completions.sum, ref_completions.sum, desirable, self.reward_shift.value, self.beta)
