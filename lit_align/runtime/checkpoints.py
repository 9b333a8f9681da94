"""Reading checkpoints: a Lightning checkpoint file or a sharded FSDP folder, and the lit-align
class it recorded, each failure a :class:`CheckpointError` naming the file."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from lightning import LightningModule

from lit_align.errors import CheckpointError


def load_module_from_checkpoint(ckpt_path: str) -> LightningModule:
    """Rebuild the module class recorded in a lit-align checkpoint and load it (Lightning's
    ``load_from_checkpoint`` restores hyper-parameters and weights). A sharded FSDP checkpoint
    folder is consolidated into a temporary file first (:func:`consolidate_sharded_checkpoint`)."""
    if not os.path.isdir(ckpt_path):
        return _load_module(ckpt_path, ckpt_path)
    read_sharded_checkpoint(ckpt_path, consolidate=False)  # a folder of shards, or a CheckpointError
    with tempfile.TemporaryDirectory() as folder:
        consolidated = os.path.join(folder, "consolidated.ckpt")
        consolidate_sharded_checkpoint(ckpt_path, consolidated)
        return _load_module(consolidated, ckpt_path)


def _load_module(path: str, ckpt_path: str) -> LightningModule:
    """The lit-align module of the checkpoint file ``path`` (errors name ``ckpt_path``, what the user gave)."""
    checkpoint = read_checkpoint(path, weights_only=False)
    recorded = checkpoint.get("lit_align_class", "")
    if not recorded.partition(":")[2]:
        raise CheckpointError(f"{ckpt_path!r} was not written by a lit-align module")
    cls = import_recorded_class(recorded, ckpt_path)
    return cls.load_from_checkpoint(path, map_location="cpu", weights_only=False)  # read so above too


def import_recorded_class(recorded: str, ckpt_path: str) -> type:
    """The class a checkpoint recorded as ``module:qualified.name``, or :class:`CheckpointError`
    naming the checkpoint and the module when it cannot be imported (a user's own method whose
    file is not on the Python path)."""
    module_name, _, class_name = recorded.partition(":")
    try:
        cls = importlib.import_module(module_name)
        for part in class_name.split("."):
            cls = getattr(cls, part)
    except (ImportError, AttributeError) as error:
        problem = CheckpointError(
            f"checkpoint {ckpt_path!r} was written by {module_name}.{class_name}, and it cannot be imported ({error})"
        )
        top = module_name.partition(".")[0]
        problem.hint = f"run lit-align from the folder that holds {top}.py, or add that folder to PYTHONPATH"
        raise problem from None
    return cls


def read_checkpoint(ckpt_path: str, weights_only: bool) -> dict:
    """The checkpoint at ``ckpt_path`` (tensors memory-mapped, not read), or :class:`CheckpointError`
    naming the file when it is missing, truncated or not a Lightning checkpoint."""
    import torch

    if os.path.isdir(ckpt_path):
        return read_sharded_checkpoint(ckpt_path, consolidate=not weights_only)
    if not os.path.isfile(ckpt_path):
        raise CheckpointError(f"checkpoint {ckpt_path!r} does not exist")
    archive = zipfile.is_zipfile(ckpt_path)  # torch.save writes zip archives; one cut short is not
    try:  # anything else is still tried, as a legacy (pre zip) torch file
        checkpoint = torch.load(ckpt_path, map_location="cpu", mmap=archive, weights_only=weights_only)
    except Exception as error:  # pickle, zip and torch raise many types; the file is what matters
        reason = (
            f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"
            if archive
            else "not a zip archive as torch.save writes: empty, truncated or another kind of file"
        )
        raise CheckpointError(f"checkpoint {ckpt_path!r} cannot be read ({reason})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{ckpt_path!r} is not a Lightning checkpoint (it has no state_dict)")
    return checkpoint


def read_sharded_checkpoint(ckpt_path: str, consolidate: bool) -> dict:
    """A sharded FSDP checkpoint folder (``state_dict_type: sharded``): checked for its metadata
    and, if ``consolidate``, gathered into one ordinary Lightning checkpoint dict in memory."""
    if not (Path(ckpt_path) / ".metadata").is_file() or not (Path(ckpt_path) / "meta.pt").is_file():
        raise CheckpointError(
            f"{ckpt_path!r} is a folder but not a sharded checkpoint (no .metadata and meta.pt in it)"
        )
    if not consolidate:
        return {"state_dict": None}
    import torch

    with tempfile.TemporaryDirectory() as folder:
        consolidated = os.path.join(folder, "consolidated.ckpt")
        consolidate_sharded_checkpoint(ckpt_path, consolidated)
        return torch.load(consolidated, map_location="cpu", weights_only=False)  # read whole: the file goes


CONSOLIDATE_COMMAND = ("-m", "lightning.pytorch.utilities.consolidate_checkpoint")
"""Lightning's documented converter of a sharded checkpoint folder into one checkpoint file
(``python -m lightning.pytorch.utilities.consolidate_checkpoint FOLDER --output_file FILE``)."""


def consolidate_sharded_checkpoint(ckpt_path: str, output_file: str) -> None:
    """Write the sharded checkpoint folder ``ckpt_path`` as one ordinary Lightning checkpoint file,
    or raise :class:`CheckpointError` with the reason. A folder of Lightning's FSDP strategy goes
    through Lightning's own converter (run as a command: its functions are private); one of its
    ModelParallelStrategy (FSDP2, on-policy methods) through :func:`_consolidate_model_parallel`."""
    if _written_by_model_parallel(ckpt_path):
        _consolidate_model_parallel(ckpt_path, output_file)
        return
    command = [sys.executable, *CONSOLIDATE_COMMAND, str(ckpt_path), "--output_file", str(output_file)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 or not os.path.isfile(output_file):
        lines = [line.strip() for line in (done.stderr or done.stdout or "").splitlines() if line.strip()]
        reason = lines[-1] if lines else f"the converter exited with status {done.returncode}"
        raise CheckpointError(f"sharded checkpoint {ckpt_path!r} cannot be read ({reason})")


def _written_by_model_parallel(ckpt_path: str) -> bool:
    """Whether a sharded folder has ModelParallelStrategy's layout (the module's tensors under
    ``state_dict.``; Lightning's FSDP strategy writes them under ``model.``)."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        keys = FileSystemReader(ckpt_path).read_metadata().state_dict_metadata
    except Exception:  # an unreadable folder: Lightning's converter names the problem
        return False
    return any(key.startswith("state_dict.") for key in keys)


def _consolidate_model_parallel(ckpt_path: str, output_file: str) -> None:
    """A ModelParallelStrategy folder as one Lightning checkpoint file: ``meta.pt`` (loops, hyper-
    parameters, lit-align's records) plus the module's full tensors as ``state_dict``, read with
    torch's ``dcp_to_torch_save``. The optimizer states stay out: the folder holds them keyed by
    parameter name, not in the layout a checkpoint file resumes from (resume from the folder)."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as folder:
        tensors = os.path.join(folder, "tensors.pt")
        try:
            dcp_to_torch_save(ckpt_path, tensors)
            saved = torch.load(tensors, map_location="cpu", weights_only=False)
            checkpoint = torch.load(Path(ckpt_path) / "meta.pt", map_location="cpu", weights_only=False)
        except Exception as error:  # torch.distributed.checkpoint raises many types; the folder is what matters
            reason = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"
            raise CheckpointError(f"sharded checkpoint {ckpt_path!r} cannot be read ({reason})") from None
    checkpoint["state_dict"] = saved["state_dict"]
    torch.save(checkpoint, output_file)
