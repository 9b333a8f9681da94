"""Listwise objectives: RRHF, PRO and LiPO-lambda, on K scored responses per prompt.

All functions take ``[B, K]`` tables: response log-probs of the policy (summed, or length-
normalised where the objective says so), ``scores`` (higher = better) and a ``valid`` mask that is
False past the end of a list shorter than K. Invalid entries never contribute: whatever their
log-probs or scores hold (0, NaN), they are masked out before any arithmetic. Every function
returns a :class:`ListwiseLoss`: a loss per prompt (a sum over the list, as in the papers) and a
``[B, K]`` implicit reward per response for the ranking metrics.

Only strictly ordered pairs carry a preference: responses tied in score are never pushed apart.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lit_align.losses.types import ListwiseLoss


def _masked(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``values`` with 0 where ``valid`` is False (NaN-safe, so padding never leaks into sums)."""
    return torch.where(valid, values, torch.zeros((), dtype=values.dtype, device=values.device))


def _better(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[B, K, K]``: True where response i is scored strictly above response j, both valid."""
    scores = _masked(scores, valid)
    return (scores[:, :, None] > scores[:, None, :]) & valid[:, :, None] & valid[:, None, :]


def _nll_of_best(mean_logps: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[B]`` length-normalised NLL -log pi(y*|x) / |y*| of the best-scored response; when
    several responses tie for the best score, the average of their NLLs (order-independent)."""
    top = scores.masked_fill(~valid, -math.inf).amax(dim=1, keepdim=True)
    best = valid & (scores == top)
    return -_masked(mean_logps, best).sum(dim=1) / best.sum(dim=1).clamp(min=1)


def rrhf_loss(
    mean_logps: torch.Tensor,
    scores: torch.Tensor,
    valid: torch.Tensor,
    sft_weight: float = 1.0,
) -> ListwiseLoss:
    """RRHF (Yuan et al. 2023, "RRHF: Rank Responses to Align Language Models with Human
    Feedback", Eqs. 1-4).

    With the length-normalised log-probability p_i = log pi(y_i|x) / |y_i| (Eq. 1):

        L_rank = sum_{s_i < s_j} max(0, p_i - p_j)             (Eq. 2: hinge on every misordered pair)
        L_ft   = -p_{i'},  i' = argmax_i s_i                   (Eq. 3: SFT on the best response)
        loss   = L_rank + sft_weight * L_ft                    (Eq. 4 with sft_weight = 1)

    L_ft is length-normalised here (the per-token NLL of the best response; Eq. 3 writes the summed
    token NLL, which weighs long answers more); when several responses tie for the best score their
    NLLs are averaged.
    Pairs tied in score contribute nothing to L_rank (the sum runs over s_i < s_j only).

    Args:
        mean_logps: ``[B, K]`` length-normalised log-probs p_i.
        scores: ``[B, K]`` scores s_i (higher = better).
        valid: ``[B, K]`` True where the list has a k-th response.
        sft_weight: weight of the SFT term L_ft (1 in the paper; 0 gives the pure ranking loss).

    Metrics: ``rank_loss`` (L_rank), ``nll_loss`` (L_ft). Rewards are p_i.
    """
    p = _masked(mean_logps, valid)
    better = _better(scores, valid)  # [b, i, j]: i better than j; penalise p_j > p_i
    rank = (torch.relu(p[:, None, :] - p[:, :, None]) * better).sum(dim=(1, 2))
    nll = _nll_of_best(p, scores, valid)
    losses = rank + sft_weight * nll
    return ListwiseLoss(losses, p.detach(), {"rank_loss": rank.detach(), "nll_loss": nll.detach()})


def pro_loss(
    mean_logps: torch.Tensor,
    scores: torch.Tensor,
    valid: torch.Tensor,
    beta: float = 1.0,
    sft_weight: float = 0.1,
    score_temperature: bool = False,
) -> ListwiseLoss:
    """PRO (Song et al. 2023, "Preference Ranking Optimization for Human Alignment", AAAI 2024).

    With responses sorted by score, y^1 best, and the reward r_k = beta log pi(y^k|x) / |y^k|
    (length-normalised log-probability, scaled):

        L_PRO = -sum_{k=1}^{n-1} log( exp(r_k) / sum_{i=k}^{n} exp(r_i) )     (Plackett-Luce)
        L_SFT = -log pi(y^1|x) / |y^1|     (averaged over responses tied for the best score)
        loss  = L_PRO + sft_weight * L_SFT

    Each step k contrasts y^k with every response ranked below it, so one list gives n - 1
    softmax terms; with n = 2 and no SFT this is -log sigma(r_1 - r_2), the Bradley-Terry loss.

    ``score_temperature=True`` is the paper's reward-weighted form ("Grafting RLHF onto PRO"):
    at step k a lower-ranked y^i enters the softmax with inverse temperature 1/T_i^k =
    s_k - s_i (score difference), and y^k itself with 1/T_k^k = max_{i>k} (s_k - s_i), so
    responses far below y^k are pushed down harder. Scores then set the loss scale: use it with
    reward-model-like scores.

    Ties: a response tied in score with y^k is not its competitor at step k (it is neither above
    nor below it). So the denominator at step k holds y^k and the responses scored strictly below
    it; a step with none (the lowest score group) contributes 0, and the loss does not depend on
    how tied responses are ordered. Without ties this is exactly the sum above.

    Args:
        mean_logps: ``[B, K]`` length-normalised log-probs log pi(y_k|x) / |y_k|.
        scores: ``[B, K]`` scores (higher = better).
        valid: ``[B, K]`` True where the list has a k-th response.
        beta: reward scale (inverse temperature of every softmax; 1 in the paper's base form).
        sft_weight: weight of the SFT term on the best response (the paper's beta).
        score_temperature: use the score-difference temperatures described above.

    Metrics: ``ranking_loss`` (L_PRO), ``nll_loss`` (L_SFT). Rewards are r_k.
    """
    p = _masked(mean_logps, valid)
    r = beta * p
    below = _better(scores, valid)  # [b, k, i]: i is a competitor of k
    own = r
    logits = r[:, None, :].expand_as(below)
    if score_temperature:
        gap = _masked(scores, valid)[:, :, None] - _masked(scores, valid)[:, None, :]
        gap = torch.where(below, gap, torch.zeros_like(gap))
        logits = logits * gap
        own = r * gap.amax(dim=2)
    eye = torch.eye(r.shape[1], dtype=torch.bool, device=r.device)
    logits = torch.where(eye, own[:, :, None], logits)  # y^k itself on the diagonal
    logits = logits.masked_fill(~(below | eye), -math.inf)
    steps = torch.logsumexp(logits, dim=2) - own  # -log softmax of y^k among y^k and those below it
    steps = torch.where(below.any(dim=2), steps, torch.zeros_like(steps))
    ranking = steps.sum(dim=1)
    nll = _nll_of_best(p, scores, valid)
    losses = ranking + sft_weight * nll
    return ListwiseLoss(losses, r.detach(), {"ranking_loss": ranking.detach(), "nll_loss": nll.detach()})


def lambda_weights(rewards: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[B, K, K]`` LambdaLoss weights Delta_ij = |G_i - G_j| |1/D(tau(i)) - 1/D(tau(j))| of LiPO-lambda.

    Gains from the scores psi: the paper's G_i = 2^{psi_i} - 1, computed per list shifted in log
    space as G_i = 2^{psi_i - psi_max} with psi_max the list's best score (the -1 cancels in
    |G_i - G_j|). That multiplies every weight of a list by the constant 2^{-psi_max} (for labels
    in [0, 1] whose best is 1: one half), keeps each |G_i - G_j| in [0, 1] for any finite scores
    (2^{psi} overflows float32 above psi = 128: Elo or 0-1000 ratings gave NaN at the first step)
    and makes the weights depend on score gaps only, as ranking labels should. Discounts
    D(tau) = ln(1 + tau), with tau(i) the 1-based position of response i when the valid responses
    are sorted by ``rewards`` (descending; ties in reward keep list order, so equal rewards still
    get distinct positions). The weights are constants: no gradient flows through the ranks. Zero
    off valid pairs.
    """
    ranked = rewards.detach().masked_fill(~valid, -math.inf)
    order = torch.argsort(ranked, dim=1, descending=True, stable=True)
    positions = torch.empty_like(order)
    positions.scatter_(1, order, torch.arange(1, order.shape[1] + 1, device=order.device).expand_as(order))
    inverse_discount = 1.0 / torch.log1p(positions.to(rewards.dtype))
    gains = _gain_differences(scores, valid).to(rewards.dtype)
    weights = gains * (inverse_discount[:, :, None] - inverse_discount[:, None, :]).abs()
    return weights * (valid[:, :, None] & valid[:, None, :])


def _gain_differences(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[B, K, K]`` |G_i - G_j| with G = 2^{psi - psi_max} per list (see :func:`lambda_weights`),
    in log space and float64: 2^{lo - psi_max} (2^{|psi_i - psi_j|} - 1) for lo = min(psi_i, psi_j),
    exp((lo - psi_max) ln 2 + log(expm1(|d| ln 2))): exact for gaps far below the scores' own size
    (1e-30 apart), finite for gaps of 1e30, and 0 for ties and padding."""
    labels = _masked(scores, valid).double()
    best = (
        labels.masked_fill(~valid, -math.inf).amax(dim=1).clamp(min=-1e300)[:, None, None]
    )  # an empty list: any finite shift
    low = torch.minimum(labels[:, :, None], labels[:, None, :])
    gap = (labels[:, :, None] - labels[:, None, :]).abs() * math.log(2)
    log_expm1 = torch.where(gap > 1, gap + torch.log1p(-torch.exp(-gap)), torch.log(torch.expm1(gap)))
    return torch.exp((low - best) * math.log(2) + log_expm1) * (valid[:, :, None] & valid[:, None, :])


def lipo_lambda_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    scores: torch.Tensor,
    valid: torch.Tensor,
    beta: float = 0.1,
) -> ListwiseLoss:
    """LiPO-lambda (Liu et al. 2024, "LiPO: Listwise Preference Optimization through
    Learning-to-Rank", the LiPO-lambda objective, built on LambdaLoss, Wang et al. 2018).

    With the DPO implicit reward s_i = beta (log pi(y_i|x) - log pi_ref(y_i|x)) and labels psi_i:

        loss = sum_{psi_i > psi_j} Delta_ij log(1 + exp(-(s_i - s_j)))
        Delta_ij = |G_i - G_j| |1/D(tau(i)) - 1/D(tau(j))|,  G_i = 2^{psi_i} - 1,  D(tau) = log(1 + tau)

    with the gains of each list shifted by its best label, G_i = 2^{psi_i - psi_max}: each list's
    loss is the paper's times 2^{-psi_max}, finite for any finite labels (see :func:`lambda_weights`).
    tau(i) is the rank of y_i under the current rewards s (detached; see :func:`lambda_weights`).
    Pairs far apart in label, or whose swap would move a response across top positions, weigh
    more. With K = 2 the weight is the constant |G_1 - G_2| (1/ln 2 - 1/ln 3), so the loss is
    a scaled DPO loss. The paper writes D with ``log``; it is read here as the natural log (base 2,
    the NDCG convention, would multiply every weight by ln 2, a constant loss scale). Pairs tied
    in label contribute nothing (psi_i > psi_j is strict, and their gain difference is 0).

    Args:
        policy_logps: ``[B, K]`` summed log-probs log pi(y_k|x) of the policy.
        reference_logps: ``[B, K]`` the same under the reference policy.
        scores: ``[B, K]`` labels psi (higher = better).
        valid: ``[B, K]`` True where the list has a k-th response.
        beta: inverse temperature of the implicit reward (the KL strength, as in DPO).

    Metrics: ``lambda_weight`` (mean Delta over a list's ordered pairs). Rewards are s_i.
    """
    s = beta * (_masked(policy_logps, valid) - _masked(reference_logps, valid))
    better = _better(scores, valid)
    weights = lambda_weights(s, scores, valid) * better
    pair_losses = F.softplus(-(s[:, :, None] - s[:, None, :]))
    losses = (weights * pair_losses).sum(dim=(1, 2))
    mean_weight = weights.sum(dim=(1, 2)) / better.sum(dim=(1, 2)).clamp(min=1)
    return ListwiseLoss(losses, s.detach(), {"lambda_weight": mean_weight.detach()})
