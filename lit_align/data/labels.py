"""Label conventions shared by the collators and the model: ``IGNORE_INDEX`` marks positions
(prompt, padding) that carry no label, and labels are shifted by one for next-token scoring."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with the hidden state that predicts them: position t predicts token t+1."""
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    return shifted
