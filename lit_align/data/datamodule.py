"""The data modules' shared machinery (:class:`AlignmentDataModule`: raw records -> typed
records -> token ids (cached) -> batches) and the paired preference data module."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Optional

import torch
from lightning import LightningDataModule
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from lit_align.data.collate import REFERENCE_FIELD, Collator, Layout, PackedCollator, PairLayout
from lit_align.data.contract import DataRequest, ServedData
from lit_align.data.errors import DataError, DroppableRecord
from lit_align.data.formats import PAIR_FIELDS, FormatName, normalise_record
from lit_align.data.sampling import GlobalBatchOrder, ResumableLoader
from lit_align.data.sources import read_records, source_fingerprint
from lit_align.data.tasks import WordRulesTask
from lit_align.data.tokenize import TruncationMode, tokenize_pair
from lit_align.errors import SettingError
from lit_align.runtime.atomic import atomic_torch_save, load_or_none
from lit_align.settings import Count, NonNegativeInt, Range, Seed, check_arguments

log = logging.getLogger(__name__)
BUILTIN = "builtin"
# 3: pairs carry their optional `margin` column; 4: every example its source record number;
# 5: chat replies end with the template's end of turn (no extra EOS), messages kept whole
CACHE_VERSION = 5


def default_cache_dir() -> Path:
    return Path(os.environ.get("LIT_ALIGN_CACHE", Path.home() / ".cache" / "lit-align"))


class AlignmentDataModule(LightningDataModule):
    """What every lit-align data module shares: sources, truncation, tokenized cache, batching
    (global batch order, exact resume, packing) and the :class:`lit_align.data.contract.DataRequest`
    / :class:`lit_align.data.contract.ServedData` contract with the method. A subclass per data
    regime says which record fields it reads, its layout and how one record becomes examples.

    Args:
        train: ``"builtin"`` (the built-in word-rules task) or a data source: a .jsonl/.jsonl.gz/
            .json/.parquet file, a folder written by ``datasets.save_to_disk``, or a hub dataset name.
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
            a prompt prefix (Anthropic HH).
        columns: rename fields, mapping our name to the dataset's, e.g. ``{"prompt": "question"}``.
        assistant_marker: the text that ends the prompt in ``implicit`` transcripts.
        chat_template_kwargs: extra variables for the chat template when rendering conversations,
            e.g. ``{"enable_thinking": false}`` (Qwen3) or ``{"tools": [...]}``; prompts for
            generation are rendered with them too.
        task: settings of the built-in task (used when ``train`` is ``"builtin"``).
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
        cache_dir: where tokenized data is cached (default ``$LIT_ALIGN_CACHE`` or ~/.cache/lit-align).
        use_cache: read/write the tokenized cache.
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
        chat_template_kwargs: Optional[dict[str, Any]] = None,
        task: Optional[WordRulesTask] = None,
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
    ):
        super().__init__()
        self.save_hyperparameters()
        check_arguments(self, self.hparams)  # the settings of subclasses too
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
        self.datasets: dict[str, list[dict[str, Any]]] = {}
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

    # ---- records -------------------------------------------------------------------------
    def _raw_splits(self) -> dict[str, tuple[str, list[tuple[int, dict[str, Any]]]]]:
        """Per split: (source name, [(record number in that source, record), ...])."""
        h = self.hparams
        if h.train == BUILTIN:
            splits = {
                name: (f"builtin:{name}", list(enumerate(self.builtin_records(name)))) for name in ("train", "val")
            }
            if h.val:
                splits["val"] = (h.val, list(enumerate(read_records(h.val, h.val_split or h.split))))
        else:
            train_records = list(enumerate(read_records(h.train, h.split)))
            if h.val:
                splits = {
                    "train": (h.train, train_records),
                    "val": (h.val, list(enumerate(read_records(h.val, h.val_split or h.split)))),
                }
            else:
                order = list(range(len(train_records)))
                random.Random(h.seed).shuffle(order)
                held = set(order[: max(1, round(len(order) * h.val_fraction))])
                splits = {
                    "train": (h.train, [r for r in train_records if r[0] not in held]),
                    "val": (h.train, [r for r in train_records if r[0] in held]),
                }
        if h.test:
            splits["test"] = (h.test, list(enumerate(read_records(h.test, h.test_split or h.split))))
        if h.max_records:
            splits = {name: (src, recs[: h.max_records]) for name, (src, recs) in splits.items()}
        return splits

    # ---- what a data regime defines ------------------------------------------------------------
    record_fields: ClassVar[tuple[str, ...]] = ()
    """The record fields this data module reads: the keys ``columns`` may map."""
    layout: ClassVar[Layout]
    """Which responses of an example become policy rows, and in which order."""
    provides_ptx: bool = False
    """Whether training batches carry ``ptx`` demonstrations (PPO-ptx)."""

    def builtin_records(self, split: str) -> list[dict[str, Any]]:
        """Raw records of the built-in task's ``split`` (``train`` or ``val``)."""
        return self.task.split(split)

    def tokenize_record(self, record: dict[str, Any], source: str, index: int) -> list[dict[str, Any]]:
        """Token-id examples of one raw record."""
        raise NotImplementedError

    def count_classes(self) -> dict[str, int]:
        """Desirable and undesirable training examples (data with a ``label`` per example)."""
        raise SettingError(
            None, "data.class_path", f"{type(self).__name__} has no desirable/undesirable labels to count"
        )

    def finish_split(self, name: str, source: str, examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Last touch on a tokenized split before it is cached (e.g. mismatched completions)."""
        return examples

    def _tokenize_split(
        self, source: str, records: list[tuple[int, dict[str, Any]]]
    ) -> tuple[list[dict[str, Any]], list[str]]:
        examples, skipped = [], []
        for index, record in records:
            try:
                try:
                    tokenized = self.tokenize_record(record, source, index)
                except DataError as error:  # named in the file's own field names (``columns``)
                    raise error.in_file_columns(self.hparams.columns) from None
            except DroppableRecord as error:
                if self.hparams.invalid_records == "error":
                    raise
                skipped.append(str(error))
                continue
            for example in tokenized:
                example["record"] = index  # its number in the source: per-record checks name it
            examples.extend(tokenized)
        if not examples:
            raise DataError(source, f"no usable records ({len(skipped)} skipped; first: {skipped[:1]})")
        return examples, skipped

    @property
    def packing(self) -> bool:
        """Whether batches are packed now: the ``packing`` setting until the method's request is
        served, then the served answer (turned off when the model cannot isolate packed sequences)."""
        return self.served.packing if self.served is not None else self.hparams.packing

    # ---- cache ---------------------------------------------------------------------------
    def cache_key(self) -> str:
        """Identity of the tokenized data: sources, settings and tokenizer."""
        h = dict(self.hparams)
        for name in ("batch_size", "eval_batch_size", "packing", "num_workers", "cache_dir", "use_cache"):
            h.pop(name, None)
        train_id = repr(self.task) if h["train"] == BUILTIN else source_fingerprint(h["train"])
        val_id = source_fingerprint(h["val"]) if h["val"] else None
        test_id = source_fingerprint(h["test"]) if h.get("test") else None
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

    def _load_cache(self, path: Path) -> dict[str, Any] | None:
        if not self.hparams.use_cache:
            return None
        payload = load_or_none(path)
        if payload is None and path.is_file():  # a truncated or corrupt cache is rebuilt, not trusted
            log.warning("tokenized cache %s is unreadable; rebuilding it", path)
        return payload

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
            for example, example_values in zip(examples, values[split], strict=True):
                example[REFERENCE_FIELD] = example_values

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
        path = self.cache_root() / "tokenized" / f"{key}.pt"
        cached = self._load_cache(path)
        if cached is None:
            cached = {"splits": {}, "skipped": {}, "sources": {}}
            for name, (source, records) in self._raw_splits().items():
                examples, skipped = self._tokenize_split(source, records)
                cached["splits"][name] = self.finish_split(name, source, examples)
                cached["skipped"][name] = skipped
                cached["sources"][name] = source
            if self.hparams.use_cache:
                try:
                    atomic_torch_save(cached, path)
                except OSError as error:  # read-only or full: the run does not need the cache, only the next one would
                    log.warning(
                        "cannot write the tokenized-data cache in %s (%s); continuing without it. Set "
                        "data.init_args.cache_dir "
                        "or $LIT_ALIGN_CACHE to a writable folder, or data.init_args.use_cache to false",
                        path.parent,
                        error.strerror or error,
                    )
        self.datasets = cached["splits"]
        self.sources = cached["sources"]
        self._built_as = key
        self.skipped = {name: len(reasons) for name, reasons in cached["skipped"].items()}
        for name, reasons in cached["skipped"].items():
            if reasons:
                log.warning(
                    "skipped %d of %d %s records that cannot train (invalid_records=skip); first: %s",
                    len(reasons),
                    len(reasons) + len(self.datasets[name]),
                    name,
                    reasons[0],
                )

    def _loader(self, name: str, shuffle: bool, examples: list[dict[str, Any]] | None = None) -> DataLoader:
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

    def tokenize_record(self, record: dict[str, Any], source: str, index: int) -> list[dict[str, Any]]:
        """Token-id examples of one raw record (a paired record gives one example)."""
        h = self.hparams
        pair = normalise_record(record, source, index, h.format, h.columns, h.assistant_marker)
        return [
            tokenize_pair(
                pair,
                self.tokenizer,
                h.max_length,
                self.max_prompt_length,
                h.truncation,
                source,
                index,
                h.chat_template_kwargs,
            )
        ]


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
