"""Pure functions of the 2025 refinements of GRPO: loss normalisations, advantage scaling,
clip-higher and dual clip, sequence-level importance ratios (GSPO), clipped importance-weighted
REINFORCE (CISPO), REINFORCE++ advantages, overlong shaping and entropy-selected tokens.

Per-token tensors are ``[N, T]`` with a boolean ``mask`` True on completion tokens; the samples of
a prompt are adjacent rows (groups of ``group_size``). Each function states the equation it
implements and, where the value is not obvious, how it was derived.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lit_align.losses.policy_gradient import masked_mean


# ---- how per-token losses become one number (loss_type) -----------------------------------------
@dataclass(frozen=True)
class TokenCounts:
    """What the normalisations divide by, beyond the minibatch itself.

    Attributes:
        max_completion_length: the generation limit (``max_new_tokens``), Dr. GRPO's constant.
        global_tokens: completion tokens of the whole optimizer step, summed over every process
            (and gradient-accumulation step): DAPO's denominator.
        world_size: processes whose gradients DDP averages: a loss divided by ``global_tokens`` is
            multiplied by it, so the averaged gradient is the gradient of sum / global_tokens.
    """

    max_completion_length: int
    global_tokens: float
    world_size: int = 1


def grpo_normalisation(per_token: torch.Tensor, mask: torch.Tensor, counts: TokenCounts) -> torch.Tensor:
    """GRPO (Shao et al. 2024, eq. 3): (1/G) sum_i (1/|o_i|) sum_t l_{i,t}: each completion's
    token mean, then the mean over completions (long completions' tokens weigh less)."""
    return masked_mean(per_token, mask, dim=-1).mean()


def bnpo_normalisation(per_token: torch.Tensor, mask: torch.Tensor, counts: TokenCounts) -> torch.Tensor:
    """BNPO: sum_{i,t} l_{i,t} / sum_i |o_i| over this process's minibatch (every token weighs the same)."""
    return masked_mean(per_token, mask)


def dr_grpo_normalisation(per_token: torch.Tensor, mask: torch.Tensor, counts: TokenCounts) -> torch.Tensor:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-like training", eq. 3 / Appendix):
    sum_{i,t} l_{i,t} / (G * L_max), a constant denominator (rows x max completion length), so
    neither the completion's length nor the batch's token count rescales a token's gradient."""
    return (per_token * mask).sum() / (per_token.shape[0] * counts.max_completion_length)


def dapo_normalisation(per_token: torch.Tensor, mask: torch.Tensor, counts: TokenCounts) -> torch.Tensor:
    """DAPO (Yu et al. 2025, eq. 8, token-level policy gradient loss): sum over every completion
    token of the global batch divided by their number, across processes and accumulation steps.
    Here: world_size * local sum / global token count, since DDP averages the processes'
    gradients (derivation: mean_p [W * S_p / N] = sum_p S_p / N)."""
    return counts.world_size * (per_token * mask).sum() / max(counts.global_tokens, 1.0)


LOSS_NORMALISATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor, TokenCounts], torch.Tensor]] = {
    "grpo": grpo_normalisation,
    "bnpo": bnpo_normalisation,
    "dr_grpo": dr_grpo_normalisation,
    "dapo": dapo_normalisation,
    "cispo": dapo_normalisation,  # MiniMax-M1 normalises CISPO over the batch's tokens, as DAPO
}
"""``loss_type`` -> how the per-token losses of a minibatch become the loss."""


# ---- advantages -------------------------------------------------------------------------------------
def scaled_group_advantages(scores: torch.Tensor, group_size: int, scale: str, eps: float = 1e-4) -> torch.Tensor:
    """A_i = r_i - mean(group of i), divided by a standard deviation according to ``scale``:
    ``group`` the std of i's group (GRPO, Shao et al. 2024, sec. 4.1.2), ``batch`` the std of every
    score of the batch (Hu 2025, REINFORCE++ with baseline; TRL's ``scale_rewards: batch``),
    ``none`` no division (Dr. GRPO, Liu et al. 2025: the group std biases the update toward
    questions that are too easy or too hard). Sample standard deviations (n - 1)."""
    if group_size < 2:
        raise ValueError(f"group advantages need at least 2 samples per prompt, got {group_size}")
    groups = scores.view(-1, group_size)
    centred = groups - groups.mean(1, keepdim=True)
    spread = {
        "group": lambda: groups.std(1, keepdim=True),
        "batch": lambda: scores.std().expand_as(groups[:, :1]) if scores.numel() > 1 else torch.zeros_like(groups),
        "none": None,
    }
    if scale not in spread:
        raise ValueError(f"scale_rewards must be group, batch or none, got {scale!r}")
    if spread[scale] is not None:
        centred = centred / (spread[scale]() + eps)
    return centred.reshape(-1)


def reinforce_pp_returns(
    scores: torch.Tensor, token_kl: torch.Tensor, beta: float, mask: torch.Tensor, group_size: int | None = None
) -> torch.Tensor:
    """REINFORCE++ (Hu 2025, eq. 3-5) token returns before normalisation: the token reward is
    -beta * KL_t, plus the sequence's score on its last token; with gamma = 1 the return at t is
    the sum of the rewards from t on: G_t = score - beta * sum_{s >= t} KL_s. With ``group_size``
    (REINFORCE++-baseline), the score is first centred on its group's mean. The caller whitens the
    returns over the global batch (see :func:`whiten_with`). 0 off the mask."""
    if group_size is not None:
        groups = scores.view(-1, group_size)
        scores = (groups - groups.mean(1, keepdim=True)).reshape(-1)
    kl = token_kl * mask
    future_kl = kl.flip(-1).cumsum(-1).flip(-1)  # sum_{s >= t} KL_s
    return (scores[:, None] - beta * future_kl) * mask


def masked_moments(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(sum, sum of squares, count) of the masked values: summed over processes, they give the
    global batch's mean and variance (REINFORCE++'s global normalisation)."""
    selected = values[mask.bool()].double()
    return torch.stack([selected.sum(), (selected**2).sum(), torch.tensor(float(selected.numel()), dtype=torch.double)])


def whiten_with(values: torch.Tensor, mask: torch.Tensor, moments: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std with the mean and (population) variance of ``moments`` = (sum, sum of
    squares, count), e.g. all-reduced over processes; 0 off the mask."""
    total, squares, count = moments.unbind()
    count = count.clamp(min=1)
    mean = total / count
    var = (squares / count - mean**2).clamp(min=0)
    return ((values - mean) / (var.sqrt() + eps)).to(values.dtype) * mask


# ---- importance ratios -------------------------------------------------------------------------------
def token_log_ratios(logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log r_{i,t} = log pi(y_t) - log pi_old(y_t), per token (PPO, GRPO)."""
    return logps - old_logps


def sequence_log_ratios(logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO (Zheng et al. 2025, eq. 7): s_i = (pi(y_i) / pi_old(y_i))^(1/|y_i|), the length-normalised
    sequence ratio, log s_i = mean_t (log pi - log pi_old), given to every token of the sequence.
    Its gradient is s_i (1/|y_i|) sum_t grad log pi(y_t) (eq. 10): every token of a sequence shares
    one weight."""
    return masked_mean(logps - old_logps, mask, dim=-1)[:, None].expand_as(logps)


IMPORTANCE_LEVELS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "token": token_log_ratios,
    "sequence": sequence_log_ratios,
}
"""``importance_sampling_level`` -> the log-ratio each token's surrogate uses."""


# ---- surrogates ---------------------------------------------------------------------------------------
def clip_higher_surrogate(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
    delta: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate with separate bounds (DAPO's clip-higher, Yu et al. 2025, eq. 10):
    -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), r = exp(log_ratio); with ``delta`` (dual
    clip, Ye et al. 2020, eq. 5) a negative-advantage token's objective is also bounded below by
    delta * A: -max(min(r A, clip(r) A), delta A) where A < 0 (delta > 1), so a huge ratio on a bad
    token cannot dominate the update. Returns (per-token loss, clipped: True where a bound was used)."""
    ratio = log_ratio.exp()
    unclipped = ratio * advantages
    bounded = ratio.clamp(1 - epsilon_low, 1 + epsilon_high) * advantages
    objective = torch.minimum(unclipped, bounded)
    clipped = bounded < unclipped
    if delta is not None:
        floor = delta * advantages
        lifted = (advantages < 0) & (objective < floor)
        objective = torch.where(lifted, floor, objective)
        clipped = clipped | lifted
    return -objective, clipped


def cispo_surrogate(
    logps: torch.Tensor,
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    epsilon_high: float,
    epsilon_low: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CISPO (MiniMax-M1, 2025, eq. 4-5): -sg(clip(r, 1 - eps_low, 1 + eps_high)) A log pi(y_t):
    REINFORCE weighted by a clipped, stop-gradient importance weight. Unlike PPO's clip, a token
    whose ratio is clipped keeps its gradient, -clip(r) A grad log pi (derivation: the weight is a
    constant under sg[], so d/dtheta = -w A d log pi / dtheta). No lower bound when ``epsilon_low``
    is None (the paper's setting). Returns (per-token loss, clipped)."""
    ratio = log_ratio.detach().exp()
    low = 0.0 if epsilon_low is None else 1 - epsilon_low
    weight = ratio.clamp(low, 1 + epsilon_high)
    return -weight * advantages * logps, weight != ratio


def _clipped_ratio(logps, log_ratio, advantages, epsilon_low, epsilon_high, delta):
    return clip_higher_surrogate(log_ratio, advantages, epsilon_low, epsilon_high, delta)


def _cispo(logps, log_ratio, advantages, epsilon_low, epsilon_high, delta):
    return cispo_surrogate(logps, log_ratio, advantages, epsilon_high, epsilon_low)


SURROGATES = {"grpo": _clipped_ratio, "bnpo": _clipped_ratio, "dr_grpo": _clipped_ratio, "dapo": _clipped_ratio}
SURROGATES["cispo"] = _cispo
"""``loss_type`` -> its per-token surrogate, called as (log-probs, log-ratios, advantages,
epsilon_low, epsilon_high, delta) -> (loss, clipped)."""


# ---- shaping of rewards and tokens ----------------------------------------------------------------------
def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), added to the score: 0 up to
    L_max - L_cache tokens, then falling linearly to -factor at L_max: ((L_max - L_cache) - |y|) /
    L_cache * factor, and -factor beyond L_max."""
    start = max_length - buffer
    return (-(lengths.float() - start).clamp(min=0) / buffer).clamp(min=-1.0) * factor


def zero_spread_groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[G]`` True for a group whose samples all have the same score: its advantages are all 0 and
    it contributes no gradient (DAPO's dynamic sampling drops them, Yu et al. 2025, eq. 11)."""
    groups = scores.view(-1, group_size)
    return (groups.max(1).values - groups.min(1).values) == 0


def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, fraction: float) -> torch.Tensor:
    """The completion tokens whose entropy is in the top ``fraction`` of the batch's (Wang et al.
    2025, "Beyond the 80/20 rule": the policy gradient only on the ~20% highest-entropy "forking"
    tokens): mask & (entropy >= the (1 - fraction) quantile of the masked entropies)."""
    selected = entropy[mask.bool()]
    if selected.numel() == 0:
        return mask.bool()
    threshold = torch.quantile(selected.float(), 1 - fraction)
    return mask.bool() & (entropy >= threshold)
