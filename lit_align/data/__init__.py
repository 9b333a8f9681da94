"""Preference data: formats, tokenization, collation, the data module and the built-in task."""

from lit_align.data.arithmetic_task import ArithmeticTask
from lit_align.data.contract import DataRequest, ServedData
from lit_align.data.datamodule import AlignmentDataModule, PreferenceDataModule
from lit_align.data.errors import DataError, DroppableRecord
from lit_align.data.formats import PreferencePair
from lit_align.data.listwise_datamodule import ListwiseDataModule
from lit_align.data.prompt_datamodule import PromptDataModule
from lit_align.data.sft_datamodule import SFTDataModule
from lit_align.data.tasks import WordRulesTask
from lit_align.data.unpaired import convert_pairs_file
from lit_align.data.unpaired_datamodule import UnpairedDataModule

__all__ = [
    "AlignmentDataModule",
    "ArithmeticTask",
    "DataRequest",
    "ServedData",
    "ListwiseDataModule",
    "UnpairedDataModule",
    "convert_pairs_file",
    "DataError",
    "DroppableRecord",
    "PreferenceDataModule",
    "PreferencePair",
    "PromptDataModule",
    "SFTDataModule",
    "WordRulesTask",
]
