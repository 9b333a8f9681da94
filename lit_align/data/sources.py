"""Reading raw records from a file, a saved `datasets` folder, a hub dataset, or files read by a
`datasets` builder (``json``, ``csv``, ``parquet``, ``arrow``, ``text`` with ``data_files``).

JSON and JSONL files are read here line by line so that a bad line is reported with its record
number; parquet files are read with pyarrow; saved folders, hub names and builders go through
`datasets`. :func:`iter_records` streams the records (one batch of a parquet file or dataset at a
time), so a large source is never held as one list of dicts.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

from lit_align.data.errors import DataError

FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")
# endings that mean "a local file" even when we cannot read them (so a typo is not a hub lookup)
PATH_SUFFIXES = FILE_SUFFIXES + (".csv", ".tsv", ".txt", ".arrow", ".gz", ".zip")
BUILDERS = ("json", "csv", "parquet", "arrow", "text")
"""Source names that mean a `datasets` builder reading the files named by ``data_files`` (or the
folder ``data_dir``), as ``datasets.load_dataset("json", data_files=...)`` does."""
DataFiles = Union[str, list[str], dict[str, Union[str, list[str]]]]
SourceKind = Literal["local", "builder", "hub"]
BATCH = 1000  # records per batch when streaming a parquet file or a dataset


@dataclass(frozen=True)
class LoadOptions:
    """How ``datasets.load_dataset`` reads a hub dataset or a builder's files: the data module's
    ``subset`` (``load_dataset``'s ``name``: the dataset's configuration), ``data_dir``,
    ``data_files`` and ``revision``; unset ones are not passed."""

    subset: str | None = None
    data_dir: str | None = None
    data_files: DataFiles | None = None
    revision: str | None = None

    def kwargs(self) -> dict[str, Any]:
        given = {"name": self.subset, "data_dir": self.data_dir, "data_files": self.data_files}
        given["revision"] = self.revision
        return {key: value for key, value in given.items() if value is not None}


def looks_like_path(source: str) -> bool:
    """A local path was meant (so a missing one is an error, not a hub lookup)."""
    return source.startswith((".", "/", "~")) or source.lower().endswith(PATH_SUFFIXES)


def source_kind(source: str) -> SourceKind:
    """``local`` (a file or folder, existing or meant), ``builder`` (a `datasets` builder name such
    as ``json``, reading ``data_files``) or ``hub`` (a dataset name on the Hugging Face hub)."""
    if Path(source).expanduser().exists() or looks_like_path(source) and source not in BUILDERS:
        return "local"
    return "builder" if source in BUILDERS else "hub"


def describe_source(source: str, options: LoadOptions | None = None) -> str:
    """How errors and logs name a source: itself, or for a builder what it reads, e.g.
    ``json(data_files=data/*.jsonl)``."""
    if options is None or source_kind(source) != "builder":
        return source
    parts = []
    if options.data_dir is not None:
        parts.append(f"data_dir={options.data_dir}")
    if options.data_files is not None:
        files = options.data_files
        if isinstance(files, dict):
            files = "{" + ", ".join(f"{split}: {_files_text(value)}" for split, value in files.items()) + "}"
        parts.append(f"data_files={_files_text(files)}")
    return f"{source}({', '.join(parts)})"


def _files_text(files: str | list[str]) -> str:
    return files if isinstance(files, str) else ",".join(files)


def read_records(source: str, split: str = "train", options: LoadOptions | None = None) -> list[dict[str, Any]]:
    """All records of ``source`` as dicts, in order. Raises :class:`DataError` naming the file/line."""
    return list(iter_records(source, split, options))


def iter_records(source: str, split: str = "train", options: LoadOptions | None = None) -> Iterator[dict[str, Any]]:
    """The records of ``source`` as dicts, in order, read as they are consumed (see :func:`read_records`)."""
    path = Path(source).expanduser()
    if path.is_dir():
        yield from _iter_dataset(_read_saved_dataset(path, split))
    elif path.is_file():
        yield from _iter_file(path)
    elif source_kind(source) == "local":
        raise DataError(source, "file not found")
    else:
        yield from _iter_dataset(_load_dataset(source, split, options or LoadOptions()))


def _iter_file(path: Path) -> Iterator[dict[str, Any]]:
    name = path.name.lower()
    if path.stat().st_size == 0:
        raise DataError(str(path), "no records (the file is empty)")
    if not name.endswith(FILE_SUFFIXES):
        raise DataError(str(path), f"unknown file format; supported endings are {', '.join(FILE_SUFFIXES)}")
    count = 0
    try:
        if name.endswith((".jsonl", ".jsonl.gz")):
            records = _iter_jsonl(path)
        elif name.endswith((".json", ".json.gz")):
            records = iter(_read_json(path))
        else:
            records = _iter_parquet(path)
        for record in records:
            count += 1
            yield record
    except (EOFError, OSError, zlib.error) as error:  # the container, not a record, is broken
        raise DataError(str(path), _container_problem(path, error)) from None
    if not count:
        raise DataError(str(path), "no records (the file is empty)")


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


def _iter_parquet(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a parquet file as dicts, a row group batch at a time. Read with pyarrow directly (the
    library under ``datasets``): ``datasets.Dataset.from_parquet`` would first copy the file into
    the Hugging Face cache, which fails on a read-only home folder and costs a second copy of the data."""
    import pyarrow
    import pyarrow.parquet

    try:
        for batch in pyarrow.parquet.ParquetFile(path).iter_batches(batch_size=BATCH):
            yield from batch.to_pylist()
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


def _read_saved_dataset(path: Path, split: str):
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
    return loaded


def _iter_dataset(dataset) -> Iterator[dict[str, Any]]:
    """The rows of a ``datasets.Dataset`` as dicts, a batch at a time."""
    for batch in dataset.iter(batch_size=BATCH):
        columns = list(batch)
        for values in zip(*(batch[column] for column in columns), strict=True):
            yield dict(zip(columns, values, strict=True))


def _load_dataset(name: str, split: str, options: LoadOptions):
    """``datasets.load_dataset`` of a hub dataset or a builder's files, errors as :class:`DataError`."""
    import datasets

    try:
        return datasets.load_dataset(name, split=split, **options.kwargs())
    except Exception as error:  # the hub raises many types; the message is what matters
        detail = " ".join(str(error).split()) or type(error).__name__
        if source_kind(name) == "builder":
            raise DataError(
                describe_source(name, options), f"the datasets '{name}' builder could not read it: {detail}"
            ) from None
        raise DataError(name, f"could not load as a file, folder or hub dataset: {detail}") from None


def source_fingerprint(source: str, options: LoadOptions | None = None) -> str:
    """Identity of a data source for caching: path + size + mtime for files (a builder's
    ``data_files``/``data_dir`` too), the name and the load options for a hub dataset (set
    ``revision`` to follow the hub's version)."""
    path = Path(source).expanduser()
    options = options or LoadOptions()
    if path.exists():
        parts = _file_stamps(path)
    else:
        parts = [source, json.dumps(options.kwargs(), sort_keys=True)]
        if source_kind(source) == "builder":
            parts += [stamp for pattern in _patterns(options) for stamp in _glob_stamps(pattern)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _file_stamps(path: Path) -> list[str]:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]


def _patterns(options: LoadOptions) -> list[str]:
    """The local paths or glob patterns a builder reads (``data_files`` relative to ``data_dir``)."""
    files = options.data_files
    if files is None:
        return [str(Path(options.data_dir or ".") / "**")]
    if isinstance(files, dict):
        files = [item for value in files.values() for item in ([value] if isinstance(value, str) else value)]
    elif isinstance(files, str):
        files = [files]
    return [str(Path(options.data_dir) / item) if options.data_dir else item for item in files]


def _glob_stamps(pattern: str) -> list[str]:
    """Stamps of the local files ``pattern`` matches; the pattern itself when it matches none
    (a remote URL, or files not there yet: reading them will say so)."""
    matches = sorted(glob.glob(str(Path(pattern).expanduser()), recursive=True))
    stamps = [stamp for match in matches if Path(match).is_file() for stamp in _file_stamps(Path(match))]
    return stamps or [pattern]
