"""Callbacks configurable under ``trainer.callbacks`` in YAML."""

from lit_align.callbacks.curves import Curves
from lit_align.callbacks.export import ExportHF
from lit_align.callbacks.reference_sync import ReferenceSync, StepwiseDPO
from lit_align.callbacks.reliability import NonFiniteLoss, SaveOnSigterm
from lit_align.callbacks.samples import Samples
from lit_align.callbacks.throughput import Throughput

__all__ = ["ExportHF", "Throughput"]
__all__ += ["ReferenceSync", "StepwiseDPO"]  # reference_sync.py
__all__ += ["NonFiniteLoss", "SaveOnSigterm"]  # reliability.py
__all__ += ["Curves", "Samples"]  # what a person looks at: curves.py, samples.py
