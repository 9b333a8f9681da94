"""Tokenized data as Arrow files: the cache folder, num_proc workers, the example table, and the
hub / builder options (subset, data_dir, data_files, revision) of the data modules."""

from __future__ import annotations

import gc
import json
import logging
import pickle
import random
import re
from pathlib import Path

import datasets
import pytest

import lit_align.data.datamodule as datamodule_module
from lit_align.data import (
    DataError,
    DroppableRecord,
    PreferenceDataModule,
    PromptDataModule,
    UnpairedDataModule,
    WordRulesTask,
)
from lit_align.data.sources import LoadOptions, source_fingerprint
from lit_align.data.storage import ExampleTable
from lit_align.errors import SettingError


def pairs(n: int, tag: str = "") -> list[dict]:
    return [{"prompt": f"Question {tag}{i}: ", "chosen": f"good answer {i}", "rejected": f"bad {i}"} for i in range(n)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def prepared(tokenizer, cls=PreferenceDataModule, **settings):
    dm = cls(**settings)
    dm.tokenizer = tokenizer
    dm.setup("fit")
    return dm


def entries(cache: Path) -> list[str]:
    """Names in the tokenized cache folder (complete caches and anything half-written)."""
    folder = cache / "tokenized"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def as_lists(dm) -> dict[str, list[dict]]:
    return {name: list(examples) for name, examples in dm.datasets.items()}


# ---- errors cross process boundaries -------------------------------------------------------------
@pytest.mark.parametrize("cls", [DataError, DroppableRecord])
def test_data_errors_survive_pickling(cls):
    error = cls("d.jsonl", "too long", 7, "chosen")
    error.hint = "shorten it"
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is cls and str(copy) == "d.jsonl, record 7, field 'chosen': too long" == str(error)
    assert (copy.source, copy.message, copy.record, copy.field, copy.hint) == (
        "d.jsonl",
        "too long",
        7,
        "chosen",
        "shorten it",
    )
    bare = pickle.loads(pickle.dumps(DataError("d.jsonl", "no records")))
    assert str(bare) == "d.jsonl: no records" and bare.record is None


# ---- the cache: Arrow files, read back memory-mapped ----------------------------------------------
def test_second_run_memory_maps_the_cache_without_tokenizing(tokenizer, tmp_path, monkeypatch):
    train = write_jsonl(tmp_path / "train.jsonl", pairs(30))
    first = prepared(tokenizer, train=str(train), cache_dir=str(tmp_path / "c"))
    (key,) = entries(tmp_path / "c")
    folder = tmp_path / "c" / "tokenized" / key
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "train.arrow", "val.arrow"]
    meta = json.loads((folder / "meta.json").read_text())
    assert {name: split["rows"] for name, split in meta["splits"].items()} == {"train": 28, "val": 2}

    def boom(*args, **kwargs):
        raise AssertionError("the second run must not tokenize")

    monkeypatch.setattr(datamodule_module, "tokenize_responses", boom)
    second = prepared(tokenizer, train=str(train), cache_dir=str(tmp_path / "c"))
    assert as_lists(second) == as_lists(first)
    examples = second.datasets["train"]
    assert isinstance(examples, ExampleTable)
    assert [f["filename"] for f in examples.dataset.cache_files] == [str(folder / "train.arrow")]  # memory-mapped
    assert str(examples._arrow.schema.field("prompt").type) == "list<item: int32>"  # token ids as int32


def test_num_proc_workers_give_the_same_examples_and_skip_counts(tokenizer, tmp_path, caplog):
    records = pairs(40)
    records[5]["rejected"] = records[5]["chosen"]  # droppable: identical responses
    records[33]["rejected"] = records[33]["chosen"]
    train = write_jsonl(tmp_path / "train.jsonl", records)
    val = write_jsonl(tmp_path / "val.jsonl", pairs(5, "v"))
    one = prepared(tokenizer, train=str(train), val=str(val), cache_dir=str(tmp_path / "one"))
    with caplog.at_level(logging.WARNING, logger="lit_align.data.datamodule"):
        two = prepared(tokenizer, train=str(train), val=str(val), cache_dir=str(tmp_path / "two"), num_proc=2)
    assert as_lists(two) == as_lists(one)
    assert two.skipped == one.skipped == {"train": 2, "val": 0}
    assert [ex["record"] for ex in two.datasets["train"]] == [i for i in range(40) if i not in (5, 33)]
    assert "skipped 2 of 40 train records" in caplog.text
    assert "record 5, field 'rejected': chosen and rejected responses are identical" in caplog.text
    (key,) = entries(tmp_path / "two")
    files = sorted(p.name for p in (tmp_path / "two" / "tokenized" / key).iterdir())
    assert "meta.json" in files and not any(name.startswith("raw") for name in files)
    # the key does not depend on num_proc: a num_proc=1 run reads the num_proc=2 cache
    assert prepared(tokenizer, train=str(train), val=str(val), cache_dir=str(tmp_path / "two"))._built_as == key


@pytest.mark.parametrize("num_proc", [1, 2])
def test_record_errors_come_back_whole_from_workers(tokenizer, tmp_path, num_proc):
    records = pairs(30)
    records[21]["chosen"] = 5
    train = write_jsonl(tmp_path / "train.jsonl", records)
    val = write_jsonl(tmp_path / "val.jsonl", pairs(3, "v"))
    with pytest.raises(DataError, match=re.escape(f"{train}, record 21, field 'chosen': ")):
        prepared(tokenizer, train=str(train), val=str(val), num_proc=num_proc, cache_dir=str(tmp_path / "c"))
    records[21] = {"prompt": "q", "chosen": "same", "rejected": "same"}
    write_jsonl(train, records)
    with pytest.raises(DroppableRecord, match=re.escape(f"{train}, record 21, field 'rejected': chosen and rejected")):
        prepared(
            tokenizer,
            train=str(train),
            val=str(val),
            num_proc=num_proc,
            invalid_records="error",
            cache_dir=str(tmp_path / "c"),
        )
    assert entries(tmp_path / "c") == []  # nothing half-written stays behind


def test_a_failure_midway_leaves_no_cache_a_later_run_trusts(tokenizer, tmp_path, monkeypatch):
    train = write_jsonl(tmp_path / "train.jsonl", pairs(12))
    val = write_jsonl(tmp_path / "val.jsonl", pairs(4, "v"))
    calls, original, leftover_made = [], datamodule_module.tokenize_responses, []

    def fails_in_val(prompt, *args, **kwargs):
        calls.append(1)
        if len(calls) == 14 and not leftover_made:  # train done (12), two val pairs in
            raise RuntimeError("killed midway")
        return original(prompt, *args, **kwargs)

    monkeypatch.setattr(datamodule_module, "tokenize_responses", fails_in_val)
    with pytest.raises(RuntimeError, match="killed midway"):
        prepared(tokenizer, train=str(train), val=str(val))
    cache = tmp_path / "lit-align-cache"
    assert entries(cache) == []
    # a killed process leaves its .partial- folder: never read, the next run builds its own
    key = PreferenceDataModule(train=str(train), val=str(val))
    key.tokenizer = tokenizer
    leftover = cache / "tokenized" / f"{key.cache_key()}.partial-dead"
    leftover.mkdir(parents=True)
    (leftover / "train.arrow").write_bytes(b"half")
    leftover_made.append(True)
    calls.clear()
    dm = prepared(tokenizer, train=str(train), val=str(val))
    assert len(calls) == 16 and len(dm.datasets["train"]) == 12
    assert entries(cache) == sorted([key.cache_key(), leftover.name])


def test_use_cache_false_keeps_the_arrow_files_in_a_temporary_folder_while_used(tokenizer, tmp_path):
    dm = prepared(tokenizer, task=WordRulesTask(num_train=8, num_val=4), use_cache=False)
    folder = dm.datasets["train"].path.parent
    assert folder.is_dir() and not (tmp_path / "lit-align-cache").exists()
    assert not any(p.name.startswith("raw") for p in folder.iterdir())
    examples = dm.datasets["train"]
    del dm
    gc.collect()
    assert folder.is_dir() and len(list(examples)) == 8  # the table keeps its files
    del examples
    gc.collect()
    assert not folder.exists()


def test_datasets_progress_bars_stay_out_of_logs(tokenizer, tmp_path, capfd):
    train = write_jsonl(tmp_path / "train.jsonl", pairs(20))
    prepared(tokenizer, train=str(train), num_proc=2)
    captured = capfd.readouterr()
    assert "Tokenizing" not in captured.err + captured.out and "Map" not in captured.err
    assert not datasets.are_progress_bars_disabled()  # left as it was


# ---- records of any shape; fields of any kind -------------------------------------------------------
def test_records_of_different_shapes_in_one_file(tokenizer, tmp_path):
    """Raw records travel pickled, so records whose fields differ in type and nesting (plain text,
    chat messages with optional keys, extra columns) share one file."""
    records = [
        {"prompt": "plain? ", "chosen": "yes", "rejected": "no", "id": 1},
        {
            "prompt": [{"role": "user", "content": "chat?", "name": "bob"}],
            "chosen": [{"role": "assistant", "content": "yes", "tool_calls": [{"id": "x", "args": {"a": [1, 2]}}]}],
            "rejected": "no",
            "id": "two",
        },
        {"prompt": "scored? ", "chosen": "yes", "rejected": "no", "score_chosen": 2, "score_rejected": 1.5},
    ]
    train = write_jsonl(tmp_path / "train.jsonl", records)
    dm = prepared(tokenizer, train=str(train), val=str(train))
    plain, chat, scored = dm.datasets["train"]
    assert tokenizer.decode(chat["prompt"]).startswith("<|bos|><|user|>chat?")
    assert "score_chosen" not in plain and (scored["score_chosen"], scored["score_rejected"]) == (2.0, 1.5)


def test_fields_without_a_declared_kind_are_kept_as_they_are(tokenizer, tmp_path):
    records = [{"prompt": "Hi?"}, {"prompt": [{"role": "user", "content": "Hello?"}]}]
    train = write_jsonl(tmp_path / "p.jsonl", records)
    dm = prepared(tokenizer, PromptDataModule, train=str(train), val=str(train), max_length=32)
    assert [ex["text"] for ex in dm.datasets["train"]] == ["Hi?", [{"role": "user", "content": "Hello?"}]]


def test_a_field_of_the_wrong_kind_names_the_field():
    class Broken(PreferenceDataModule):
        def tokenize_record(self, record, source, index):
            return [{"prompt": [1], "chosen": [2], "rejected": [3], "margin": "big"}]

    dm = Broken(task=WordRulesTask(num_train=4, num_val=2), use_cache=False)
    dm.tokenizer = __import__("lit_align.model.tiny", fromlist=["x"]).build_tiny_tokenizer()
    with pytest.raises(TypeError, match=r"Broken.tokenize_record gave field 'margin' .* declared kind 'float'"):
        dm.setup("fit")


# ---- the example table ------------------------------------------------------------------------------
def test_example_table_is_a_read_only_sequence_of_dicts(tokenizer, tmp_path):
    dm = prepared(tokenizer, task=WordRulesTask(num_train=10, num_val=4))
    table = dm.datasets["train"]
    rows = list(table)
    assert len(table) == 10 and table[0] == rows[0] and table[-1] == rows[-1] and table == rows
    with pytest.raises(IndexError):
        table[10]
    view = table[2:8:2]
    assert isinstance(view, ExampleTable) and list(view) == rows[2:8:2] and view[1] == rows[4]
    assert view.select([2, 0]) == [rows[6], rows[2]]
    assert table.column("record") == [row["record"] for row in rows]
    assert view.column("chosen") == [rows[i]["chosen"] for i in (2, 4, 6)]
    table.attach("ref_logps", [[i] for i in range(10)])
    assert table[3]["ref_logps"] == [3] and view[2]["ref_logps"] == [6] and table[2:4][1]["ref_logps"] == [3]
    with pytest.raises(ValueError, match="9 values for 10 examples"):
        table.attach("ref_logps", [[0]] * 9)
    state = pickle.dumps(table)  # the Arrow data stays on disk: pickled by file
    assert len(state) < table.path.stat().st_size and pickle.loads(state) == table


def test_mismatched_completions_follow_the_next_different_prompt(tokenizer, tmp_path):
    """kl_completion of each example: the completion of the next example (cyclically) with a
    different prompt, cut to max_length after its own prompt, as a scan over the list finds it."""
    prompts = ["A", "A", "B", "A", "C", "C", "A", "A"]
    records = [
        {"prompt": f"{p}? ", "completion": f"answer {i}" + " x" * i, "label": i % 2 == 0} for i, p in enumerate(prompts)
    ]
    train = write_jsonl(tmp_path / "u.jsonl", records)
    dm = UnpairedDataModule(train=str(train), val=str(train), max_length=20)
    dm.tokenizer, dm.mismatched_completions = tokenizer, True
    dm.setup("fit")
    examples = list(dm.datasets["train"])
    for position, example in enumerate(examples):
        other = next(
            examples[(position + step) % len(examples)]
            for step in range(1, len(examples))
            if examples[(position + step) % len(examples)]["prompt"] != example["prompt"]
        )
        assert example["kl_completion"] == other["completion"][: 20 - len(example["prompt"])], position


# ---- hub datasets and datasets builders ---------------------------------------------------------------
@pytest.fixture
def recorded_hub(monkeypatch):
    """datasets.load_dataset replaced by a recorder returning three pairs."""
    calls = []

    def load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return datasets.Dataset.from_list(pairs(3, tag=kwargs.get("split", "")))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hub_options_reach_load_dataset(tokenizer, recorded_hub):
    dm = prepared(
        tokenizer,
        train="org/prefs",
        val="org/prefs",
        val_split="test",
        subset="helpful",
        data_dir="base",
        data_files={"train": "a.jsonl", "test": "b.jsonl"},
        revision="v1.2",
    )
    options = {"name": "helpful", "data_dir": "base", "data_files": {"train": "a.jsonl", "test": "b.jsonl"}}
    assert recorded_hub == [
        ("org/prefs", {"split": "train", **options, "revision": "v1.2"}),
        ("org/prefs", {"split": "test", **options, "revision": "v1.2"}),
    ]
    assert dm.sources == {"train": "org/prefs", "val": "org/prefs"} and len(dm.datasets["val"]) == 3
    plain = prepared(tokenizer, train="org/prefs")
    assert recorded_hub[-1] == ("org/prefs", {"split": "train"})
    assert plain.cache_key() != dm.cache_key()


def test_the_revision_and_subset_are_part_of_the_cache_key(tokenizer, recorded_hub):
    keys = set()
    for options in ({}, {"revision": "v1"}, {"revision": "v2"}, {"subset": "x"}, {"data_dir": "d"}):
        dm = PreferenceDataModule(train="org/prefs", **options)
        dm.tokenizer = tokenizer
        keys.add(dm.cache_key())
    assert len(keys) == 5
    assert source_fingerprint("org/prefs", LoadOptions(revision="v1")) != source_fingerprint("org/prefs")


def test_hub_errors_name_the_source_on_one_line(tokenizer, monkeypatch):
    def load_dataset(path, **kwargs):
        raise ValueError("Revision 'nope' does not exist\nfor dataset org/prefs")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(DataError) as caught:
        prepared(tokenizer, train="org/prefs", revision="nope")
    assert str(caught.value) == (
        "org/prefs: could not load as a file, folder or hub dataset: "
        "Revision 'nope' does not exist for dataset org/prefs"
    )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"revision": "v1"},
            r"PreferenceDataModule: revision is set \('v1'\) but no source reads it: it applies to hub datasets "
            r"only, and the sources are train='builtin' \(the built-in task\); unset it",
        ),
        (
            {"data_dir": "d"},
            r"data_dir is set \('d'\) but no source reads it: it applies to hub datasets and datasets builders",
        ),
        (
            {"train": "LOCAL", "subset": "main"},
            r"subset is set \('main'\) but no source reads it: .*train='.*t\.jsonl' \(a local file or folder\)",
        ),
        (
            {"train": "json", "data_files": "*.jsonl", "revision": "v1"},
            r"revision is set .* train='json' \(a datasets builder\)",
        ),
        ({"train": "csv"}, r"PreferenceDataModule: data_files must be set: train='csv' is a datasets builder"),
        ({"train": "LOCAL", "test": "json"}, r"data_files must be set: test='json' is a datasets builder"),
    ],
)
def test_load_options_that_do_nothing_are_refused(tmp_path, settings, message):
    local = write_jsonl(tmp_path / "t.jsonl", pairs(2))
    settings = {key: str(local) if value == "LOCAL" else value for key, value in settings.items()}
    with pytest.raises(SettingError, match=message) as caught:
        PreferenceDataModule(**settings)
    assert "\n" not in str(caught.value)


def test_builder_sources_read_local_files(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")  # keep ~/.cache clean
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "part-0.jsonl", pairs(6))
    write_jsonl(folder / "part-1.jsonl", pairs(6, tag="b"))
    write_jsonl(folder / "held.jsonl", pairs(3, tag="v"))
    files = {"train": str(folder / "part-*.jsonl"), "test": str(folder / "held.jsonl")}
    direct = prepared(tokenizer, train=str(folder / "part-0.jsonl"), val=str(folder / "held.jsonl"))
    built = prepared(tokenizer, train="json", val="json", val_split="test", data_files=files)
    assert len(built.datasets["train"]) == 12 and built.datasets["val"] == direct.datasets["val"]
    assert list(built.datasets["train"])[:6] == list(direct.datasets["train"])  # the files in name order
    assert built.sources["train"] == f"json(data_files={{train: {files['train']}, test: {files['test']}}})"

    csv = tmp_path / "pairs.csv"
    csv.write_text("prompt,chosen,rejected\n" + "".join(f"Question {i}: ,good answer {i},bad {i}\n" for i in range(6)))
    from_csv = prepared(tokenizer, train="csv", val=str(folder / "held.jsonl"), data_files=str(csv))
    assert from_csv.datasets["train"] == direct.datasets["train"]

    # the key follows the files a glob matches
    key = built.cache_key()
    write_jsonl(folder / "part-2.jsonl", pairs(1, tag="c"))
    again = PreferenceDataModule(train="json", val="json", val_split="test", data_files=files)
    again.tokenizer = tokenizer
    assert again.cache_key() != key


def test_builder_errors_name_what_the_builder_reads(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    missing = str(tmp_path / "nothing-*.jsonl")
    with pytest.raises(
        DataError, match=rf"^json\(data_files={re.escape(missing)}\): the datasets 'json' builder could not read it: "
    ):
        prepared(tokenizer, train="json", data_files=missing)


def test_max_records_and_val_fraction_on_streamed_records(tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", pairs(50))
    dm = prepared(tokenizer, train=str(train), val_fraction=0.2, max_records=7, seed=3)
    order = list(range(50))
    random.Random(3).shuffle(order)
    held = sorted(order[:10])
    assert [ex["record"] for ex in dm.datasets["val"]] == held[:7]
    assert [ex["record"] for ex in dm.datasets["train"]] == [i for i in range(50) if i not in held][:7]
