"""Pure functions of the on-policy family: KL estimators, advantages, surrogate and value losses.

Per-token tensors are ``[N, T]`` with a boolean ``mask`` that is True on response tokens. A row's
response tokens are one contiguous run (the prompt before it, padding after it); recursions run
right to left along that run and treat everything past its end as the end of the episode.
"""

from __future__ import annotations

import torch


# ---- KL to the reference, per token ------------------------------------------------------------
def kl_k1(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k1 = log pi(y_t) - log pi_ref(y_t): unbiased for KL(pi || pi_ref) on samples of pi, high
    variance, can be negative (Schulman 2020, "Approximating KL divergence")."""
    return logps - ref_logps


def kl_k2(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k2 = (log pi - log pi_ref)^2 / 2: biased, low variance, never negative (Schulman 2020)."""
    return 0.5 * (logps - ref_logps) ** 2


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k3 = r - 1 - log r with r = pi_ref / pi: unbiased and never negative (Schulman 2020); the
    estimator GRPO puts in its loss (Shao et al. 2024, eq. 4)."""
    log_ratio = ref_logps - logps
    return log_ratio.exp() - 1 - log_ratio


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


AGGREGATION_LEVELS = ("token", "sequence")


# ---- reductions ----------------------------------------------------------------------------------
def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is True (over all entries, or along ``dim``)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """Scalar loss from per-token losses: ``token`` averages over every response token of the
    batch (long responses weigh more; DAPO, Yu et al. 2025, eq. 8); ``sequence`` averages within
    each response, then over responses (GRPO, Shao et al. 2024, eq. 3)."""
    if level == "token":
        return masked_mean(per_token, mask)
    if level == "sequence":
        return masked_mean(per_token, mask, dim=-1).mean()
    raise ValueError(f"loss aggregation must be 'token' or 'sequence', got {level!r}")


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries (mean kept when ``shift_mean`` is False); 0 off the mask."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    out = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def last_token_mask(mask: torch.Tensor) -> torch.Tensor:
    """``[N, T]`` True at the last response token of each row."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, -1).max(dim=1).values
    return (positions == last[:, None]) & mask


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, beta: float, mask: torch.Tensor) -> torch.Tensor:
    """Per-token RLHF reward: -beta * KL_t on every response token, plus the sequence score on the
    last one (Ziegler et al. 2019, eq. 2; Ouyang et al. 2022, eq. 2)."""
    return (-beta * kl + scores[:, None] * last_token_mask(mask)) * mask


# ---- advantages ----------------------------------------------------------------------------------
def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, eq. 16) by the backward recursion
    delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lam A_{t+1},
    with V and A zero past the last response token. lam = 0 gives the TD error delta_t; lam = 1
    gives the Monte-Carlo return minus V_t. Returns (advantages, returns = advantages + values),
    both 0 off the mask."""
    mask_f = mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        live = mask_f[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = (delta + gamma * lam * next_advantage) * live
        advantages[:, t] = advantage
        # off the mask (prompt, padding) the episode has not started or has ended: carry zeros
        next_value = values[:, t] * live
        next_advantage = advantage
    return advantages, (advantages + values) * mask_f


def n_step_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """n-step actor-critic advantages (Mnih et al. 2016, A3C, sec. 4):
    R_t = sum_{i<n} gamma^i r_{t+i} + gamma^n V_{t+n},  A_t = R_t - V_t,
    truncated at the end of the response (no bootstrap past it). n = 1 is TD(0):
    A_t = r_t + gamma V_{t+1} - V_t. Returns (advantages, targets R_t), 0 off the mask."""
    if n < 1:
        raise ValueError(f"n-step advantages need n >= 1, got {n}")
    mask_f = mask.to(values.dtype)
    rewards, values = rewards * mask_f, values * mask_f
    length = values.shape[1]
    pad = torch.zeros_like(values[:, :n])
    padded_rewards, padded_values = torch.cat([rewards, pad], 1), torch.cat([values, pad], 1)
    targets = gamma**n * padded_values[:, n : n + length]
    for i in range(n):
        targets = targets + gamma**i * padded_rewards[:, i : i + length]
    return (targets - values) * mask_f, targets * mask_f


def leave_one_out_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024, eq. 7; Kool et al. 2019): each of the k samples of a prompt is
    baselined by the mean of the other k - 1, A_i = r_i - (sum_j r_j - r_i) / (k - 1). ``scores``
    is ``[N]`` with the k samples of a prompt adjacent."""
    if group_size < 2:
        raise ValueError(f"RLOO needs at least 2 samples per prompt, got {group_size}")
    groups = scores.view(-1, group_size)
    baseline = (groups.sum(1, keepdim=True) - groups) / (group_size - 1)
    return (groups - baseline).reshape(-1)


def group_normalised_advantages(
    scores: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """GRPO outcome advantages (Shao et al. 2024, sec. 4.1.2): A_i = (r_i - mean(r)) / (std(r) + eps)
    over the group of samples of one prompt (std: the sample standard deviation). ``scale=False``
    keeps only the mean shift (Dr. GRPO, Liu et al. 2025, drops the std division). ``scores`` is
    ``[N]`` with the samples of a prompt adjacent."""
    if group_size < 2:
        raise ValueError(f"GRPO needs at least 2 samples per prompt, got {group_size}")
    groups = scores.view(-1, group_size)
    centred = groups - groups.mean(1, keepdim=True)
    if scale:
        centred = centred / (groups.std(1, keepdim=True) + eps)
    return centred.reshape(-1)


# ---- surrogate losses ----------------------------------------------------------------------------
def clipped_surrogate(
    logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), per token, as a loss to minimise:
    -min(r A, clip(r, 1 - eps, 1 + eps) A) with r = exp(log pi - log pi_old).
    Returns (loss, ratio, clipped: True where the clipped term was the smaller one)."""
    ratio = (logps - old_logps).exp()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip, 1 + clip) * advantages
    return -torch.minimum(unclipped, clipped), ratio, clipped < unclipped


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss (the PPO baselines; Ziegler et al. 2019), per token:
    max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2) / 2.
    Returns (loss, clipped: True where the clipped term was larger)."""
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    plain, limited = (values - returns) ** 2, (clipped_values - returns) ** 2
    return 0.5 * torch.maximum(plain, limited), limited > plain


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[R - V] / Var[R] over the masked entries (1 = perfect critic, 0 = constant)."""
    residual = returns - values
    var_returns = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    var_residual = masked_mean((residual - masked_mean(residual, mask)) ** 2, mask)
    return 1 - var_residual / var_returns.clamp(min=1e-8)
