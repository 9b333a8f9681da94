"""Tests of the preference data pipeline: formats, sources, tokenization, collation, caching,
splitting, the built-in task and real Anthropic HH data."""

from __future__ import annotations

import gzip
import json
import logging
import re
from pathlib import Path

import pytest
import torch

import lit_align.data.datamodule as datamodule_module
from lit_align.data import DataError, DroppableRecord, PreferenceDataModule, PreferencePair, WordRulesTask
from lit_align.data.collate import PairCollator
from lit_align.data.formats import normalise_record
from lit_align.data.sources import read_records
from lit_align.data.tasks import prompt_and_answer
from lit_align.data.tokenize import tokenize_pair
from lit_align.errors import SettingError
from lit_align.model.tiny import build_tiny_tokenizer

HH_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
EOS = "<|eos|>"
IGNORE = -100


# ---- helpers ---------------------------------------------------------------------------------
def good_records(n: int, tag: str = "") -> list[dict[str, str]]:
    return [{"prompt": f"Question {tag}{i}: ", "chosen": f"good answer {i}", "rejected": f"bad {i}"} for i in range(n)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def make_dm(tokenizer, train, **kwargs) -> PreferenceDataModule:
    dm = PreferenceDataModule(train=str(train), **kwargs)
    dm.tokenizer = tokenizer
    return dm


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def decode(tokenizer, token_ids) -> str:
    return tokenizer.decode(list(token_ids), skip_special_tokens=False)


@pytest.fixture
def val_file(tmp_path):
    """A separate, clean validation file, so the train file is read in order (no held-out split)."""
    return write_jsonl(tmp_path / "val.jsonl", good_records(3, tag="v"))


# ---- 1. formats ------------------------------------------------------------------------------
def test_explicit_record():
    pair = normalise_record({"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5"}, "data.jsonl", 0)
    assert pair == PreferencePair("Q: 2+2?", " 4", " 5")
    assert not pair.is_conversational


def test_conversational_prompt_messages_with_string_responses(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]
    record = {"prompt": messages, "chosen": "Paris", "rejected": "London"}
    pair = normalise_record(record, "data.jsonl", 0)
    assert pair.is_conversational
    assert pair.prompt == tuple(messages)
    assert (pair.chosen, pair.rejected) == ("Paris", "London")

    # an assistant message list as the response means the same thing
    as_messages = dict(
        record,
        chosen=[{"role": "assistant", "content": "Paris"}],
        rejected=[{"role": "assistant", "content": "London"}],
    )
    assert normalise_record(as_messages, "data.jsonl", 0) == pair

    out = tokenize_pair(pair, tokenizer, max_length=256, max_prompt_length=128)
    prompt_text = decode(tokenizer, out["prompt"])
    assert prompt_text == "<|bos|><|system|>Be brief.<|eos|><|user|>Capital of France?<|eos|><|assistant|>"
    assert prompt_text.endswith("<|assistant|>")
    assert decode(tokenizer, out["chosen"]) == "Paris" + EOS
    assert decode(tokenizer, out["rejected"]) == "London" + EOS
    for name in ("chosen", "rejected"):
        assert out[name].count(tokenizer.eos_token_id) == 1
        assert out[name][-1] == tokenizer.eos_token_id


def test_conversational_whole_conversations_share_the_prompt(tokenizer):
    shared = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Name a colour."},
    ]
    record = {
        "chosen": shared + [{"role": "assistant", "content": "Blue."}],
        "rejected": shared + [{"role": "assistant", "content": "I will not."}],
    }
    pair = normalise_record(record, "data.jsonl", 0)
    assert pair.prompt == tuple(shared)
    assert (pair.chosen, pair.rejected) == ("Blue.", "I will not.")
    out = tokenize_pair(pair, tokenizer, max_length=256, max_prompt_length=128)
    assert decode(tokenizer, out["prompt"]).endswith("<|user|>Name a colour.<|eos|><|assistant|>")
    assert decode(tokenizer, out["chosen"]) == "Blue." + EOS


def test_implicit_hh_style_split():
    prompt = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Can you help?\n\nAssistant:"
    # the responses share a leading " S": the prompt must still end at the assistant marker
    record = {"chosen": prompt + " Sure, happy to.", "rejected": prompt + " Sorry, no."}
    pair = normalise_record(record, "hh.jsonl", 0)
    assert pair.prompt == prompt
    assert pair.chosen == " Sure, happy to."
    assert pair.rejected == " Sorry, no."
    assert pair.prompt + pair.chosen == record["chosen"] and pair.prompt + pair.rejected == record["rejected"]


def test_implicit_without_marker_in_shared_prefix_is_an_error():
    with pytest.raises(
        DataError, match=r"hh\.jsonl, record 4, field 'chosen': implicit-prompt pair.*no assistant marker"
    ):
        normalise_record({"chosen": "Human: a", "rejected": "Robot: b"}, "hh.jsonl", 4)


def test_column_mapping():
    record = {"question": "Q?", "good": "yes", "bad": "no", "extra": 1}
    columns = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    assert normalise_record(record, "data.jsonl", 0, columns=columns) == PreferencePair("Q?", "yes", "no")
    with pytest.raises(DataError, match=r"data\.jsonl, record 0, field 'chosen': missing"):
        normalise_record(record, "data.jsonl", 0)


def test_column_mapping_through_datamodule(tokenizer, tmp_path):
    records = [{"question": f"Q{i}?", "good": f"yes {i}", "bad": f"no {i}"} for i in range(4)]
    train = write_jsonl(tmp_path / "mapped.jsonl", records)
    dm = make_dm(tokenizer, train, val=str(train), columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    dm.setup("fit")
    assert [decode(tokenizer, ex["prompt"]) for ex in dm.datasets["train"]] == [f"Q{i}?" for i in range(4)]
    assert decode(tokenizer, dm.datasets["train"][2]["chosen"]) == "yes 2" + EOS


# ---- 2. EOS exactly once ---------------------------------------------------------------------
def test_plain_text_response_gets_exactly_one_eos(tokenizer):
    out = tokenize_pair(PreferencePair("Q: ", "yes", "no"), tokenizer, max_length=64, max_prompt_length=32)
    eos = tokenizer.eos_token_id
    assert out["prompt"] == ids(tokenizer, "Q: ")
    assert out["chosen"] == ids(tokenizer, "yes") + [eos]
    assert out["rejected"] == ids(tokenizer, "no") + [eos]
    assert out["chosen"].count(eos) == 1 and out["rejected"].count(eos) == 1


def test_response_already_ending_with_eos_is_not_given_another(tokenizer):
    eos = tokenizer.eos_token_id
    out = tokenize_pair(PreferencePair("Q: ", "yes" + EOS, "no"), tokenizer, max_length=64, max_prompt_length=32)
    assert out["chosen"] == ids(tokenizer, "yes") + [eos]
    assert out["chosen"].count(eos) == 1
    assert out["rejected"].count(eos) == 1


def test_empty_prompt_becomes_bos(tokenizer):
    out = tokenize_pair(PreferencePair("", "yes", "no"), tokenizer, max_length=64, max_prompt_length=32)
    assert out["prompt"] == [tokenizer.bos_token_id]


# ---- 3. collation: prompt masked -------------------------------------------------------------
def test_collator_masks_prompt_and_padding(tokenizer):
    examples = [
        tokenize_pair(PreferencePair("Short? ", "a", "bb"), tokenizer, 64, 32),
        tokenize_pair(PreferencePair("A longer prompt? ", "ccc ccc", "d"), tokenizer, 64, 32),
    ]
    pad = tokenizer.pad_token_id
    batch = PairCollator(pad)(examples)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    rows = [(ex["prompt"], ex["chosen"]) for ex in examples] + [(ex["prompt"], ex["rejected"]) for ex in examples]
    length = max(len(p) + len(r) for p, r in rows)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (4, length)
    for row, (prompt, response) in enumerate(rows):  # chosen rows first, then rejected rows
        n, p = len(prompt) + len(response), len(prompt)
        assert batch["input_ids"][row, :n].tolist() == prompt + response
        assert batch["input_ids"][row, n:].tolist() == [pad] * (length - n)
        assert batch["labels"][row, :p].tolist() == [IGNORE] * p
        assert batch["labels"][row, p:n].tolist() == response
        assert batch["labels"][row, n:].tolist() == [IGNORE] * (length - n)
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (length - n)

    padded = PairCollator(pad, pad_to_multiple_of=8)(examples)
    assert padded["input_ids"].shape[1] % 8 == 0 and padded["input_ids"].shape[1] >= length
    assert torch.equal(padded["labels"][:, :length], batch["labels"])


def test_collator_stacks_extra_fields(tokenizer):
    examples = [
        dict(tokenize_pair(PreferencePair("Q ", "a", "b"), tokenizer, 64, 32), score=float(i)) for i in range(3)
    ]
    batch = PairCollator(tokenizer.pad_token_id)(examples)
    assert batch["score"].tolist() == [0.0, 1.0, 2.0]


def test_datamodule_batches(tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", good_records(6))
    dm = make_dm(tokenizer, train, val=str(train), batch_size=4, eval_batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 8
    assert ((batch["labels"] == IGNORE) | (batch["labels"] == batch["input_ids"])).all()
    assert next(iter(dm.val_dataloader()))["input_ids"].shape[0] == 4


# ---- 4. truncation ---------------------------------------------------------------------------
LONG_PROMPT = "abcdefghijklmnopqrstuvwxyz"


def test_keep_end_keeps_the_end_of_the_prompt_and_cuts_responses(tokenizer):
    pair = PreferencePair(LONG_PROMPT, "0123456789", "no")
    out = tokenize_pair(pair, tokenizer, max_length=16, max_prompt_length=8, truncation="keep_end")
    assert out["prompt"] == ids(tokenizer, LONG_PROMPT)[-8:]
    assert decode(tokenizer, out["prompt"]) == "stuvwxyz"
    assert decode(tokenizer, out["chosen"]) == "01234567"  # cut on the right to fit
    assert decode(tokenizer, out["rejected"]) == "no" + EOS  # already fits: untouched
    assert len(out["prompt"]) + len(out["chosen"]) == 16


def test_keep_end_cuts_responses_when_only_they_are_too_long(tokenizer):
    out = tokenize_pair(PreferencePair("Q: ", "x" * 30, "y" * 5), tokenizer, max_length=12, max_prompt_length=6)
    assert decode(tokenizer, out["prompt"]) == "Q: "
    assert decode(tokenizer, out["chosen"]) == "x" * 9
    assert decode(tokenizer, out["rejected"]) == "y" * 5 + EOS


def test_keep_end_never_exceeds_max_length_even_with_large_max_prompt_length(tokenizer):
    pair = PreferencePair("p" * 15, "c" * 9, "r" * 9)
    try:
        out = tokenize_pair(pair, tokenizer, max_length=10, max_prompt_length=20, truncation="keep_end")
    except ValueError:
        return  # rejecting the inconsistent setting would be fine too
    assert len(out["prompt"]) + max(len(out["chosen"]), len(out["rejected"])) <= 10


def test_drop_raises_droppable_record(tokenizer):
    with pytest.raises(DroppableRecord, match=r"data\.jsonl, record 2, .*longer than max_length=16"):
        tokenize_pair(PreferencePair(LONG_PROMPT, "a", "b"), tokenizer, 16, 8, "drop", "data.jsonl", 2)


def test_drop_is_skipped_and_counted_by_datamodule(tokenizer, tmp_path, val_file, caplog):
    records = good_records(5)
    records[3]["prompt"] = "long " * 40
    train = write_jsonl(tmp_path / "train.jsonl", records)
    dm = make_dm(tokenizer, train, val=str(val_file), max_length=48, truncation="drop")
    with caplog.at_level(logging.WARNING, logger="lit_align.data.datamodule"):
        dm.setup("fit")
    assert dm.skipped == {"train": 1, "val": 0}
    assert len(dm.datasets["train"]) == 4
    assert [decode(tokenizer, ex["prompt"]) for ex in dm.datasets["train"]] == [
        records[i]["prompt"] for i in (0, 1, 2, 4)
    ]
    assert "skipped 1 of 5 train records" in caplog.text


def test_error_mode_raises_data_error_naming_record(tokenizer):
    with pytest.raises(DataError, match=r"data\.jsonl, record 3, field 'prompt'.*max_length=16") as info:
        tokenize_pair(PreferencePair(LONG_PROMPT, "a", "b"), tokenizer, 16, 8, "error", "data.jsonl", 3)
    assert not isinstance(info.value, DroppableRecord)
    with pytest.raises(DataError, match=r"record 1, field 'chosen'.*max_length=16"):
        tokenize_pair(PreferencePair("Q", "x" * 40, "y"), tokenizer, 16, 8, "error", "data.jsonl", 1)


# ---- 5. bad input ----------------------------------------------------------------------------
def test_missing_field(tokenizer, tmp_path, val_file):
    records = good_records(4)
    del records[2]["chosen"]
    train = write_jsonl(tmp_path / "train.jsonl", records)
    dm = make_dm(tokenizer, train, val=str(val_file))
    with pytest.raises(DataError, match=re.escape(f"{train}, record 2, field 'chosen': missing")):
        dm.setup("fit")


def test_error_names_the_file_record_number_with_val_fraction_split(tokenizer, tmp_path):
    records = good_records(10)
    del records[7]["chosen"]
    train = write_jsonl(tmp_path / "train.jsonl", records)
    for seed in range(4):
        dm = make_dm(tokenizer, train, val_fraction=0.2, seed=seed, use_cache=False)
        with pytest.raises(DataError, match=r"record 7, field 'chosen'"):
            dm.setup("fit")


def test_wrong_type(tokenizer, tmp_path, val_file):
    records = good_records(3)
    records[1]["chosen"] = 5
    train = write_jsonl(tmp_path / "train.jsonl", records)
    with pytest.raises(DataError, match=re.escape(f"{train}, record 1, field 'chosen': expected a string, got int")):
        make_dm(tokenizer, train, val=str(val_file)).setup("fit")


def test_wrong_type_of_prompt_beside_messages(tokenizer):
    with pytest.raises(DataError, match=r"record 0, field 'prompt': expected a string, got int"):
        normalise_record(
            {"prompt": 5, "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}, "d.jsonl", 0
        )


@pytest.mark.parametrize(
    "bad", [{"chosen": ""}, {"chosen": "   "}, {"rejected": "good answer 1"}], ids=["empty", "blank", "identical"]
)
def test_untrainable_records_are_skipped_or_raise(tokenizer, tmp_path, val_file, bad, caplog):
    records = good_records(4)
    records[1].update(bad)
    train = write_jsonl(tmp_path / "train.jsonl", records)
    dm = make_dm(tokenizer, train, val=str(val_file))  # invalid_records="skip" is the default
    with caplog.at_level(logging.WARNING, logger="lit_align.data.datamodule"):
        dm.setup("fit")
    assert dm.skipped == {"train": 1, "val": 0}
    assert len(dm.datasets["train"]) == 3
    assert "skipped 1 of 4 train records" in caplog.text

    field = "chosen" if "chosen" in bad else "rejected"
    message = "is empty" if "chosen" in bad else "chosen and rejected responses are identical"
    strict = make_dm(tokenizer, train, val=str(val_file), invalid_records="error")
    with pytest.raises(DroppableRecord, match=re.escape(f"{train}, record 1, field '{field}': {message}")):
        strict.setup("fit")


def test_all_records_untrainable_is_an_error(tokenizer, tmp_path, val_file):
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "q", "chosen": "", "rejected": "x"}] * 2)
    with pytest.raises(DataError, match=r"no usable records \(2 skipped"):
        make_dm(tokenizer, train, val=str(val_file)).setup("fit")


def test_prompt_longer_than_max_length_with_error_truncation(tokenizer, tmp_path, val_file):
    records = good_records(4)
    records[2]["prompt"] = "very long prompt " * 10
    train = write_jsonl(tmp_path / "train.jsonl", records)
    dm = make_dm(tokenizer, train, val=str(val_file), max_length=64, truncation="error")
    with pytest.raises(DataError, match=re.escape(f"{train}, record 2, field 'prompt'") + r".*max_length=64"):
        dm.setup("fit")


def test_line_that_is_not_json(tokenizer, tmp_path, val_file):
    train = tmp_path / "train.jsonl"
    lines = [json.dumps(r) for r in good_records(2)] + ["{this is not json"] + [json.dumps(good_records(1)[0])]
    train.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(str(train)) + r".*line 3 is not valid JSON"):
        make_dm(tokenizer, train, val=str(val_file)).setup("fit")


def test_line_that_is_json_but_not_an_object(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps(good_records(1)[0]) + "\n[1, 2]\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"line 2 is a JSON list, expected an object"):
        read_records(str(train))


def test_unknown_file_extension(tokenizer, tmp_path):
    train = tmp_path / "train.csv"
    train.write_text("prompt,chosen,rejected\nq,a,b\n", encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(str(train)) + r".*unknown file format"):
        make_dm(tokenizer, train).setup("fit")


def test_unknown_chat_role(tokenizer, tmp_path, val_file):
    records = [
        {"prompt": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b"},
        {"prompt": [{"role": "robot", "content": "hi"}], "chosen": "a", "rejected": "b"},
    ]
    train = write_jsonl(tmp_path / "train.jsonl", records)
    with pytest.raises(DataError, match=re.escape(f"{train}, record 1, field 'prompt[0]': unknown chat role 'robot'")):
        make_dm(tokenizer, train, val=str(val_file)).setup("fit")


def test_role_rejected_by_chat_template(tokenizer):
    # "tool" is a known role, but the tiny template raises for it: the error still says where
    pair = normalise_record(
        {"prompt": [{"role": "tool", "content": "42"}], "chosen": "a", "rejected": "b"}, "d.jsonl", 5
    )
    with pytest.raises(
        DataError, match=r"d\.jsonl, record 5, field 'prompt': the chat template cannot render.*unknown chat role: tool"
    ):
        tokenize_pair(pair, tokenizer, 64, 32, source="d.jsonl", index=5)


def test_missing_file(tokenizer, tmp_path):
    missing = tmp_path / "nope" / "train.jsonl"
    with pytest.raises(DataError, match=re.escape(str(missing)) + r": file not found"):
        make_dm(tokenizer, missing).setup("fit")


def test_empty_file(tokenizer, tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(str(train)) + r".*no records \(the file is empty\)"):
        make_dm(tokenizer, train).setup("fit")


def test_setup_without_tokenizer_waits_and_loaders_name_what_is_missing(tmp_path):
    """Lightning calls setup before the method serves its request (with its tokenizer): nothing
    is read yet; asking for batches without a tokenizer is an error naming both ways to give one."""
    dm = PreferenceDataModule(train=str(write_jsonl(tmp_path / "t.jsonl", good_records(2))))
    dm.setup("fit")
    assert dm.datasets == {}
    with pytest.raises(
        SettingError, match=r"PreferenceDataModule needs a tokenizer before it can serve batches.*serve\(\)"
    ):
        dm.train_dataloader()


# ---- 6. sources ------------------------------------------------------------------------------
def test_all_sources_load_the_same_pairs(tokenizer, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")  # keep ~/.cache clean
    records = good_records(5)

    jsonl = write_jsonl(tmp_path / "d.jsonl", records)
    jsonl_gz = tmp_path / "d.jsonl.gz"
    with gzip.open(jsonl_gz, "wt", encoding="utf-8") as handle:
        handle.write(jsonl.read_text(encoding="utf-8"))
    json_list = tmp_path / "d.json"
    json_list.write_text(json.dumps(records), encoding="utf-8")
    json_data = tmp_path / "d_data.json"
    json_data.write_text(json.dumps({"data": records}), encoding="utf-8")
    parquet = tmp_path / "d.parquet"
    datasets.Dataset.from_list(records).to_parquet(str(parquet))
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(records).save_to_disk(str(saved))
    saved_dict = tmp_path / "saved_dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records)}).save_to_disk(str(saved_dict))

    expected = [PreferencePair(r["prompt"], r["chosen"], r["rejected"]) for r in records]
    for source in (jsonl, jsonl_gz, json_list, json_data, parquet, saved, saved_dict):
        loaded = read_records(str(source))
        assert loaded == records, source
        assert [normalise_record(r, str(source), i) for i, r in enumerate(loaded)] == expected, source

    with pytest.raises(DataError, match=r"has no split 'test'"):
        read_records(str(saved_dict), split="test")

    # and through the data module: the same token ids from every source
    tokenized = []
    for source in (jsonl, parquet, saved):
        dm = make_dm(tokenizer, source, val=str(source))
        dm.setup("fit")
        tokenized.append(dm.datasets["train"])
    assert tokenized[0] == tokenized[1] == tokenized[2]
    assert len(tokenized[0]) == 5


# ---- 7. cache --------------------------------------------------------------------------------
def _counting_tokenize(monkeypatch) -> list[int]:
    calls = []
    original = datamodule_module.tokenize_responses

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(datamodule_module, "tokenize_responses", counting)
    return calls


def _cache_files(tmp_path) -> list[Path]:
    """The tokenized-data cache entries: one folder of Arrow files and meta.json per key."""
    return sorted(path.parent for path in (tmp_path / "lit-align-cache" / "tokenized").glob("*/meta.json"))


def test_cache_is_reused(tokenizer, tmp_path, monkeypatch):
    train = write_jsonl(tmp_path / "train.jsonl", good_records(6))
    first = make_dm(tokenizer, train, val=str(train), max_length=64)
    first.setup("fit")
    assert len(_cache_files(tmp_path)) == 1

    def boom(*args, **kwargs):
        raise AssertionError("tokenizing must not run: the cache should be used")

    monkeypatch.setattr(datamodule_module, "tokenize_responses", boom)
    second = make_dm(tokenizer, train, val=str(train), max_length=64, batch_size=3)  # batch size is not part of the key
    second.setup("fit")
    assert second.datasets == first.datasets
    assert second.skipped == first.skipped


def test_cache_invalidated_by_settings_and_data(tokenizer, tmp_path, monkeypatch):
    train = write_jsonl(tmp_path / "train.jsonl", good_records(6))
    make_dm(tokenizer, train, val=str(train), max_length=64).setup("fit")
    calls = _counting_tokenize(monkeypatch)

    make_dm(tokenizer, train, val=str(train), max_length=64).setup("fit")
    assert calls == []  # same settings: cached

    make_dm(tokenizer, train, val=str(train), max_length=32).setup("fit")
    assert len(calls) == 12  # max_length changed: re-tokenized (6 train + 6 val)

    calls.clear()
    write_jsonl(train, good_records(7))  # the data file changed (content and size)
    dm = make_dm(tokenizer, train, val=str(train), max_length=64)
    dm.setup("fit")
    assert len(calls) == 14
    assert len(dm.datasets["train"]) == 7

    calls.clear()
    changed_tokenizer = build_tiny_tokenizer()
    changed_tokenizer.chat_template = tokenizer.chat_template + "{# changed #}"
    changed = make_dm(changed_tokenizer, train, val=str(train), max_length=64)
    changed.setup("fit")
    assert len(calls) == 14  # a different chat template: re-tokenized


def test_corrupt_cache_is_rebuilt(tokenizer, tmp_path, monkeypatch, caplog):
    train = write_jsonl(tmp_path / "train.jsonl", good_records(4))
    first = make_dm(tokenizer, train, val=str(train))
    first.setup("fit")
    expected = {name: list(examples) for name, examples in first.datasets.items()}  # read before the damage
    (cache,) = _cache_files(tmp_path)
    train_file = next(cache.glob("train*.arrow"))
    size, garbage = train_file.stat().st_size, b"\x00garbage, not an arrow file\xff"
    damaged = tmp_path / "damaged"  # same size, so only reading the file finds it (not meta.json's sizes)
    damaged.write_bytes((garbage * (size // len(garbage) + 1))[:size])
    damaged.replace(train_file)  # a new file: `first` keeps the pages it has memory-mapped

    calls = _counting_tokenize(monkeypatch)
    second = make_dm(tokenizer, train, val=str(train))
    with caplog.at_level(logging.WARNING, logger="lit_align.data.datamodule"):
        second.setup("fit")
    assert len(calls) == 8
    assert second.datasets == expected
    assert "unreadable" in caplog.text
    third = make_dm(tokenizer, train, val=str(train))  # rewritten, readable again
    third.setup("fit")
    assert len(calls) == 8 and third.datasets == expected


def test_use_cache_false_writes_nothing(tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", good_records(4))
    make_dm(tokenizer, train, val=str(train), use_cache=False).setup("fit")
    assert _cache_files(tmp_path) == []


# ---- 8. train/val split ----------------------------------------------------------------------
def _prompts(tokenizer, examples) -> list[str]:
    return [decode(tokenizer, ex["prompt"]) for ex in examples]


def test_val_fraction_split(tokenizer, tmp_path):
    records = good_records(40)
    train = write_jsonl(tmp_path / "train.jsonl", records)

    def split(seed):
        dm = make_dm(tokenizer, train, val_fraction=0.25, seed=seed, use_cache=False)
        dm.setup("fit")
        return _prompts(tokenizer, dm.datasets["train"]), _prompts(tokenizer, dm.datasets["val"])

    train_a, val_a = split(0)
    assert len(val_a) == 10 and len(train_a) == 30
    assert set(train_a).isdisjoint(val_a)
    assert sorted(train_a + val_a) == sorted(r["prompt"] for r in records)
    assert train_a == [r["prompt"] for r in records if r["prompt"] in set(train_a)]  # order kept

    train_b, val_b = split(0)
    assert (train_b, val_b) == (train_a, val_a)  # deterministic by seed
    _, val_c = split(1)
    assert len(val_c) == 10 and set(val_c) != set(val_a)


def test_val_fraction_holds_out_at_least_one(tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", good_records(3))
    dm = make_dm(tokenizer, train, val_fraction=0.01)
    dm.setup("fit")
    assert (len(dm.datasets["train"]), len(dm.datasets["val"])) == (2, 1)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5])
def test_bad_val_fraction(fraction):
    with pytest.raises(ValueError, match="val_fraction"):
        PreferenceDataModule(train="x.jsonl", val_fraction=fraction)


# ---- 9. built-in task ------------------------------------------------------------------------
RULES = ("upper", "lower", "reverse", "first")


HEADS = {
    "upper": "Write in capitals: ",
    "lower": "Write in lowercase: ",
    "reverse": "Reverse: ",
    "first": "First letter of ",
}


def _rule_and_word(prompt: str) -> tuple[str, str]:
    for rule, head in HEADS.items():
        if prompt.startswith(head):
            word = prompt[len(head) :].removesuffix("\n").removesuffix(":")
            assert prompt_and_answer(rule, word)[0] == prompt
            return rule, word.lower()
    raise AssertionError(prompt)


def test_word_rules_task():
    task = WordRulesTask(num_train=300, num_val=100, seed=3, rules=RULES)
    train, val = task.split("train"), task.split("val")
    assert train == WordRulesTask(num_train=300, num_val=100, seed=3, rules=RULES).split("train")
    assert train != WordRulesTask(num_train=300, num_val=100, seed=4, rules=RULES).split("train")
    assert len(train) == 300 and len(val) == 100
    assert {_rule_and_word(r["prompt"])[1] for r in train}.isdisjoint({_rule_and_word(r["prompt"])[1] for r in val})
    seen_rules = set()
    for record in train + val:
        assert WordRulesTask.is_correct(record["prompt"], record["chosen"]), record
        assert not WordRulesTask.is_correct(record["prompt"], record["rejected"]), record
        seen_rules.add(_rule_and_word(record["prompt"])[0])
    assert seen_rules == set(RULES)  # every rule was generated and checked


def test_word_rules_task_validation():
    with pytest.raises(ValueError, match="unknown rule"):
        WordRulesTask(rules=("upper", "shout"))
    with pytest.raises(ValueError, match="not a prompt of the built-in task"):
        WordRulesTask.is_correct("hello", "x")


def test_default_word_rules_val_prompts_are_unseen_in_train():
    task = WordRulesTask()
    train_prompts = {r["prompt"] for r in task.split("train")}
    assert not [r["prompt"] for r in task.split("val") if r["prompt"] in train_prompts]


def test_builtin_datamodule(tokenizer):
    dm = PreferenceDataModule(task=WordRulesTask(num_train=20, num_val=5), max_length=64)
    dm.tokenizer = tokenizer
    dm.setup("fit")
    assert (len(dm.datasets["train"]), len(dm.datasets["val"])) == (20, 5)
    example = dm.datasets["train"][0]
    assert WordRulesTask.is_correct(
        decode(tokenizer, example["prompt"]), decode(tokenizer, example["chosen"]).removesuffix(EOS)
    )


# ---- 10. real Anthropic HH data --------------------------------------------------------------
@pytest.mark.skipif(not HH_TEST.is_file(), reason=f"Anthropic HH test file not found at {HH_TEST}")
def test_hh_real_data(tokenizer, caplog):
    with gzip.open(HH_TEST, "rt", encoding="utf-8") as handle:
        raw = [json.loads(line) for _, line in zip(range(200), handle, strict=False)]
    expected_skipped = 0
    for index, record in enumerate(raw):
        try:
            normalise_record(record, "hh", index)
        except DroppableRecord:
            expected_skipped += 1

    dm = PreferenceDataModule(train=str(HH_TEST), val=str(HH_TEST), max_records=200, max_length=8192)
    dm.tokenizer = tokenizer
    with caplog.at_level(logging.WARNING, logger="lit_align.data.datamodule"):
        dm.setup("fit")
    assert dm.skipped["train"] == expected_skipped
    assert len(dm.datasets["train"]) + dm.skipped["train"] == 200
    if expected_skipped:
        assert f"skipped {expected_skipped} of 200 train records" in caplog.text

    by_chosen = {record["chosen"]: record for record in raw}
    for example in dm.datasets["train"][:20]:
        prompt = decode(tokenizer, example["prompt"])
        chosen = decode(tokenizer, example["chosen"])
        rejected = decode(tokenizer, example["rejected"])
        assert prompt.endswith("\n\nAssistant:")
        assert chosen.endswith(EOS) and chosen.count(EOS) == 1
        record = by_chosen[prompt + chosen.removesuffix(EOS)]  # the raw transcript, split at the last shared marker
        assert chosen.removesuffix(EOS) == record["chosen"][len(prompt) :]
        assert rejected.removesuffix(EOS) == record["rejected"][len(prompt) :]
        assert chosen != rejected
