"""Every process's random number generator states, in a form a checkpoint stores and
``torch.load(weights_only=True)`` reads back."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

RNG_STATES_KEY = "lit_align_rng_states"
"""Checkpoint entry with one dict of RNG states per process (rank order)."""


def rng_state() -> dict[str, Any]:
    """This process's RNG states: ``torch`` (CPU), ``torch.cuda`` (every device, when CUDA is
    initialised), ``python`` (``random``) and ``numpy`` (the legacy global generator), with NumPy's
    key as a tensor so the checkpoint loads with ``torch.load(weights_only=True)``. The keys and
    values are those Lightning's own (private) RNG helpers use, so older checkpoints still load."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    state["numpy"] = (str(kind), torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(gauss))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch.cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state` (CUDA states only when the device count matches)."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("torch.cuda", [])
    if cuda and len(cuda) == (torch.cuda.device_count() if torch.cuda.is_available() else 0):
        torch.cuda.set_rng_state_all(cuda)
    if "numpy" in state:
        kind, keys, position, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
