"""Write-then-rename helpers: a killed process never leaves a half-written file behind.

A payload is written to a temporary file in the destination's folder (same filesystem, so the
rename is atomic), flushed to disk, then renamed over the destination: readers see the old file or
the new one, never a mix. A failure (disk full, an exception, a signal) deletes the temporary file;
only SIGKILL or a power cut can leave one behind, named ``.<name>.<random>.tmp`` and never read.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


def atomic_torch_save(payload: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, ``fsync`` it, then rename it over ``path``.

    The file gets the permissions a plain ``open(path, "wb")`` would (``0o666`` minus the umask),
    not the private ``0o600`` of a temporary file. On any error ``path`` is unchanged (absent, or
    its previous content) and the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = _create_temporary(path)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(payload, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """Write ``text`` (UTF-8) to ``path`` as :func:`atomic_torch_save` writes a payload: a temporary
    file in the same folder, ``fsync``, then a rename; on any error ``path`` is unchanged."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = _create_temporary(path)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with local checkpoints written by :func:`atomic_torch_save`.

    Lightning (2.6) writes a checkpoint into a temporary file of the system's temporary folder and
    moves it into place: a rename when both are on one filesystem, otherwise a copy, which a kill
    can leave half-written (and a kill leaves the temporary file, as large as the checkpoint, in
    ``/tmp``). Here the temporary file is in the checkpoint's own folder, flushed to disk, and
    renamed. Remote paths (``s3://`` ...) and ``storage_options`` go to Lightning's own code.
    ``lit-align fit`` uses it whenever the strategy would use a plain ``TorchCheckpointIO``.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_torch_save(checkpoint, path)


def unwritable(folder: str | os.PathLike) -> str | None:
    """Why no file can be written in ``folder`` (creating it and its missing parents as needed),
    or None when one can. Found by creating and removing a probe file in ``folder``, or in its
    nearest existing ancestor when ``folder`` does not exist yet: nothing is left behind."""
    folder = Path(folder).expanduser().absolute()
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            return "no existing folder above it"
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        handle, probe = _create_temporary(existing / "write-probe")
    except OSError as error:
        return error.strerror or str(error)
    os.close(handle)
    os.remove(probe)
    return None


def load_or_none(path: str | os.PathLike) -> Any | None:
    """The payload at ``path``, or None when it is missing, truncated or corrupt."""
    if not Path(path).is_file():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception:  # any unreadable file is rebuilt by the caller, never trusted
        return None


def _create_temporary(path: Path) -> tuple[int, str]:
    """A new, exclusively created ``.<name>.<random>.tmp`` next to ``path``, opened for writing,
    with the default permissions (``tempfile.mkstemp`` would make it private: ``0o600``)."""
    for _ in range(100):
        tmp = str(path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp"))
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file next to {path}")


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (best effort: not every platform can open a folder)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
