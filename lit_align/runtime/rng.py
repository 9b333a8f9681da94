"""Every process's random number generator states, in a form a checkpoint stores and
``torch.load(weights_only=True)`` reads back."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states

RNG_STATES_KEY = "lit_align_rng_states"
"""Checkpoint entry with one dict of RNG states per process (rank order)."""


def rng_state() -> dict[str, Any]:
    """This process's RNG states (Lightning's collection: torch, CUDA when initialised, Python,
    NumPy), with NumPy's key as a tensor so the checkpoint loads with ``torch.load(weights_only=True)``."""
    state = _collect_rng_states(include_cuda=torch.cuda.is_available() and torch.cuda.is_initialized())
    kind, keys, position, has_gauss, gauss = state["numpy"]
    state["numpy"] = (str(kind), torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(gauss))
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state` (CUDA states only when the device count matches)."""
    state = dict(state)
    kind, keys, position, has_gauss, gauss = state["numpy"]
    state["numpy"] = (kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss)
    if len(state.get("torch.cuda", [])) != (torch.cuda.device_count() if torch.cuda.is_available() else 0):
        state.pop("torch.cuda", None)
    _set_rng_states(state)
