"""Errors for bad input data: each names the file, record and field."""

from __future__ import annotations

from collections.abc import Mapping

from lit_align.errors import LitAlignError


class DataError(LitAlignError, ValueError):
    """A record or file cannot be used; the message says where (file, record, field) and why."""

    def __init__(self, source: str, message: str, record: int | None = None, field: str | None = None):
        where = [source]
        if record is not None:
            where.append(f"record {record}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{', '.join(where)}: {message}")
        self.source, self.record, self.field, self.message = source, record, field, message

    def __reduce__(self):
        """Pickled by its parts (as ``num_proc`` tokenizing workers send it back to the main
        process): the default would call ``__init__`` with the formatted message alone."""
        return type(self), (self.source, self.message, self.record, self.field), self.__dict__

    def in_file_columns(self, columns: Mapping[str, str] | None) -> DataError:
        """The same error with its field named as the file names it: ``columns`` maps lit-align's
        field names to the file's (``{"chosen": "response_j"}``), and an indexed field keeps its
        index (``responses[2]`` -> ``answers[2]``). The error itself when nothing is renamed."""
        if not columns or self.field is None:
            return self
        base, bracket, rest = self.field.partition("[")
        if base not in columns:
            return self
        renamed = type(self)(self.source, self.message, self.record, columns[base] + bracket + rest)
        renamed.__cause__ = self.__cause__
        return renamed


class DroppableRecord(DataError):
    """A well-formed record that cannot train (empty or identical responses, too long).

    The data module raises it, or skips the record and logs the count, as ``invalid_records`` says.
    """
