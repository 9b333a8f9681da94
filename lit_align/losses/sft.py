"""Supervised fine-tuning loss."""

from __future__ import annotations

import torch


def completion_nll(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood per completion token over the batch:
    -sum_{i,t} m_it log pi(y_it | x_i, y_i<t) / sum_{i,t} m_it (the maximum-likelihood objective
    of supervised fine-tuning, e.g. InstructGPT's SFT stage, Ouyang et al. 2022, sec. 3.5).
    Tokens, not sequences, are averaged, so long completions weigh more, as in pre-training.

    Args:
        token_logps: ``[B, T]`` log-probs of the label tokens (0 off the completion).
        mask: ``[B, T]`` True on completion tokens (prompt and padding are excluded).
    """
    mask = mask.to(token_logps.dtype)
    return -(token_logps * mask).sum() / mask.sum().clamp(min=1)
