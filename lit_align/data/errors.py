"""Errors for bad input data: each names the file, record and field."""

from __future__ import annotations


class DataError(ValueError):
    """A record or file cannot be used; the message says where (file, record, field) and why."""

    def __init__(self, source: str, message: str, record: int | None = None, field: str | None = None):
        where = [source]
        if record is not None:
            where.append(f"record {record}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{', '.join(where)}: {message}")
        self.source, self.record, self.field = source, record, field


class DroppableRecord(DataError):
    """A well-formed record that cannot train (empty or identical responses, too long).

    The data module raises it, or skips the record and logs the count, as ``invalid_records`` says.
    """
