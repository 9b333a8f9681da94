"""Write-then-rename helpers: a killed process never leaves a half-written file behind."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def atomic_torch_save(payload: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_or_none(path: str | os.PathLike) -> Any | None:
    """The payload at ``path``, or None when it is missing, truncated or corrupt."""
    if not Path(path).is_file():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception:  # any unreadable file is rebuilt by the caller, never trusted
        return None
