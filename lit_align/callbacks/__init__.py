"""Callbacks configurable under ``trainer.callbacks`` in YAML."""

from lit_align.callbacks.export import ExportHF
from lit_align.callbacks.reference_sync import ReferenceSync, StepwiseDPO
from lit_align.callbacks.reliability import NonFiniteLoss, SaveOnSigterm
from lit_align.callbacks.throughput import Throughput

__all__ = ["ExportHF", "Throughput"]
__all__ += ["ReferenceSync", "StepwiseDPO"]  # reference_sync.py
__all__ += ["NonFiniteLoss", "SaveOnSigterm"]  # reliability.py
