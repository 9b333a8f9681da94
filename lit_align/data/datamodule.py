"""The data modules' shared machinery (:class:`AlignmentDataModule`: raw records -> typed
records -> token ids (cached) -> batches) and the paired preference data module."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Optional, Union

import torch
from lightning import LightningDataModule
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from lit_align.data.arithmetic_task import ArithmeticTask
from lit_align.data.collate import REFERENCE_FIELD, Collator, Layout, PackedCollator, PairLayout
from lit_align.data.contract import DataRequest, ServedData
from lit_align.data.errors import DataError, DroppableRecord
from lit_align.data.formats import PAIR_FIELDS, FormatName, normalise_record
from lit_align.data.sampling import GlobalBatchOrder, ResumableLoader
from lit_align.data.sources import (
    DataFiles,
    LoadOptions,
    describe_source,
    iter_records,
    source_fingerprint,
    source_kind,
)
from lit_align.data.storage import (
    RECORD,
    SKIPPED,
    ExampleTable,
    commit,
    decode_records,
    encode_examples,
    example_schema,
    finalize,
    new_workspace,
    open_tables,
    read_meta,
    tokenize_records,
    write_records,
)
from lit_align.data.tasks import WordRulesTask
from lit_align.data.tokenize import TruncationMode, pair_example, tokenize_responses
from lit_align.errors import SettingError
from lit_align.settings import Count, NonNegativeInt, Range, Seed, check_arguments

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)
BUILTIN = "builtin"
# 3: pairs carry `margin`; 4: every example its source record number; 5: Arrow files;
# 6: chat replies end with the template's end of turn (no extra EOS), messages kept whole
# 7: prompt examples keep their reference answer
CACHE_VERSION = 7
_READS = {"subset": ("hub",), "revision": ("hub",), "data_dir": ("hub", "builder"), "data_files": ("hub", "builder")}
_KIND_WORDS = {
    "builtin": "the built-in task",
    "local": "a local file or folder",
    "builder": "a datasets builder",
    "hub": "a hub dataset",
}
_KIND_PLURALS = {"builder": "datasets builders (json, csv, ...)", "hub": "hub datasets"}


def default_cache_dir() -> Path:
    return Path(os.environ.get("LIT_ALIGN_CACHE", Path.home() / ".cache" / "lit-align"))


class AlignmentDataModule(LightningDataModule):
    """What every lit-align data module shares: sources, truncation, tokenized cache, batching
    (global batch order, exact resume, packing) and the :class:`lit_align.data.contract.DataRequest`
    / :class:`lit_align.data.contract.ServedData` contract with the method. A subclass per data
    regime says which record fields it reads, its layout and how one record becomes examples.

    Args:
        train: ``"builtin"`` (the built-in task ``task`` sets up) or a data source: a .jsonl/.jsonl.gz/
            .json/.parquet file, a folder written by ``datasets.save_to_disk``, a hub dataset name,
            or a ``datasets`` builder (``json``, ``csv``, ``parquet``, ``arrow``, ``text``) that
            reads ``data_files``.
        val: held-out source; when unset, the built-in task's held-out split, or ``val_fraction``
            of ``train`` split off with ``seed``.
        split: split to read from a hub dataset or saved DatasetDict for training.
        val_split: split to read for ``val`` (defaults to ``split``); only with ``val``.
        test: source ``lit-align test`` (``trainer.test``) evaluates on, read, tokenized and
            cached like ``val``; when unset, testing uses the validation split and logs a warning
            saying so.
        test_split: split to read for ``test`` (defaults to ``split``); only with ``test``.
        val_fraction: fraction of ``train`` held out when ``val`` is unset (non-builtin data).
        format: record shape: ``auto`` (detected per record), ``explicit`` {prompt, chosen, rejected}
            strings, ``conversational`` chat message lists, ``implicit`` whole transcripts sharing
            a prompt prefix (Anthropic HH), ``transcript`` the same transcripts read as chat turns
            (rendered with the tokenizer's chat template; never picked by ``auto``).
        columns: rename fields, mapping our name to the dataset's, e.g. ``{"prompt": "question"}``.
        assistant_marker: the text that ends the prompt in ``implicit`` transcripts (and opens an
            assistant turn in ``transcript`` ones).
        user_marker: the text that opens a user turn in ``transcript`` transcripts.
        chat_template_kwargs: extra variables for the chat template when rendering conversations,
            e.g. ``{"enable_thinking": false}`` (Qwen3) or ``{"tools": [...]}``; prompts for
            generation are rendered with them too.
        task: the built-in task and its settings (used when ``train`` is ``"builtin"``): word
            rules (:class:`lit_align.data.WordRulesTask`, the default, e.g. ``{rules: [first]}``)
            or multi-step arithmetic with worked solutions (:class:`lit_align.data.ArithmeticTask`,
            ``{kind: arithmetic, steps: 2}``).
        max_length: longest prompt + response in tokens.
        max_prompt_length: longest prompt in tokens (default: half of ``max_length``).
        truncation: ``keep_end`` (keep the prompt's end, cut responses on the right), ``drop``
            (skip pairs that do not fit) or ``error``.
        invalid_records: what to do with well-formed records that cannot train (empty or
            identical responses, too long under ``drop``): ``skip`` them and log the count, or ``error``.
        max_records: use only the first N records of each source (quick runs).
        batch_size: pairs per training batch (the policy sees 2x rows).
        eval_batch_size: pairs per validation/test batch (default: ``batch_size``).
        packing: pack the sequences of a batch back to back into rows of up to ``max_length``
            tokens (``position_ids``, no attention mask, no padding between them); used only after the
            model passes a check that packed sequences stay isolated under its attention implementation,
            else padding is used and the reason logged.
        num_workers: DataLoader worker processes.
        seed: seed for shuffling and for the ``val_fraction`` split.
        cache_dir: where tokenized data is cached (default ``$LIT_ALIGN_CACHE`` or ~/.cache/lit-align),
            as Arrow files in ``tokenized/<key>/``.
        use_cache: read/write the tokenized cache (without it the Arrow files are written to a
            temporary folder, deleted when the data module is).
        num_proc: processes that tokenize (``datasets.map``'s ``num_proc``); 1 tokenizes in this one.
        subset: the configuration of a hub dataset (``datasets.load_dataset``'s ``name``; "Subset"
            on the hub's page), e.g. ``main``.
        data_dir: folder inside a hub dataset to read, or the folder a builder source reads.
        data_files: files a hub dataset or a builder source (``train: json``) reads: a path or glob,
            a list of them, or a mapping split -> path(s) (then ``split`` picks one).
        revision: git revision (branch, tag or commit) of a hub dataset; part of the cache key.

    ``subset``, ``data_dir``, ``data_files`` and ``revision`` apply to every hub (or builder)
    source among ``train``, ``val`` and ``test``; set without any such source, they are an error.
    """

    def __init__(
        self,
        train: str = BUILTIN,
        val: Optional[str] = None,
        split: str = "train",
        val_split: Optional[str] = None,
        test: Optional[str] = None,
        test_split: Optional[str] = None,
        val_fraction: Annotated[float, Range(0, 1, low_open=True, high_open=True)] = 0.05,
        format: FormatName = "auto",
        columns: Optional[dict[str, str]] = None,
        assistant_marker: str = "\n\nAssistant:",
        user_marker: str = "\n\nHuman:",
        chat_template_kwargs: Optional[dict[str, Any]] = None,
        task: Optional[Union[WordRulesTask, ArithmeticTask]] = None,
        max_length: Annotated[int, Range(2)] = 512,
        max_prompt_length: Optional[Count] = None,
        truncation: TruncationMode = "keep_end",
        invalid_records: Literal["skip", "error"] = "skip",
        max_records: Optional[Count] = None,
        batch_size: Count = 8,
        eval_batch_size: Optional[Count] = None,
        packing: bool = False,
        num_workers: NonNegativeInt = 0,
        seed: Seed = 0,
        cache_dir: Optional[str] = None,
        use_cache: bool = True,
        num_proc: Count = 1,
        subset: Optional[str] = None,
        data_dir: Optional[str] = None,
        data_files: Optional[DataFiles] = None,
        revision: Optional[str] = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        check_arguments(self, self.hparams)  # the settings of subclasses too
        self.load_options = LoadOptions(subset, data_dir, data_files, revision)
        """How hub and builder sources are read (``datasets.load_dataset``'s options)."""
        self._check_load_options()
        if max_prompt_length is not None and max_prompt_length >= max_length:
            raise SettingError(
                type(self).__name__,
                "max_prompt_length",
                f"must be < max_length={max_length}, got {max_prompt_length}: responses need room",
            )
        for source_name, source, split_name in (("val", val, val_split), ("test", test, test_split)):
            if split_name is not None and source is None:  # the split of a source that is never read
                raise SettingError(
                    type(self).__name__,
                    f"{source_name}_split",
                    f"must be unset without {source_name}, got {split_name!r}: it names the split to read from "
                    f"the {source_name} source (set {source_name} too)",
                )
        if chat_template_kwargs and train == BUILTIN and val is None and test is None:
            raise SettingError(
                type(self).__name__,
                "chat_template_kwargs",
                "is set, but the only data is the built-in task, whose prompts are plain text: no chat template "
                "renders them; remove it or train on conversational data",
            )
        unknown = sorted(set(columns or {}) - set(self.record_fields))
        if unknown:  # a misspelt key would silently rename nothing
            raise SettingError(
                type(self).__name__,
                "columns",
                f"maps fields it does not read: {', '.join(unknown)}; the keys are lit-align's "
                f"field names ({', '.join(self.record_fields)}), the values the file's",
            )
        self.task = task or WordRulesTask()
        self.max_prompt_length = max_length // 2 if max_prompt_length is None else max_prompt_length
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.request: DataRequest | None = None
        """The method's request, once served."""
        self.served: ServedData | None = None
        """The answer to it (see :meth:`serve`)."""
        self._built_as: str | None = None  # the cache key the tokenized splits were built under
        self.datasets: dict[str, ExampleTable] = {}
        """Per split, its tokenized examples (Arrow, memory-mapped from the cache)."""
        self.sources: dict[str, str] = {}
        """Per split, the name of the source its examples were read from (a file, folder, hub name
        or ``builtin:<split>``); each example's ``record`` is its record number there."""
        self.skipped: dict[str, int] = {}
        self._warned_testing_on_val = False
        self.train_chunks: int | None = None
        """Serve the training examples in this many consecutive chunks, in their order: chunk
        ``current_epoch % train_chunks`` in each epoch, shuffled only within the chunk. Set by
        :class:`lit_align.callbacks.StepwiseDPO`, which also makes the trainer reload the train
        loader every epoch; None serves every example every epoch."""

    def _check_load_options(self) -> None:
        """``subset``/``data_dir``/``data_files``/``revision`` set with no source that reads them,
        or a builder source with no files to read, are errors."""
        h, owner = self.hparams, type(self).__name__
        kinds = {"train": "builtin" if h.train == BUILTIN else source_kind(h.train)}
        kinds.update({name: source_kind(h[name]) for name in ("val", "test") if h[name] is not None})
        for setting, readers in _READS.items():
            value = h[setting]
            if value is None or any(kind in readers for kind in kinds.values()):
                continue
            sources = ", ".join(f"{name}={h[name]!r} ({_KIND_WORDS[kind]})" for name, kind in kinds.items())
            readers_text = " and ".join(_KIND_PLURALS[kind] for kind in readers)
            raise SettingError(
                owner,
                setting,
                f"is set ({value!r}) but no source reads it: it applies to {readers_text} only, and the sources "
                f"are {sources}; unset it",
            )
        for name, kind in kinds.items():
            if kind == "builder" and h.data_files is None and h.data_dir is None:
                raise SettingError(
                    owner,
                    "data_files",
                    f"must be set: {name}={h[name]!r} is a datasets builder, which reads the files data_files names "
                    "(or the folder data_dir)",
                )

    def source_name(self, source: str) -> str:
        """How errors, logs and :attr:`sources` name ``source`` (a builder with what it reads)."""
        return describe_source(source, self.load_options)

    # ---- records -------------------------------------------------------------------------
    def _raw_splits(self, store: RecordStore) -> dict[str, tuple[str, datasets.Dataset]]:
        """Per split: (source name, its raw records, numbered as in that source: see :class:`RecordStore`)."""
        h = self.hparams
        if self.held_out_only:
            splits = {"val": (self.source_name(h.val), store.read(h.val, h.val_split or h.split))}
        elif h.train == BUILTIN:
            splits = {
                name: (f"builtin:{name}", store.of(name, self.builtin_records(name))) for name in ("train", "val")
            }
            if h.val:
                splits["val"] = (self.source_name(h.val), store.read(h.val, h.val_split or h.split))
        else:
            train_records = store.read(h.train, h.split)
            if h.val:
                splits = {
                    "train": (self.source_name(h.train), train_records),
                    "val": (self.source_name(h.val), store.read(h.val, h.val_split or h.split)),
                }
            else:
                order = list(range(len(train_records)))
                random.Random(h.seed).shuffle(order)
                held = set(order[: max(1, round(len(order) * h.val_fraction))])
                name = self.source_name(h.train)
                splits = {
                    "train": (name, train_records.select([i for i in range(len(order)) if i not in held])),
                    "val": (name, train_records.select([i for i in range(len(order)) if i in held])),
                }
        if h.test and not self.held_out_only:
            splits["test"] = (self.source_name(h.test), store.read(h.test, h.test_split or h.split))
        if h.max_records:
            splits = {name: (src, first_rows(recs, h.max_records)) for name, (src, recs) in splits.items()}
        return splits

    held_out_only: bool = False
    """Read and tokenize the ``val`` source alone (no training or test split): set, before the
    method's request is served, by ``lit-align eval``, which validates on one file and has no use
    for the training data. Not a setting of the config; it is part of the cache key."""

    # ---- what a data regime defines ------------------------------------------------------------
    record_fields: ClassVar[tuple[str, ...]] = ()
    """The record fields this data module reads: the keys ``columns`` may map."""
    layout: ClassVar[Layout]
    """Which responses of an example become policy rows, and in which order."""
    provides_ptx: bool = False
    """Whether training batches carry ``ptx`` demonstrations (PPO-ptx)."""
    example_features: ClassVar[dict[str, str]] = {}
    """The Arrow kind of each example field :meth:`tokenize_record` returns (``ids``: token ids,
    ``ids_list``, ``int``, ``float``, ``floats``, ``bool``, ``str``); fields not named here are
    stored pickled (see :mod:`lit_align.data.storage`)."""

    def builtin_records(self, split: str) -> list[dict[str, Any]]:
        """Raw records of the built-in task's ``split`` (``train`` or ``val``)."""
        return self.task.split(split)

    def tokenize_record(self, record: dict[str, Any], source: str, index: int) -> list[dict[str, Any]]:
        """Token-id examples of one raw record."""
        raise NotImplementedError

    def tokenize_responses(
        self, prompt, responses: dict[str, Any], source: str, index: int
    ) -> tuple[list[int], dict[str, list[int]]]:
        """(prompt ids, {field: response ids}) of one record, with this module's length limits,
        truncation and chat-template variables (:func:`lit_align.data.tokenize.tokenize_responses`)."""
        h = self.hparams
        return tokenize_responses(
            prompt,
            responses,
            self.tokenizer,
            h.max_length,
            self.max_prompt_length,
            h.truncation,
            source,
            index,
            template_kwargs=h.chat_template_kwargs,
        )

    def count_classes(self) -> dict[str, int]:
        """Desirable and undesirable training examples (data with a ``label`` per example)."""
        raise SettingError(
            None, "data.class_path", f"{type(self).__name__} has no desirable/undesirable labels to count"
        )

    def finish_split(self, name: str, source: str, examples: ExampleTable) -> ExampleTable:
        """Last touch on a tokenized split before it is cached (e.g. mismatched completions):
        return ``examples`` or a new table (:meth:`ExampleTable.write` adds columns)."""
        return examples

    def _tokenize_split(
        self, name: str, source: str, raw: datasets.Dataset, workspace: Path, key: str
    ) -> tuple[ExampleTable, list[str]]:
        """``raw`` records tokenized into Arrow files in ``workspace`` (by ``num_proc`` processes);
        the examples, and why each skipped record was skipped."""
        processes = min(self.hparams.num_proc, len(raw))
        log.info(
            "tokenizing %d %s records of %s%s", len(raw), name, source, f" in {processes} processes" * (processes > 1)
        )
        schema = example_schema(self.example_features)
        examples, reasons = tokenize_records(
            raw,
            _TokenizeBatch(self._worker_copy(), source, schema),
            schema,
            workspace / f"{name}.arrow",
            f"{key}-{name}",
            processes,
            f"Tokenizing {name}",
        )
        if not len(examples):
            raise DataError(source, f"no usable records ({len(reasons)} skipped; first: {reasons[:1]})")
        return examples, reasons

    def _worker_copy(self) -> AlignmentDataModule:
        """This data module without what tokenizing does not need and workers cannot (or should
        not) receive: the trainer, loaders, examples, the method's check."""
        clone = copy.copy(self)
        for name in ("trainer", "served", "_train_loader", "_ptx_batches", "_scratch"):
            if name in clone.__dict__:
                clone.__dict__[name] = None
        clone.datasets = {}
        if self.request is not None:
            clone.request = dataclasses.replace(self.request, check_examples=None)
        return clone

    @property
    def packing(self) -> bool:
        """Whether batches are packed now: the ``packing`` setting until the method's request is
        served, then the served answer (turned off when the model cannot isolate packed sequences)."""
        return self.served.packing if self.served is not None else self.hparams.packing

    # ---- cache ---------------------------------------------------------------------------
    def cache_key(self) -> str:
        """Identity of the tokenized data: sources, settings and tokenizer."""
        h = dict(self.hparams)
        for name in ("batch_size", "eval_batch_size", "packing", "num_workers", "cache_dir", "use_cache", "num_proc"):
            h.pop(name, None)
        options = self.load_options
        train_id = repr(self.task) if h["train"] == BUILTIN else source_fingerprint(h["train"], options)
        val_id = source_fingerprint(h["val"], options) if h["val"] else None
        test_id = source_fingerprint(h["test"], options) if h.get("test") else None
        if self.held_out_only:  # the training and test sources are not read (nor need to exist)
            train_id, test_id = "held out only", None
        identity = {
            "version": CACHE_VERSION,
            "regime": [type(self).__qualname__, *self.cache_identity()],
            "settings": {k: v for k, v in h.items() if k != "task"},
            "sources": [train_id, val_id, test_id],
            "tokenizer": tokenizer_fingerprint(self.tokenizer),
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def cache_identity(self) -> list[Any]:
        """Anything besides the hyper-parameters that changes the tokenized examples."""
        return []

    def cache_root(self) -> Path:
        return Path(self.hparams.cache_dir or default_cache_dir())

    def _load_cache(self, folder: Path) -> tuple[dict[str, ExampleTable], dict[str, Any]] | None:
        """The cached splits in ``folder`` and its meta, or None (no cache; a damaged one is logged)."""
        if not self.hparams.use_cache or not folder.exists():
            return None
        meta = read_meta(folder)
        try:
            if meta is None:
                raise ValueError(f"its {folder / 'meta.json'} is missing or does not match the files")
            return open_tables(folder, meta), meta
        except Exception as error:  # a truncated or corrupt cache is rebuilt, not trusted
            log.warning("tokenized cache %s is unreadable; rebuilding it (%s)", folder, error)
            shutil.rmtree(folder, ignore_errors=True)
            return None

    def _build(self, key: str, folder: Path) -> tuple[dict[str, ExampleTable], dict[str, Any]]:
        """Tokenize every split into the cache ``folder`` (built beside it, renamed into place when
        complete); where the cache cannot be written, into a temporary folder instead."""
        if self.hparams.use_cache:
            try:
                workspace = new_workspace(folder)
            except OSError as error:
                self._warn_unwritable(folder.parent, error)
            else:
                try:
                    meta = finalize(workspace, self._tokenize_into(workspace, key))
                    commit(workspace, folder)
                except OSError as error:  # disk full midway: this run goes on without the cache
                    shutil.rmtree(workspace, ignore_errors=True)
                    self._warn_unwritable(folder.parent, error)
                except BaseException:  # nothing half-written stays behind
                    shutil.rmtree(workspace, ignore_errors=True)
                    raise
                else:
                    meta = read_meta(folder) or meta  # another process may have committed it first
                    return open_tables(folder, meta), meta
        self._scratch = tempfile.TemporaryDirectory(prefix="lit-align-tokenized-")
        workspace = Path(self._scratch.name)
        meta = finalize(workspace, self._tokenize_into(workspace, key))
        return open_tables(workspace, meta, keep_alive=self._scratch), meta

    def _tokenize_into(self, workspace: Path, key: str) -> dict[str, dict[str, Any]]:
        """Read and tokenize every split into Arrow files in ``workspace``; per split, what
        :func:`lit_align.data.storage.finalize` records."""
        splits = {}
        for name, (source, raw) in self._raw_splits(RecordStore(workspace, self.load_options)).items():
            examples, reasons = self._tokenize_split(name, source, raw, workspace, key)
            examples = self.finish_split(name, source, examples)
            if examples.rows is not None:  # a view: written compactly
                examples = examples.write(workspace / f"{name}-examples.arrow")
            splits[name] = {
                "files": [item["filename"] for item in examples.dataset.cache_files],
                "rows": len(examples),
                "source": source,
                "skipped": len(reasons),
                "first_skipped": reasons[0] if reasons else None,
            }
        return splits

    def _warn_unwritable(self, folder: Path, error: OSError) -> None:
        # read-only or full: the run does not need the cache, only the next one would
        log.warning(
            "cannot write the tokenized-data cache in %s (%s); continuing without it. Set data.init_args.cache_dir "
            "or $LIT_ALIGN_CACHE to a writable folder, or data.init_args.use_cache to false",
            folder,
            error.strerror or error,
        )

    # ---- Lightning hooks -----------------------------------------------------------------
    def serve(self, request: DataRequest) -> ServedData:
        """Answer a method's :class:`DataRequest` (the one place a method and its data meet):
        check the layout, tokenize with the method's tokenizer (cached), run the method's check
        of every example, count classes and provide ptx batches when asked."""
        if not isinstance(self.layout, request.layouts):
            wanted = " or ".join(layout.__name__ for layout in request.layouts)
            raise SettingError(
                None,
                "data.class_path",
                f"{request.method} trains on {wanted} data, but the data module {type(self).__name__} gives "
                f"{type(self.layout).__name__} data; use {request.data_modules}",
            )
        if request.ptx and not self.provides_ptx:
            raise SettingError(
                None,
                "ptx_coef",
                f"{request.method}: ptx_coef needs ``ptx`` batches (demonstrations or pre-training text) in the "
                f"training batches, and the data module {type(self).__name__} provides none: set "
                "data.init_args.ptx_train (PromptDataModule: a demonstrations/text source or builtin)",
            )
        if self.provides_ptx and not request.ptx:
            raise SettingError(
                None,
                "data.init_args.ptx_train",
                f"{request.method}: data.init_args.ptx_train is set, but "
                + (
                    f"{request.ptx_setting} is 0, so the ptx batches would be read and never trained on: set "
                    f"model.init_args.{request.ptx_setting} > 0 (PPO-ptx) or remove ptx_train"
                    if request.ptx_setting
                    else f"{request.method} does not train on ptx batches (PPO-ptx, ptx_coef, is PPO's): "
                    "remove ptx_train"
                ),
            )
        if self.served is not None and self.request == request:
            return self.served
        self.request = request
        if self.tokenizer is None:
            self.tokenizer = request.tokenizer
        if self.datasets and self._built_as != self.cache_key():  # tokenized before the request changed what is needed
            self.datasets = {}
        self.setup()
        if request.check_examples is not None:
            for split, examples in self.datasets.items():
                request.check_examples(split, self.sources.get(split, split), examples)
        self.served = ServedData(
            layout=self.layout,
            packing=self.hparams.packing,
            class_counts=self.count_classes() if request.class_counts else None,
        )
        return self.served

    def attach_reference(self, values: dict[str, list[Any]]) -> None:
        """Per split, each example's per-token reference log-probs (one tensor per response, in
        layout order), carried by the example into its batches (``model.reference: cached``)."""
        for split, examples in self.datasets.items():
            examples.attach(REFERENCE_FIELD, values[split])

    def setup(self, stage: str | None = None) -> None:
        """Read and tokenize every split (or load them from the cache). Without a tokenizer
        (Lightning calls this before the method has served its request) nothing happens yet:
        :meth:`serve` sets the method's tokenizer and calls it again."""
        if self.datasets or self.tokenizer is None:
            return
        if (
            self.tokenizer.pad_token_id is None and self.tokenizer.eos_token_id is None
        ):  # without pad, batches are padded with eos
            raise SettingError(
                None,
                "tokenizer",
                f"{type(self).__name__}: the tokenizer has neither a pad nor an eos token, so batches cannot be "
                "padded; set tokenizer.pad_token",
            )
        key = self.cache_key()  # hashes the tokenizer: computed once per setup
        folder = self.cache_root() / "tokenized" / key
        loaded = self._load_cache(folder)
        tables, meta = loaded if loaded is not None else self._build(key, folder)
        self.datasets = tables
        self.sources = {name: split["source"] for name, split in meta["splits"].items()}
        self._built_as = key
        self.skipped = {name: split["skipped"] for name, split in meta["splits"].items()}
        for name, split in meta["splits"].items():
            if split["skipped"]:
                log.warning(
                    "skipped %d of %d %s records that cannot train (invalid_records=skip); first: %s",
                    split["skipped"],
                    split["skipped"] + len(self.datasets[name]),
                    name,
                    split["first_skipped"],
                )

    def _loader(self, name: str, shuffle: bool, examples: ExampleTable | None = None) -> DataLoader:
        """Batches of ``batch_size`` per process; the global batches are the same for any number
        of processes and a resumed epoch continues where it stopped (see :mod:`lit_align.data.sampling`)."""
        if not self.datasets:
            raise SettingError(
                None,
                "tokenizer",
                f"{type(self).__name__} needs a tokenizer before it can serve batches: use it with a lit-align "
                "method (which gives its tokenizer through serve()), or set `datamodule.tokenizer` and call setup()",
            )
        size = self.hparams.batch_size if name == "train" else self.hparams.eval_batch_size or self.hparams.batch_size
        examples = self.datasets[name] if examples is None else examples
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        order = GlobalBatchOrder(
            len(examples),
            size,
            shuffle=shuffle,
            seed=self.hparams.seed,
            num_replicas=world,
            rank=rank,
        )
        if name != "train":
            return DataLoader(
                examples, batch_size=size, sampler=order, collate_fn=self.collate, num_workers=self.hparams.num_workers
            )
        self._train_loader = ResumableLoader(
            examples, batch_size=size, sampler=order, collate_fn=self.collate, num_workers=self.hparams.num_workers
        )
        self._resume_train_loader()
        return self._train_loader

    # ---- where a checkpoint stopped in its epoch (Lightning saves and restores data module state) --
    _train_loader: ResumableLoader | None = None
    _train_position: dict[str, int] | None = None  # from a checkpoint, until a train loader takes it

    def state_dict(self) -> dict[str, Any]:
        """The train loader's position (epoch, global batches handed out), saved in checkpoints."""
        position = self._train_loader.position() if self._train_loader is not None else None
        return {"train_position": position} if position else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """On a resumed ``fit``, the train order starts where the checkpoint stopped. Lightning
        calls this before it builds the train loader, or (under FSDP) after but before the first
        batch; the loader takes the position in both cases."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING and state_dict.get("train_position"):
            self._train_position = dict(state_dict["train_position"])
            self._resume_train_loader()

    def _resume_train_loader(self) -> None:
        if self._train_position is not None and self._train_loader is not None:
            self._train_loader.sampler.resume_at(self._train_position["epoch"], self._train_position["batches"])
            self._train_position = None

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Padded or packed batch; decided per call, so the packing check may switch it late."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        if self.packing:
            return PackedCollator(pad, capacity=self.hparams.max_length, layout=self.layout)(examples)
        return Collator(pad, layout=self.layout)(examples)

    def train_dataloader(self) -> DataLoader:
        if not self.train_chunks:
            return self._loader("train", shuffle=True)
        examples, trainer = self.datasets["train"], self.trainer
        k = (trainer.current_epoch if trainer is not None else 0) % self.train_chunks
        bounds = [len(examples) * i // self.train_chunks for i in range(self.train_chunks + 1)]
        return self._loader("train", shuffle=True, examples=examples[bounds[k] : bounds[k + 1]])

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """The ``test`` source's examples; without one, the validation split's, with a warning
        (once per data module) that the test metrics are then validation metrics."""
        if "test" in self.datasets:
            return self._loader("test", shuffle=False)
        if not self._warned_testing_on_val:
            self._warned_testing_on_val = True
            log.warning(
                "no data.init_args.test source: testing on the validation split (%s, %d examples); set "
                "data.init_args.test to test on data of its own",
                self.sources.get("val", "val"),
                len(self.datasets.get("val", ())),
            )
        return self._loader("val", shuffle=False)


class PreferenceDataModule(AlignmentDataModule):
    """Paired preference data ``{prompt, chosen, rejected}`` for every paired objective (DPO
    family, ORPO, SimPO, CPO, ...) and the reward model. Settings: :class:`AlignmentDataModule`;
    ``batch_size`` counts pairs (the policy sees 2x rows)."""

    record_fields: ClassVar[tuple[str, ...]] = PAIR_FIELDS
    """The record fields this data module reads: the keys ``columns`` may map."""
    layout: ClassVar[Layout] = PairLayout()
    """Which responses of an example become policy rows, and in which order."""
    example_features: ClassVar[dict[str, str]] = {
        "prompt": "ids",
        "chosen": "ids",
        "rejected": "ids",
        "score_chosen": "float",
        "score_rejected": "float",
        "margin": "float",
    }

    def tokenize_record(self, record: dict[str, Any], source: str, index: int) -> list[dict[str, Any]]:
        """Token-id examples of one raw record (a paired record gives one example)."""
        h = self.hparams
        pair = normalise_record(record, source, index, h.format, h.columns, h.assistant_marker, h.user_marker)
        prompt, responses = self.tokenize_responses(
            pair.prompt, {"chosen": pair.chosen, "rejected": pair.rejected}, source, index
        )
        return [pair_example(pair, prompt, responses, source, index)]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Changes whenever the tokenizer would produce different ids or chat renderings."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [
        type(tokenizer).__name__,
        backend.to_str() if backend is not None else str(sorted(tokenizer.get_vocab().items())),
        str(getattr(tokenizer, "chat_template", None)),
        str(tokenizer.all_special_tokens),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def first_rows(records: datasets.Dataset, count: int) -> datasets.Dataset:
    """The first ``count`` records (all when there are fewer)."""
    return records.select(range(min(count, len(records))))


class RecordStore:
    """The raw records a build reads, each source written once into the build's folder as Arrow
    (record number + the pickled record: see :mod:`lit_align.data.storage`), streamed from the
    source so no list of all records is held."""

    def __init__(self, workspace: Path, options: LoadOptions):
        self.workspace, self.options = workspace, options
        self._read: dict[tuple[str, str], datasets.Dataset] = {}

    def read(self, source: str, split: str) -> datasets.Dataset:
        """The records of ``split`` of ``source`` (a file, folder, hub dataset or builder)."""
        if (source, split) not in self._read:
            path = self.workspace / f"raw-{len(self._read)}.arrow"
            self._read[source, split] = write_records(path, enumerate(iter_records(source, split, self.options)))
        return self._read[source, split]

    def of(self, name: str, records: list[dict[str, Any]]) -> datasets.Dataset:
        """Records given as a list (the built-in task's ``name`` split)."""
        return write_records(self.workspace / f"raw-builtin-{name}.arrow", enumerate(records))


class _TokenizeBatch:
    """``datasets.map``'s function: a batch of raw records -> an Arrow table of their examples,
    and a row naming each skipped record (``invalid_records: skip``) with why. Pickled to the
    ``num_proc`` workers with a copy of the data module (:meth:`AlignmentDataModule._worker_copy`)."""

    def __init__(self, module: AlignmentDataModule, source: str, schema):
        self.module, self.source, self.schema = module, source, schema

    def __call__(self, batch: dict[str, list]):
        module, rows = self.module, []
        for index, record in decode_records(batch):
            try:
                try:
                    tokenized = module.tokenize_record(record, self.source, index)
                except DataError as error:  # named in the file's own field names (``columns``)
                    raise error.in_file_columns(module.hparams.columns) from None
            except DroppableRecord as error:
                if module.hparams.invalid_records == "error":
                    raise
                rows.append({RECORD: index, SKIPPED: str(error)})
                continue
            for example in tokenized:
                example[RECORD] = index  # its number in the source: per-record checks name it
                rows.append(example)
        return encode_examples(rows, self.schema, type(module).__name__)
