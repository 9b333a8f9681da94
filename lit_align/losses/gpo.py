"""GPO: Generalized Preference Optimization (Tang et al. 2024, "Generalized Preference
Optimization: A Unified Approach to Offline Alignment", arXiv:2402.05749).

GPO writes an offline preference loss as a convex function ``f`` of the scaled log-ratio margin

    rho = beta * m,   m = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)),
    loss = f(rho)                                                    (the GPO loss, Sec. 3)

and recovers known objectives through the choice of ``f`` (the paper's table of examples):

==========================  ===========================  ======================================
name                        f(rho)                       known as
==========================  ===========================  ======================================
``logistic``                log(1 + e^{-rho})            DPO (= ``dpo_loss``)
``hinge``                   max(0, 1 - rho)              SLiC (= ``hinge_loss``)
``squared``                 (rho - 1)^2                  IPO, up to a factor (see below)
``exponential``             e^{-rho} (*)                 (new in GPO)
``truncated_quadratic``     max(0, 1 - rho)^2            (new in GPO)
``savage``                  1 / (1 + e^{rho})^2          (new in GPO)
==========================  ===========================  ======================================

(*) continued along its tangent below rho = -30, so the loss stays finite for any finite margin.

Squared vs IPO: (beta m - 1)^2 = beta^2 (m - 1/beta)^2, and ``ipo_loss`` with tau is
(m - 1/(2 tau))^2, so ``gpo(function="squared", beta=b) == b**2 * ipo_loss(tau=b/2)`` exactly:
the same minimiser (target margin m = 1/beta) and gradients scaled by beta^2.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from types import MappingProxyType

import torch
import torch.nn.functional as F

from lit_align.losses.dpo import log_ratios, preference_output
from lit_align.losses.types import PreferenceLoss


def _logistic(rho: torch.Tensor) -> torch.Tensor:
    return F.softplus(-rho)  # log(1 + e^{-rho}), stable for large |rho|


def _hinge(rho: torch.Tensor) -> torch.Tensor:
    return torch.relu(1 - rho)


def _squared(rho: torch.Tensor) -> torch.Tensor:
    return (rho - 1) ** 2


EXPONENTIAL_LINEAR_BELOW = -30.0
"""Below this rho the exponential loss continues along its tangent (its value there is e^30, about 1e13)."""


def _exponential(rho: torch.Tensor) -> torch.Tensor:
    """e^{-rho}, continued linearly (value and slope matching) for rho < -30: still convex and
    decreasing with a gradient, and finite for any finite margin (e^{-rho} overflows float32 for
    rho < -88, a margin of -880 nats at beta 0.1)."""
    cut = EXPONENTIAL_LINEAR_BELOW
    top = math.exp(-cut)
    return torch.where(rho >= cut, torch.exp(-rho.clamp(min=cut)), top * (1 + (cut - rho)))


def _truncated_quadratic(rho: torch.Tensor) -> torch.Tensor:
    return torch.relu(1 - rho) ** 2


def _savage(rho: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(-rho) ** 2  # 1 / (1 + e^{rho})^2


GPO_FUNCTIONS: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] = MappingProxyType(
    {
        "logistic": _logistic,
        "hinge": _hinge,
        "squared": _squared,
        "exponential": _exponential,
        "truncated_quadratic": _truncated_quadratic,
        "savage": _savage,
    }
)
"""Name -> convex function f of rho = beta * m (read-only)."""


def gpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float = 0.1,
    function: str = "logistic",
) -> PreferenceLoss:
    """GPO (Tang et al. 2024): loss = f(beta m) for the convex ``f`` named by ``function``.

    Args:
        beta: scale of the log-ratio margin; with the hinge/squared/truncated-quadratic
            functions the target margin is m = 1 / beta.
        function: the convex function, one of :data:`GPO_FUNCTIONS` (see the module docstring).
    """
    try:
        f = GPO_FUNCTIONS[function]
    except KeyError:
        raise ValueError(f"unknown GPO function {function!r}; choose one of {sorted(GPO_FUNCTIONS)}") from None
    h_w, h_l = log_ratios(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    losses = f(beta * h_w - beta * h_l)
    return preference_output(losses, h_w, h_l, beta)
