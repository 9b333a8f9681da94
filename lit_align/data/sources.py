"""Reading raw records from a file, a saved `datasets` folder, or a hub dataset.

JSON and JSONL files are read here line by line so that a bad line is reported with its record
number; parquet files, saved folders and hub names go through `datasets`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lit_align.data.errors import DataError

FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")
# endings that mean "a local file" even when we cannot read them (so a typo is not a hub lookup)
PATH_SUFFIXES = FILE_SUFFIXES + (".csv", ".tsv", ".txt", ".arrow", ".gz", ".zip")


def looks_like_path(source: str) -> bool:
    """A local path was meant (so a missing one is an error, not a hub lookup)."""
    return source.startswith((".", "/", "~")) or source.lower().endswith(PATH_SUFFIXES)


def read_records(source: str, split: str = "train") -> list[dict[str, Any]]:
    """All records of ``source`` as dicts, in order. Raises :class:`DataError` naming the file/line."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_saved_dataset(path, split)
    if path.is_file():
        return _read_file(path)
    if looks_like_path(source):
        raise DataError(source, "file not found")
    return _read_hub_dataset(source, split)


def _read_file(path: Path) -> list[dict[str, Any]]:
    name = path.name.lower()
    if path.stat().st_size == 0:
        raise DataError(str(path), "no records (the file is empty)")
    if not name.endswith(FILE_SUFFIXES):
        raise DataError(str(path), f"unknown file format; supported endings are {', '.join(FILE_SUFFIXES)}")
    try:
        if name.endswith((".jsonl", ".jsonl.gz")):
            records = list(_iter_jsonl(path))
        elif name.endswith((".json", ".json.gz")):
            records = _read_json(path)
        else:
            records = _read_parquet(path)
    except (EOFError, OSError, zlib.error) as error:  # the container, not a record, is broken
        raise DataError(str(path), _container_problem(path, error)) from None
    if not records:
        raise DataError(str(path), "no records (the file is empty)")
    return records


def _container_problem(path: Path, error: BaseException) -> str:
    """What is wrong with a file that could not be read as the container its name says."""
    detail = f"{type(error).__name__}: {error}"
    gzipped = path.name.lower().endswith(".gz")
    if gzipped and not _starts_like_gzip(path):
        return (
            f"the name ends in .gz but the file is not gzip-compressed ({detail}); rename it or compress it with gzip"
        )
    if gzipped and isinstance(error, (EOFError, zlib.error, gzip.BadGzipFile)):
        return (
            f"the gzip data is truncated or corrupt ({detail}); "
            "the file was probably cut short while copying or writing"
        )
    if isinstance(error, PermissionError):
        return f"cannot be read ({error.strerror})"
    return f"cannot be read ({detail})"


def _starts_like_gzip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(2) == b"\x1f\x8b"


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    """Rows of a parquet file as dicts. Read with pyarrow directly (the library under ``datasets``):
    ``datasets.Dataset.from_parquet`` would first copy the file into the Hugging Face cache, which
    fails on a read-only home folder and costs a second copy of the data."""
    import pyarrow
    import pyarrow.parquet

    try:
        return pyarrow.parquet.read_table(path).to_pylist()
    except pyarrow.ArrowException as error:
        problem = (
            "is not a parquet file" if not _starts_like_parquet(path) else "is a truncated or corrupt parquet file"
        )
        raise DataError(str(path), f"{problem} ({type(error).__name__}: {error})") from None


def _starts_like_parquet(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == b"PAR1"


def _open_text(path: Path):
    # undecodable bytes become lone surrogates (U+DC80..U+DCFF), found by `_not_utf8` with their line;
    # utf-8-sig: a byte-order mark (as some editors write at the start of a UTF-8 file) is skipped
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", errors="surrogateescape")
    return open(path, encoding="utf-8-sig", errors="surrogateescape")


_UNDECODED = re.compile("[\udc80-\udcff]")


def _not_utf8(text: str, line_number: int) -> str | None:
    """Why ``text`` (read by `_open_text`) is not UTF-8, naming the line and byte; None if it is."""
    bad = None if text.isascii() else _UNDECODED.search(text)
    if bad is None:
        return None
    position = bad.start()
    line_number += text.count("\n", 0, position)
    column = position - text.rfind("\n", 0, position)
    return (
        f"line {line_number} is not UTF-8 text (byte 0x{ord(bad.group()) - 0xDC00:02x} at character {column}); "
        "save the file as UTF-8"
    )


def _iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with _open_text(path) as handle:
        count = 0  # records are numbered from 0 skipping blank lines, as everywhere else
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            problem = _not_utf8(line, line_number)
            if problem:
                raise DataError(str(path), problem, record=count)
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(
                    str(path), f"line {line_number} is not valid JSON ({error.msg})", record=count
                ) from None
            if not isinstance(record, dict):
                raise DataError(
                    str(path), f"line {line_number} is a JSON {type(record).__name__}, expected an object", record=count
                )
            count += 1
            yield record


def _read_json(path: Path) -> list[dict[str, Any]]:
    with _open_text(path) as handle:
        text = handle.read()
    problem = _not_utf8(text, 1)
    if problem:
        raise DataError(str(path), problem)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(str(path), f"not valid JSON (line {error.lineno}: {error.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(str(path), "a .json file must hold a list of records (or {'data': [...]})")
    for index, record in enumerate(data):
        if not isinstance(record, dict):
            raise DataError(str(path), f"is a JSON {type(record).__name__}, expected an object", record=index)
    return data


def _read_saved_dataset(path: Path, split: str) -> list[dict[str, Any]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as error:
        raise DataError(str(path), f"is a folder but not a saved `datasets` dataset ({error})") from None
    except Exception as error:  # arrow, json and OS errors of a damaged folder: name the folder
        raise DataError(
            str(path), f"is a saved `datasets` folder that cannot be read ({type(error).__name__}: {error})"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(str(path), f"has no split '{split}' (splits: {', '.join(loaded)})")
        loaded = loaded[split]
    return list(loaded)


def _read_hub_dataset(name: str, split: str) -> list[dict[str, Any]]:
    import datasets

    try:
        return list(datasets.load_dataset(name, split=split))
    except Exception as error:  # the hub raises many types; the message is what matters
        raise DataError(name, f"could not load as a file, folder or hub dataset: {error}") from None


def source_fingerprint(source: str) -> str:
    """Identity of a data source for caching: path + size + mtime for files, the name otherwise."""
    path = Path(source).expanduser()
    if path.exists():
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        parts = [f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
    else:
        parts = [source]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
