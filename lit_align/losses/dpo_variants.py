"""Paired DPO variants from the alignment survey: each a pure function of per-pair tensors.

Every function takes the summed response log-probs ``[B]`` of the policy (``policy_chosen``,
``policy_rejected``) and the reference (``reference_chosen``, ``reference_rejected``), plus the
lengths, scores or running statistics an objective needs, and returns a :class:`PreferenceLoss`
whose rewards are the DPO implicit rewards r_w = beta (log pi(y_w|x) - log pi_ref(y_w|x)) and
r_l likewise (detached). Notation used throughout:

    h_w = log pi(y_w|x) - log pi_ref(y_w|x),  h_l likewise   (log-ratios)
    m   = h_w - h_l                                           (log-ratio margin)
    sp(z) = log(1 + e^z) = -log sigma(-z)

Anything stateful (running means of β-DPO and BCO) lives in the LightningModule and is passed in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from types import MappingProxyType

import torch
import torch.nn.functional as F

from lit_align.losses.dpo import check_label_smoothing, conservative_logistic, log_ratios, preference_output
from lit_align.losses.types import PreferenceLoss

Number = float | torch.Tensor


def _per_pair(value: Number, like: torch.Tensor) -> torch.Tensor:
    """A scalar (or [B]) value as a [B] tensor shaped and typed like ``like`` (for metrics)."""
    return torch.as_tensor(value, dtype=like.dtype, device=like.device).expand_as(like)


# ----------------------------------------------------------------------------- R-DPO
def rdpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float = 0.1,
    alpha: float = 0.05,
) -> PreferenceLoss:
    """R-DPO (Park et al. 2024, "Disentangling Length from Quality in Direct Preference
    Optimization", the length-regularised DPO objective of Sec. 4).

        loss = -log sigma(beta m + alpha (|y_w| - |y_l|))

    Derivation (why the length term is *added*): R-DPO optimises the RLHF objective with a
    length penalty, max E[r(x,y) - alpha |y|] - beta KL(pi || pi_ref). Its optimum gives
    r(x,y) = beta log pi/pi_ref + alpha |y| + const, and the Bradley-Terry likelihood of the
    data, sigma(r(y_w) - r(y_l)), is the expression above. The length difference thus
    "explains" part of each preference: when the chosen response is the longer one the logit
    already gets alpha (|y_w| - |y_l|) > 0, so the policy gains less from raising its
    log-ratio margin on pairs won by length, and long answers are not learned as a shortcut.
    ``alpha = 0`` is DPO.

    Args:
        chosen_lengths / rejected_lengths: ``[B]`` response lengths |y| in tokens.
        beta: inverse temperature of the implicit KL penalty, as in DPO.
        alpha: length-regulariser weight (per token of length difference); >= 0.

    Metrics: ``length_term`` = alpha (|y_w| - |y_l|).
    """
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0 (it penalises length), got {alpha}")
    h_w, h_l = log_ratios(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    length_term = alpha * (chosen_lengths - rejected_lengths).to(h_w.dtype)
    losses = -F.logsigmoid(beta * (h_w - h_l) + length_term)
    return preference_output(losses, h_w, h_l, beta, {"length_term": length_term})


# ----------------------------------------------------------------------------- DPOP
def dpop_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float = 0.3,
    lam: float = 50.0,
) -> PreferenceLoss:
    """DPO-Positive (Pal et al. 2024, "Smaug: Fixing Failure Modes of Preference Optimisation
    with DPO-Positive", Eq. 3).

        loss = -log sigma(beta (m - lambda max(0, log pi_ref(y_w|x) - log pi(y_w|x))))

    DPO only needs the margin to grow and can get there by lowering log pi(y_w) too (common when
    y_w and y_l differ by a few tokens). The penalty is zero while the policy's chosen log-prob
    is at or above the reference's and grows linearly with the drop below it, so the loss
    pushes log pi(y_w) back up. ``lam = 0`` is DPO.

    Args:
        beta: inverse temperature, as in DPO (the paper uses 0.3).
        lam: lambda >= 0, weight of the penalty (the paper uses 50).

    Metrics: ``dpop_penalty`` = max(0, log pi_ref(y_w) - log pi(y_w)).
    """
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    h_w, h_l = log_ratios(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    penalty = torch.relu(-h_w)  # max(0, log pi_ref(y_w) - log pi(y_w))
    losses = -F.logsigmoid(beta * (h_w - h_l - lam * penalty))
    return preference_output(losses, h_w, h_l, beta, {"dpop_penalty": penalty})


# ----------------------------------------------------------------------------- β-DPO
def beta_dpo_beta(
    batch_margin: Number, running_margin: Number, beta: float = 0.1, alpha: float = 0.6, min_beta: float = 1e-3
) -> torch.Tensor:
    """β-DPO's batch-level beta (Wu et al. 2024, "β-DPO: Direct Preference Optimization with
    Dynamic β", dynamic β calibration at batch level).

        beta_batch = beta_0 (1 + alpha (M_batch - M_0)),   floored at ``min_beta``

    M_batch is the mean reward discrepancy of the batch's (kept) pairs and M_0 its moving
    average over training. As in the authors' code the discrepancy is the unscaled log-ratio
    margin m (not beta_0 m), so alpha is per unit of m. An informative batch (margins above the usual) gets
    a larger beta, i.e. a more conservative update; a batch of near-ties gets a smaller one.

    Args:
        batch_margin: M_batch, the batch's mean log-ratio margin (scalar).
        running_margin: M_0, the moving average of the batch margins.
        beta: beta_0, the base inverse temperature.
        alpha: how strongly beta follows the margin (the authors' example uses 0.6; 0 is DPO).
        min_beta: lower bound keeping beta positive (the authors clamp at 1e-3).
    """
    batch_margin = torch.as_tensor(batch_margin)
    return (beta * (1 + alpha * (batch_margin - torch.as_tensor(running_margin, device=batch_margin.device)))).clamp(
        min=min_beta
    )


def beta_dpo_filter(
    margins: torch.Tensor,
    running_margin: Number,
    running_std: Number,
    rho: float = 0.2,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """β-DPO's β-guided data filtering (Wu et al. 2024): a bool ``[B]`` mask of the pairs kept.

    Each pair gets the Gaussian weight p_i = exp(-(M_i - M_0)^2 / (2 sigma^2)) around the running
    mean M_0 with the running std sigma, and floor(B (1 - rho)) pairs (at least one) are drawn
    without replacement with probability proportional to p_i: pairs whose margin is far from
    the usual (outliers, likely mislabelled or trivial) are the ones mostly dropped. The draw
    uses Gumbel-top-k, which is exactly sampling without replacement in proportion to the
    weights and stays well defined when some weights underflow to 0.

    Args:
        margins: ``[B]`` log-ratio margins M_i (no gradient is taken).
        running_margin / running_std: M_0 and sigma (sigma is floored at 1e-6).
        rho: the filtering ratio in [0, 1), the fraction of pairs dropped (the authors use 0.2).
        generator: torch.Generator for a reproducible draw (default: the global RNG).
    """
    if not 0.0 <= rho < 1.0:
        raise ValueError(f"rho (fraction of pairs filtered out) must be in [0, 1), got {rho}")
    size = margins.numel()
    keep = max(1, math.floor(size * (1 - rho) + 1e-9))
    if keep >= size:
        return torch.ones_like(margins, dtype=torch.bool)
    margins = margins.detach().double()
    mean = torch.as_tensor(running_margin, dtype=torch.float64, device=margins.device)
    std = torch.as_tensor(running_std, dtype=torch.float64, device=margins.device).clamp(min=1e-6)
    log_weights = -0.5 * ((margins - mean) / std) ** 2
    uniform = torch.rand(
        size,
        generator=generator,
        dtype=torch.float64,
        device=generator.device if generator is not None else margins.device,
    )
    gumbel = -torch.log(-torch.log(uniform.to(margins.device)))
    kept = torch.zeros(size, dtype=torch.bool, device=margins.device)
    kept[torch.topk(log_weights + gumbel, keep).indices] = True
    return kept


def beta_dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta_batch: Number,
    beta: float = 0.1,
    keep: torch.Tensor | None = None,
) -> PreferenceLoss:
    """β-DPO loss (Wu et al. 2024): DPO with the batch-level beta on the kept pairs.

        loss_i = -log sigma(beta_batch m_i) * keep_i * B / sum(keep)

    so the module's mean over ``losses`` is the DPO loss averaged over the kept pairs only
    (filtered pairs get 0). ``beta_batch`` comes from :func:`beta_dpo_beta`, ``keep`` from
    :func:`beta_dpo_filter`. Rewards use the base ``beta`` so they stay comparable across steps.

    Args:
        beta_batch: the batch's beta (scalar; treated as a constant, no gradient).
        beta: beta_0, used for the logged implicit rewards.
        keep: bool ``[B]`` mask of kept pairs (default: all).

    Metrics: ``beta_used`` (beta_batch), ``kept`` (1 for kept pairs, 0 for filtered ones).
    """
    h_w, h_l = log_ratios(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    beta_batch = torch.as_tensor(beta_batch, dtype=h_w.dtype, device=h_w.device).detach()
    losses = -F.logsigmoid(beta_batch * (h_w - h_l))
    kept = torch.ones_like(losses) if keep is None else keep.to(losses.dtype)
    losses = losses * kept * (kept.numel() / kept.sum().clamp(min=1))
    return preference_output(losses, h_w, h_l, beta, {"beta_used": _per_pair(beta_batch, losses), "kept": kept})


# ----------------------------------------------------------------------------- ODPO
def _signed_log1p(d: torch.Tensor) -> torch.Tensor:
    return torch.sign(d) * torch.log1p(d.abs())


ODPO_OFFSET_FUNCTIONS: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] = MappingProxyType(
    {
        "log": torch.log,  # the paper's choice; needs score_chosen > score_rejected
        "log1p": _signed_log1p,  # sign(d) log(1 + |d|): 0 at ties, defined for any difference
        "identity": lambda d: d,
    }
)
"""Name -> monotone increasing f of the score difference used for the ODPO offset."""


def odpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    score_chosen: torch.Tensor | None = None,
    score_rejected: torch.Tensor | None = None,
    beta: float = 0.1,
    alpha: float = 1.0,
    offset_fn: str = "log",
    default_offset: float = 0.0,
) -> PreferenceLoss:
    """ODPO (Amini et al. 2024, "Direct Preference Optimization with an Offset", the ODPO loss
    of Sec. 3).

        loss = -log sigma(beta m - Delta),   Delta = alpha f(score(y_w) - score(y_l))

    The offset makes the policy's reward margin exceed a pair-specific amount that grows with
    how much better y_w was scored, instead of treating every preference alike; Delta = 0 is
    DPO. The paper uses f = log (the authors' code: ``alpha * log(s_w - s_l)``, alpha = 1 by
    default).

    Args:
        score_chosen / score_rejected: ``[B]`` scores of the two responses (e.g. reward-model or
            rater scores); NaN where a pair has none. ``None``: no pair has scores.
        beta: inverse temperature, as in DPO.
        alpha: scale of the offset.
        offset_fn: f, one of :data:`ODPO_OFFSET_FUNCTIONS`: ``"log"`` (paper; every scored
            pair must have score_chosen > score_rejected), ``"log1p"`` (sign(d) log(1 + |d|)),
            ``"identity"``.
        default_offset: Delta used as is for pairs without both scores.

    Metrics: ``offset`` = Delta of each pair.
    """
    try:
        f = ODPO_OFFSET_FUNCTIONS[offset_fn]
    except KeyError:
        raise ValueError(
            f"unknown ODPO offset_fn {offset_fn!r}; choose one of {sorted(ODPO_OFFSET_FUNCTIONS)}"
        ) from None
    h_w, h_l = log_ratios(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    offset = torch.full_like(h_w, default_offset).detach()
    if score_chosen is not None and score_rejected is not None:
        difference = (score_chosen - score_rejected).to(device=h_w.device, dtype=h_w.dtype).detach()
        scored = ~torch.isnan(difference)
        if offset_fn == "log" and bool((difference[scored] <= 0).any()):
            bad = int((difference[scored] <= 0).sum())
            raise ValueError(
                f"ODPO offset_fn='log' needs score_chosen > score_rejected, but {bad} scored pair(s) have "
                "score_chosen <= score_rejected; use offset_fn='log1p' or 'identity'"
            )
        offset = torch.where(scored, alpha * f(torch.where(scored, difference, torch.ones_like(difference))), offset)
    losses = -F.logsigmoid(beta * (h_w - h_l) - offset)
    return preference_output(losses, h_w, h_l, beta, {"offset": offset})


# ----------------------------------------------------------------------------- EXO
def exo_pair_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 1e-3,
) -> PreferenceLoss:
    """EXO, pairwise form (Ji et al. 2024, "Towards Efficient Exact Optimization of Language
    Model Alignment", Eq. 16 with K = 2).

    EXO minimises the reverse KL from the policy's distribution over the pair,
    q = (sigma(beta m), sigma(-beta m)), to the label distribution p = (1 - eps, eps):

        loss = KL(q || p) = q_w (log q_w - log(1 - eps)) + q_l (log q_l - log eps)

    Unlike DPO's forward cross-entropy this is mode-seeking; eps > 0 is required (log eps), and
    the minimum sits at the finite margin beta m = log((1 - eps) / eps).

    Args:
        beta: scale of the log-ratios (beta_pi in the paper).
        label_smoothing: eps in (0, 0.5), the target probability of the rejected response (the
            paper recommends 1e-3).
    """
    if not 0.0 < label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in (0, 0.5) for EXO (it takes log eps), got {label_smoothing}")
    h_w, h_l = log_ratios(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    logits = beta * (h_w - h_l)
    log_q_w, log_q_l = F.logsigmoid(logits), F.logsigmoid(-logits)
    losses = log_q_w.exp() * (log_q_w - math.log1p(-label_smoothing)) + log_q_l.exp() * (
        log_q_l - math.log(label_smoothing)
    )
    return preference_output(losses, h_w, h_l, beta)


# ----------------------------------------------------------------------------- NCA
def nca_pair_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float = 0.1,
) -> PreferenceLoss:
    """NCA, pairwise preference form (Chen et al. 2024, "Noise Contrastive Alignment of
    Language Models with Explicit Rewards", the NCA loss for preference data with K = 2).

        loss = -log sigma(r_w) - 1/2 log sigma(-r_w) - 1/2 log sigma(-r_l),   r = beta h

    Each response is classified on its own absolute reward, not only on the difference: the
    first term raises r_w, the other two keep both rewards from drifting up, so unlike DPO the
    chosen log-likelihood does not fall during training.

    Args:
        beta: scale of the implicit rewards r = beta (log pi - log pi_ref).
    """
    h_w, h_l = log_ratios(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    r_w, r_l = beta * h_w, beta * h_l
    losses = -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)
    return preference_output(losses, h_w, h_l, beta)


# ----------------------------------------------------------------------------- APO
def apo_zero_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float = 0.1,
) -> PreferenceLoss:
    """APO-zero (D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive
    Revisions", Eq. 7).

        loss = (1 - sigma(r_w)) + sigma(r_l),   r = beta h

    Anchored at zero reward: raises the chosen likelihood and lowers the rejected one,
    independently. Use when the chosen responses are better than the model's own outputs.

    Args:
        beta: scale of the implicit rewards.
    """
    h_w, h_l = log_ratios(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    losses = (1 - torch.sigmoid(beta * h_w)) + torch.sigmoid(beta * h_l)
    return preference_output(losses, h_w, h_l, beta)


def apo_down_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float = 0.1,
) -> PreferenceLoss:
    """APO-down (D'Oosterlinck et al. 2024, Eq. 8).

        loss = sigma(r_w) + (1 - sigma(r_w - r_l)),   r = beta h

    Lowers the chosen likelihood while keeping (and widening) its lead over the rejected one.
    Use when even the chosen responses are worse than the model's own outputs.

    Args:
        beta: scale of the implicit rewards.
    """
    h_w, h_l = log_ratios(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    losses = torch.sigmoid(beta * h_w) + (1 - torch.sigmoid(beta * (h_w - h_l)))
    return preference_output(losses, h_w, h_l, beta)


# ----------------------------------------------------------------------------- SPPO
def sppo_hard_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float = 0.1,
) -> PreferenceLoss:
    """SPPO with hard labels (Wu et al. 2024, "Self-Play Preference Optimization for Language
    Model Alignment", the square loss of Eq. 4.7 in Algorithm 1).

    SPPO regresses each log-ratio on its win probability: (h - eta (P(y beats pi_t) - 1/2))^2.
    With hard labels (P = 1 for the winner, 0 for the loser) and eta = 1 / beta:

        loss = (h_w - 1 / (2 beta))^2 + (h_l + 1 / (2 beta))^2

    The chosen log-ratio is driven to +1/(2 beta), the rejected one to -1/(2 beta), each on its
    own (the reference plays the role of the previous iterate pi_t).

    Args:
        beta: 1 / eta; the targets are +-1 / (2 beta), so a smaller beta moves further.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0 (the targets are +-1/(2 beta)), got {beta}")
    h_w, h_l = log_ratios(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    losses = (h_w - 0.5 / beta) ** 2 + (h_l + 0.5 / beta) ** 2
    return preference_output(losses, h_w, h_l, beta)


# ----------------------------------------------------------------------------- BCO
def bco_pair_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float = 0.1,
    delta: Number = 0.0,
) -> PreferenceLoss:
    """BCO on pairs (Jung et al. 2024, "Binary Classifier Optimization for Large Language Model
    Alignment", the BCO loss with reward shift).

        loss = -log sigma(r_w - delta) - log sigma(-(r_l - delta)),   r = beta h

    A binary classifier with logit r - delta labels chosen responses 1 and rejected ones 0; the
    paper shows this bounds the DPO loss from above. The reward shift delta (a running mean of
    the rewards, kept by the module) centres the logits so both classes are learned.

    Args:
        beta: scale of the implicit rewards.
        delta: the reward shift (scalar; no gradient flows into it).

    Metrics: ``delta``.
    """
    h_w, h_l = log_ratios(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    delta = torch.as_tensor(delta, dtype=h_w.dtype, device=h_w.device).detach()
    losses = -F.logsigmoid(beta * h_w - delta) - F.logsigmoid(-(beta * h_l - delta))
    return preference_output(losses, h_w, h_l, beta, {"delta": _per_pair(delta, losses)})


# ----------------------------------------------------------------------------- AOT
def aot_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """AOT, unpaired form (Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via
    Optimal Transport", the sorted (one-dimensional optimal transport) relaxation of first-order
    stochastic dominance).

    AOT asks the *distribution* of chosen log-ratios to dominate that of rejected log-ratios.
    In one dimension the optimal transport plan matches quantiles, so the batch estimate sorts
    both and applies the (smoothed) logistic loss to the matched differences:

        u = sort(h_w over the batch), v = sort(h_l over the batch)
        loss_(i) = -(1 - eps) log sigma(beta (u_i - v_i)) - eps log sigma(-beta (u_i - v_i))

    ``losses[i]`` belongs to the i-th quantile, not to pair i (only the mean is meaningful);
    the loss depends on the two multisets only, so which chosen goes with which rejected
    does not matter. The rewards stay per pair.

    Args:
        beta: scale of the log-ratios.
        label_smoothing: eps in [0, 0.5), as in cDPO.
    """
    check_label_smoothing(label_smoothing)
    h_w, h_l = log_ratios(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    delta = torch.sort(h_w, dim=0).values - torch.sort(h_l, dim=0).values
    return preference_output(conservative_logistic(beta * delta, label_smoothing), h_w, h_l, beta)


def aot_pair_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """AOT, paired form (Melnyk et al. 2024): the policy's chosen-vs-rejected log-likelihood
    ratio should dominate, in distribution, the reference's.

        u = sort(log pi(y_w) - log pi(y_l) over the batch)
        v = sort(log pi_ref(y_w) - log pi_ref(y_l) over the batch)
        loss_(i) = -(1 - eps) log sigma(beta (u_i - v_i)) - eps log sigma(-beta (u_i - v_i))

    Without the sorting this is cDPO; sorting compares quantiles of the two distributions
    instead of pair by pair. ``losses[i]`` belongs to the i-th quantile.

    Args:
        beta: scale of the log-ratios.
        label_smoothing: eps in [0, 0.5), as in cDPO.
    """
    check_label_smoothing(label_smoothing)
    h_w, h_l = log_ratios(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    delta = (
        torch.sort(policy_chosen - policy_rejected, dim=0).values
        - torch.sort(reference_chosen - reference_rejected, dim=0).values
    )
    return preference_output(conservative_logistic(beta * delta, label_smoothing), h_w, h_l, beta)
