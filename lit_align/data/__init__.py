"""Preference data: formats, tokenization, collation, the data module and the built-in task."""

from lit_align.data.datamodule import PreferenceDataModule
from lit_align.data.errors import DataError, DroppableRecord
from lit_align.data.formats import PreferencePair
from lit_align.data.tasks import WordRulesTask

__all__ = ["DataError", "DroppableRecord", "PreferenceDataModule", "PreferencePair", "WordRulesTask"]
