"""Callbacks configurable under ``trainer.callbacks`` in YAML."""

from lit_align.callbacks.export import ExportHF

__all__ = ["ExportHF"]
