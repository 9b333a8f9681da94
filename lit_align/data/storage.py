"""Tokenized examples kept as Arrow files (through `datasets`), not as Python lists in memory.

A data module tokenizes each split into Arrow files and reads them back memory-mapped: the
operating system pages examples in as batches need them, several processes share the same pages,
and a second run opens the files instead of tokenizing again. :class:`ExampleTable` is what the
rest of the package sees: a read-only sequence of example dicts (``len``, ``table[i]``, slices
that are views, iteration) over one split's Arrow data, with per-example values computed later
(cached reference log-probs) held beside it in memory.

How an example is stored: the fields a data module declares in ``example_features`` get Arrow
columns of their kind (token ids as ``int32`` lists); any other field of an example is pickled
into one ``_extra`` column, so ``tokenize_record`` may return anything. A field an example lacks
is null and absent again when the example is read. Raw records travel to the tokenizing workers
as one pickled value per record (``data``) beside its number in the source (``record``): a record
is any dict (nested chat messages with optional fields included), which a column per field would
have to force into one Arrow type.

The cache: ``<cache_dir>/tokenized/<key>/`` holds one or more Arrow files per split and
``meta.json`` (files, their sizes, rows, source and skipped records per split). It is built in a
``<key>.partial-<random>`` folder beside it and renamed into place only when complete, so a run
that fails or is killed midway leaves nothing a later run reads (only a ``.partial-`` folder to
delete); a ``<key>`` folder whose files do not match its ``meta.json`` is rebuilt.
"""

from __future__ import annotations

import json
import os
import pickle
import secrets
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: `import lit_align` does not pay for datasets and pyarrow
    import datasets
    import pyarrow as pa

RECORD = "record"
"""Column of an example's record number in its source (per-record checks name it)."""
EXTRA = "_extra"
"""Column of the example fields without a declared kind, pickled (null when there are none)."""
SKIPPED = "_skipped"
"""Column of a record that was skipped (``invalid_records: skip``): why; null for examples."""
KINDS = ("ids", "ids_list", "int", "float", "floats", "bool", "str")
"""The kinds a data module may declare for an example field (``example_features``)."""
BATCH = 1000  # rows per Arrow record batch written
META = "meta.json"


def arrow_type(kind: str) -> pa.DataType:
    """The Arrow type of a field kind (token ids as ``int32``)."""
    import pyarrow as pa

    ids = pa.list_(pa.int32())
    types = {
        "ids": ids,
        "ids_list": pa.list_(ids),
        "int": pa.int64(),
        "float": pa.float64(),
        "floats": pa.list_(pa.float64()),
        "bool": pa.bool_(),
        "str": pa.string(),
    }
    return types[kind]


def example_schema(features: Mapping[str, str]) -> pa.Schema:
    """Arrow schema of tokenized examples whose declared fields have the given kinds."""
    import pyarrow as pa

    return pa.schema(
        [(name, arrow_type(kind)) for name, kind in features.items()]
        + [(RECORD, pa.int64()), (EXTRA, pa.large_binary()), (SKIPPED, pa.string())]
    )


def _raw_schema() -> pa.Schema:
    import pyarrow as pa

    return pa.schema([(RECORD, pa.int64()), ("data", pa.large_binary())])


def encode_examples(rows: Sequence[Mapping[str, Any]], schema: pa.Schema, owner: str) -> pa.Table:
    """``rows`` (examples, and ``{record, _skipped}`` entries) as an Arrow table of ``schema``."""
    import pyarrow as pa

    declared = set(schema.names)
    columns = {}
    for field in schema:
        if field.name == EXTRA:
            values = [_pickled_extra(row, declared) for row in rows]
        else:
            values = [row.get(field.name) for row in rows]
        try:
            columns[field.name] = pa.array(values, type=field.type)
        except (pa.ArrowException, TypeError, OverflowError) as error:
            kind = next((k for k in KINDS if arrow_type(k) == field.type), str(field.type))
            raise TypeError(
                f"{owner}.tokenize_record gave field '{field.name}' a value that is not of its declared kind "
                f"'{kind}' ({type(error).__name__}: {error}); fix the value or its kind in example_features"
            ) from None
    return pa.table(columns, schema=schema)


def _pickled_extra(row: Mapping[str, Any], declared: set[str]) -> bytes | None:
    extra = {key: value for key, value in row.items() if key not in declared}
    return pickle.dumps(extra, protocol=pickle.HIGHEST_PROTOCOL) if extra else None


def write_arrow(path: Path, schema: pa.Schema, tables: Iterable[pa.Table]) -> datasets.Dataset:
    """Write ``tables`` to one Arrow file at ``path`` (the stream format `datasets` uses), flushed
    to disk, and open it memory-mapped."""
    import datasets
    import pyarrow as pa

    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for table in tables:
            writer.write_table(table, max_chunksize=BATCH)
    flush_to_disk(path)
    return datasets.Dataset.from_file(str(path))


def flush_to_disk(path: Path) -> None:
    """``fsync`` a written file (before the folder holding it is renamed into place)."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def write_records(path: Path, numbered: Iterable[tuple[int, dict[str, Any]]]) -> datasets.Dataset:
    """Raw records with their numbers, one pickled value per record (see the module docstring)."""
    import pyarrow as pa

    schema = _raw_schema()

    def batches() -> Iterator[pa.Table]:
        numbers, data = [], []
        for number, record in numbered:
            numbers.append(number)
            data.append(pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL))
            if len(numbers) == BATCH:
                yield pa.table([numbers, data], schema=schema)
                numbers, data = [], []
        yield pa.table([numbers, data], schema=schema)

    return write_arrow(path, schema, batches())


def decode_records(batch: Mapping[str, list]) -> list[tuple[int, dict[str, Any]]]:
    """(record number, record) of each row of a batch of raw records."""
    return [(number, pickle.loads(data)) for number, data in zip(batch[RECORD], batch["data"], strict=True)]


class ExampleTable(Sequence):
    """The tokenized examples of one split: a read-only sequence of example dicts over Arrow data.

    ``table[i]`` and iteration give a new dict per example (token ids as lists of ints); a slice
    or :meth:`select` is a view on the same data. Values attached with :meth:`attach` (one per
    example, e.g. reference log-probs) are held in memory, shared with the table's views (made
    before or after), and appear as a field of each example.
    Pickling keeps the Arrow data memory-mapped by file (DataLoader workers open the same files).
    """

    def __init__(
        self,
        dataset: datasets.Dataset,
        rows: Sequence[int] | None = None,
        attached: dict[str, list[Any]] | None = None,
        keep_alive: Any = None,
    ):
        self.dataset, self.rows = dataset, rows
        self.attached = {} if attached is None else attached
        """Attached field -> its value per Arrow row (shared by a table and its views)."""
        self._keep_alive = keep_alive  # a temporary folder holding the files, deleted with its last table
        self._arrow = dataset.data.table

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_arrow")
        state["_keep_alive"] = None  # the folder belongs to the process that made it
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._arrow = self.dataset.data.table

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else self._arrow.num_rows

    def _row(self, position: int) -> int:
        return self.rows[position] if self.rows is not None else position

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.select(range(len(self))[index])
        position = range(len(self))[index]  # IndexError and negative indices as a list has them
        row = self._row(position)
        (values,) = self._arrow.slice(row, 1).to_pylist()
        return self._example(values, position)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        position = 0
        for start in range(0, len(self), BATCH):
            for values in self._chunk(range(start, min(len(self), start + BATCH))).to_pylist():
                yield self._example(values, position)
                position += 1

    def _example(self, values: dict[str, Any], position: int) -> dict[str, Any]:
        extra = values.pop(EXTRA, None)
        values.pop(SKIPPED, None)
        example = {key: value for key, value in values.items() if value is not None}
        if extra is not None:
            example.update(pickle.loads(extra))
        for name, attached in self.attached.items():
            example[name] = attached[self._row(position)]
        return example

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None

    def __repr__(self) -> str:
        return f"ExampleTable({len(self)} examples, fields {self.fields})"

    @property
    def fields(self) -> list[str]:
        """The Arrow columns (declared fields and ``record``)."""
        return [name for name in self._arrow.column_names if name not in (EXTRA, SKIPPED)]

    def select(self, positions: Iterable[int]) -> ExampleTable:
        """The examples at ``positions`` (of this table), as a view."""
        positions = positions if isinstance(positions, range) else list(positions)
        rows = positions if self.rows is None else [self.rows[p] for p in positions]
        return ExampleTable(self.dataset, rows, self.attached, self._keep_alive)

    def _chunk(self, positions: range) -> pa.Table:
        """The Arrow rows at consecutive ``positions`` (of this table)."""
        import pyarrow as pa

        if self.rows is None:
            return self._arrow.slice(positions.start, len(positions))
        return self._arrow.take(pa.array(self.rows[positions.start : positions.stop], type=pa.int64()))

    def column(self, name: str, positions: Sequence[int] | None = None) -> list[Any]:
        """One Arrow column's values in example order (e.g. every ``label``), or at ``positions``,
        without building example dicts."""
        import pyarrow as pa

        column = self._arrow.column(name)
        if positions is not None:
            rows = [self._row(p) for p in positions]
        elif self.rows is not None:
            rows = self.rows
        else:
            return column.to_pylist()
        return column.take(pa.array(rows, type=pa.int64())).to_pylist()

    def iter_column(self, name: str) -> Iterator[Any]:
        """One column's values in example order, read a batch at a time."""
        for start in range(0, len(self), BATCH):
            yield from self._chunk(range(start, min(len(self), start + BATCH))).column(name).to_pylist()

    @property
    def path(self) -> Path:
        """The (first) Arrow file holding this table."""
        return Path(self.dataset.cache_files[0]["filename"])

    def attach(self, name: str, values: Sequence[Any]) -> None:
        """Give every example the field ``name`` with its value in ``values`` (held in memory)."""
        if len(values) != len(self):
            raise ValueError(f"{len(values)} values for {len(self)} examples")
        if self.rows is None:
            self.attached[name] = list(values)
            return
        by_row = self.attached.setdefault(name, [None] * self._arrow.num_rows)
        for position, value in enumerate(values):
            by_row[self.rows[position]] = value

    def write(self, path: Path, add: Mapping[str, tuple[str, Callable[[range], list]]] | None = None) -> ExampleTable:
        """This table's examples as a new compact Arrow file at ``path`` (a view's rows only),
        with the columns of ``add`` added: name -> (kind, a function giving the values of a
        range of positions), called a batch at a time."""
        import pyarrow as pa

        add = dict(add or {})
        schema = self._arrow.schema
        for name, (kind, _) in add.items():
            schema = schema.append(pa.field(name, arrow_type(kind)))

        def tables() -> Iterator[pa.Table]:
            for start in range(0, len(self), BATCH):
                positions = range(start, min(len(self), start + BATCH))
                chunk = self._chunk(positions)
                for name, (kind, values) in add.items():
                    chunk = chunk.append_column(name, pa.array(values(positions), type=arrow_type(kind)))
                yield chunk

        table = ExampleTable(write_arrow(path, schema, tables()), keep_alive=self._keep_alive)
        table.attached.update(
            {name: [values[self._row(p)] for p in range(len(self))] for name, values in self.attached.items()}
        )
        return table


# ---- the cache folder ------------------------------------------------------------------------------
def new_workspace(folder: Path) -> Path:
    """A fresh ``<folder>.partial-<random>`` folder beside ``folder`` to build it in."""
    workspace = folder.with_name(f"{folder.name}.partial-{secrets.token_hex(4)}")
    workspace.mkdir(parents=True)
    return workspace


def finalize(workspace: Path, splits: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Delete every file of ``workspace`` but the split files and write its ``meta.json``:
    ``splits`` gives per split its ``files`` (in the workspace), ``rows``, ``source``,
    ``skipped`` and ``first_skipped``; the meta adds each file's size. Returns the meta."""
    meta: dict[str, Any] = {"splits": {}}
    keep = {META}
    for name, split in splits.items():
        files = [Path(file).name for file in split["files"]]
        for file in files:
            flush_to_disk(workspace / file)
        keep.update(files)
        sizes = [(workspace / file).stat().st_size for file in files]
        meta["splits"][name] = {**split, "files": files, "sizes": sizes}
    for path in workspace.iterdir():
        if path.name not in keep:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    with open(workspace / META, "w", encoding="utf-8") as handle:
        json.dump(meta, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    return meta


def commit(workspace: Path, folder: Path) -> None:
    """Rename a finalized ``workspace`` to ``folder``. Another process that committed the same
    folder first wins (its tables are the same); a broken folder there is replaced."""
    try:
        os.rename(workspace, folder)
    except OSError:  # the folder exists: built by another process meanwhile, or broken
        if read_meta(folder) is not None:
            shutil.rmtree(workspace, ignore_errors=True)
            return
        shutil.rmtree(folder, ignore_errors=True)
        os.rename(workspace, folder)


def read_meta(folder: Path) -> dict[str, Any] | None:
    """The cache folder's ``meta.json`` when every file it lists is there with its size, else None."""
    try:
        with open(folder / META, encoding="utf-8") as handle:
            meta = json.load(handle)
        for split in meta["splits"].values():
            for name, size in zip(split["files"], split["sizes"], strict=True):
                if (folder / name).stat().st_size != size:
                    return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta


def open_tables(folder: Path, meta: Mapping[str, Any], keep_alive: Any = None) -> dict[str, ExampleTable]:
    """Each split's examples, memory-mapped from the files ``meta`` lists. Raises if they do not
    hold the rows it says (a damaged file)."""
    import datasets

    tables = {}
    for name, split in meta["splits"].items():
        parts = [datasets.Dataset.from_file(str(folder / file)) for file in split["files"]]
        dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        if dataset.num_rows != split["rows"]:
            raise ValueError(f"{name}: {dataset.num_rows} rows, meta.json says {split['rows']}")
        tables[name] = ExampleTable(dataset, keep_alive=keep_alive)
    return tables


def tokenize_records(
    raw: datasets.Dataset,
    function: Callable[[dict[str, list]], pa.Table],
    schema: pa.Schema,
    path: Path,
    fingerprint: str,
    num_proc: int,
    description: str,
) -> tuple[ExampleTable, list[str]]:
    """``datasets.map`` of ``function`` (raw records -> :func:`encode_examples` tables) over
    ``raw`` into Arrow files at ``path`` (one per process with ``num_proc`` > 1); the examples, and
    the reasons of the records it skipped, in record order."""
    import datasets
    import pyarrow.compute as pc

    processes = min(num_proc, len(raw))
    with progress_bars():
        tokenized = raw.map(
            function,
            batched=True,
            batch_size=BATCH,
            remove_columns=raw.column_names,
            features=datasets.Features.from_arrow_schema(schema),
            num_proc=processes if processes > 1 else None,
            cache_file_name=str(path),
            new_fingerprint=fingerprint,
            load_from_cache_file=False,
            desc=description,
        )
    skipped = tokenized.data.table.column(SKIPPED)
    reasons = skipped.drop_null().to_pylist()
    rows = pc.indices_nonzero(pc.is_null(skipped)).to_pylist() if reasons else None
    return ExampleTable(tokenized, rows), reasons


@contextmanager
def progress_bars() -> Iterator[None]:
    """``datasets``' progress bars only on a terminal, as Lightning's own: not in logs or tests."""
    import datasets

    hide = not sys.stderr.isatty() and not datasets.are_progress_bars_disabled()
    if hide:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if hide:
            datasets.enable_progress_bars()
