"""The bad-input catalogue: one test per problem, in every data regime where it can occur (paired,
unpaired, listwise, prompt-only, SFT). Each bad input stops with an error naming the file, record
and field before training starts, or is a documented skip whose count is logged."""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import re
import zipfile
from pathlib import Path

import pytest
import torch

from lit_align.cli import main
from lit_align.data import (
    DataError,
    DroppableRecord,
    ListwiseDataModule,
    PreferenceDataModule,
    PromptDataModule,
    SFTDataModule,
    UnpairedDataModule,
)
from lit_align.model.loading import ModelLoadError, load_tokenizer
from lit_align.model.tiny import build_tiny_tokenizer
from lit_align.settings import ModelSettings

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
LOGGER = "lit_align.data.datamodule"
IGNORE = -100

MODULES = {
    "paired": PreferenceDataModule,
    "unpaired": UnpairedDataModule,
    "listwise": ListwiseDataModule,
    "prompt": PromptDataModule,
    "sft": SFTDataModule,
}
REGIMES = list(MODULES)
WITH_RESPONSES = ["paired", "unpaired", "listwise", "sft"]
# regime -> (method, data module) class paths, and the config file of that regime
CLASSES = {
    "paired": ("lit_align.methods.DPO", "lit_align.data.PreferenceDataModule"),
    "unpaired": ("lit_align.methods.KTO", "lit_align.data.UnpairedDataModule"),
    "listwise": ("lit_align.methods.RRHF", "lit_align.data.ListwiseDataModule"),
    "prompt": ("lit_align.methods.GRPO", "lit_align.data.PromptDataModule"),
    "sft": ("lit_align.methods.SFT", "lit_align.data.SFTDataModule"),
}
CONFIG_OF = {"paired": "dpo", "unpaired": "kto", "listwise": "rrhf", "prompt": "grpo", "sft": "sft"}


# ---- helpers ---------------------------------------------------------------------------------
def good(regime: str, i: int) -> dict:
    """A valid record of ``regime`` (prompts and responses differ in length with ``i``)."""
    prompt = f"Question {i}: "
    return {
        "paired": {"prompt": prompt, "chosen": f"good answer {i}", "rejected": f"bad {i}"},
        "unpaired": {"prompt": prompt, "completion": f"answer {i}", "label": i % 2 == 0},
        "listwise": {
            "prompt": prompt,
            "responses": [f"best {i}", f"middle {i}", f"worst {i}"],
            "scores": [1.0, 0.5, 0.0],
        },
        "prompt": {"prompt": prompt},
        "sft": {"prompt": prompt, "completion": f"answer {i}"},
    }[regime]


def records(regime: str, n: int = 4) -> list[dict]:
    return [good(regime, i) for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def data_module(regime: str, tokenizer, train: Path, **kwargs) -> PreferenceDataModule:
    """The regime's data module on ``train``, with a clean held-out file beside it (so the train
    file is read in order), no cache, and ``tokenizer``."""
    val = kwargs.pop("val", None) or write_jsonl(train.parent / "heldout.jsonl", [good(regime, 10), good(regime, 1000)])
    dm = MODULES[regime](train=str(train), val=str(val), use_cache=False, **kwargs)
    dm.tokenizer = tokenizer
    return dm


def where(path: Path, record: int, field: str) -> str:
    """The escaped start of a DataError message."""
    return re.escape(f"{path}, record {record}, field '{field}': ")


def assert_skipped_then_strict(regime, tokenizer, train, caplog, message: str, **kwargs) -> None:
    """Record 2 of 4 is skipped with its count and reason logged; with invalid_records=error it raises."""
    dm = data_module(regime, tokenizer, train, **kwargs)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        dm.setup("fit")
    assert dm.skipped == {"train": 1, "val": 0}
    assert len(dm.datasets["train"]) == 3
    assert "skipped 1 of 4 train records that cannot train (invalid_records=skip)" in caplog.text
    assert re.search(message, caplog.text), caplog.text
    strict = data_module(regime, tokenizer, train, invalid_records="error", **kwargs)
    with pytest.raises(DroppableRecord, match=message):
        strict.setup("fit")


# ---- missing field ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "regime, field",
    [
        ("paired", "chosen"),
        ("paired", "rejected"),
        ("unpaired", "prompt"),
        ("unpaired", "completion"),
        ("unpaired", "label"),
        ("listwise", "prompt"),
        ("listwise", "responses"),
        ("listwise", "scores"),
        ("prompt", "prompt"),
        ("sft", "prompt"),
        ("sft", "completion"),
    ],
)
def test_missing_field(regime, field, tokenizer, tmp_path):
    rows = records(regime)
    del rows[2][field]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    left = ", ".join(rows[2]) or "none"
    tail = rf"missing.*\(record has fields: {re.escape(left)}\)"
    with pytest.raises(DataError, match=where(train, 2, field) + tail):
        data_module(regime, tokenizer, train).setup("fit")


def test_paired_record_without_prompt_is_read_as_a_transcript_and_says_so(tokenizer, tmp_path):
    rows = records("paired")
    del rows[2]["prompt"]  # with format auto, no prompt means an implicit-prompt (Anthropic HH) record
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(
        DataError,
        match=where(train, 2, "chosen")
        + re.escape("implicit-prompt pair (a record without 'prompt' is read as whole transcripts)"),
    ):
        data_module("paired", tokenizer, train).setup("fit")


# ---- wrong type ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "regime, field, value, reported, message",
    [
        ("paired", "chosen", 5, "chosen", "expected a string, got int"),
        ("paired", "prompt", {"text": "Q"}, "prompt", "expected a string, got dict"),
        ("unpaired", "completion", 5, "completion", "expected a string, got int"),
        ("unpaired", "prompt", 5, "prompt", "expected a string, got int"),
        ("listwise", "responses", "best", "responses", "expected a list of responses, got str"),
        ("listwise", "responses", ["best", 5, "worst"], "responses[1]", "expected a string, got int"),
        ("prompt", "prompt", 5, "prompt", "expected a string, got int"),
        ("prompt", "prompt", [{"role": "user"}], "prompt[0]", "expected a message {'role': ..., 'content': ...}"),
        ("sft", "completion", ["answer"], "completion[0]", "expected a message {'role': ..., 'content': ...}"),
        ("sft", "completion", 5, "completion", "expected a string, got int"),
    ],
)
def test_wrong_type(regime, field, value, reported, message, tokenizer, tmp_path):
    rows = records(regime)
    rows[2][field] = value
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError, match=where(train, 2, reported) + re.escape(message)) as info:
        data_module(regime, tokenizer, train).setup("fit")
    assert not isinstance(info.value, DroppableRecord)  # malformed: always an error, never skipped


# ---- empty completion ------------------------------------------------------------------------
EMPTY = {
    "paired": ("chosen", "chosen"),
    "unpaired": ("completion", "completion"),
    "listwise": ("responses", "responses[1]"),
    "sft": ("completion", "completion"),
}


@pytest.mark.parametrize("blank", ["", "  \n"], ids=["empty", "whitespace"])
@pytest.mark.parametrize("regime", WITH_RESPONSES)
def test_empty_completion_is_skipped_and_counted_or_raises(regime, blank, tokenizer, tmp_path, caplog):
    rows = records(regime)
    field, reported = EMPTY[regime]
    if regime == "listwise":
        rows[2]["responses"][1] = blank
    else:
        rows[2][field] = blank
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    assert_skipped_then_strict(regime, tokenizer, train, caplog, where(train, 2, reported) + "is empty")


def test_prompt_only_data_accepts_an_empty_prompt(tokenizer, tmp_path):
    """Prompt-only data has no completion; an empty prompt is legal and becomes BOS (as everywhere)."""
    rows = records("prompt")
    rows[2]["prompt"] = ""
    dm = data_module("prompt", tokenizer, write_jsonl(tmp_path / "train.jsonl", rows))
    dm.setup("fit")
    assert dm.datasets["train"][2]["prompt"] == [tokenizer.bos_token_id]


# ---- identical responses ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "regime, change, reported, message, settings",
    [
        ("paired", {"rejected": "good answer 2"}, "rejected", "chosen and rejected responses are identical", {}),
        (
            "paired",
            {"prompt": "Q", "chosen": "x" * 40 + "a", "rejected": "x" * 40 + "b"},
            "rejected",
            "chosen and rejected are identical after tokenization and truncation",
            {"max_length": 32},
        ),
        (
            "listwise",
            {"responses": ["same", "same", "other"]},
            "responses",
            "two responses are identical after tokenization and truncation",
            {},
        ),
        (
            "listwise",
            {"scores": [0.5, 0.5, 0.5]},
            "scores",
            "all responses have the same score: no preference to learn",
            {},
        ),
        ("listwise", {"responses": ["only"], "scores": [1.0]}, "responses", "a list needs at least two responses", {}),
    ],
    ids=["paired", "paired-after-truncation", "listwise-identical", "listwise-tied-scores", "listwise-one-response"],
)
def test_identical_responses_are_skipped_and_counted_or_raise(
    regime, change, reported, message, settings, tokenizer, tmp_path, caplog
):
    rows = records(regime)
    rows[2].update(change)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    assert_skipped_then_strict(
        regime, tokenizer, train, caplog, where(train, 2, reported) + re.escape(message), **settings
    )


# ---- prompt longer than max length -----------------------------------------------------------
LONG_PROMPT = "long " * 40  # 200 tokens
TOO_LONG = {
    "prompt": r"200 prompt tokens do not fit max_prompt_length=48; set truncation to keep_end or drop",
    "other": (
        r"200 prompt \+ \d+ response tokens do not fit max_length=48 \(max_prompt_length=24\); "
        r"set truncation to keep_end or drop"
    ),
}


@pytest.mark.parametrize("regime", REGIMES)
def test_prompt_longer_than_max_length_with_truncation_error(regime, tokenizer, tmp_path):
    rows = records(regime)
    rows[2]["prompt"] = LONG_PROMPT
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(
        DataError, match=where(train, 2, "prompt") + TOO_LONG["prompt" if regime == "prompt" else "other"]
    ) as info:
        data_module(regime, tokenizer, train, max_length=48, truncation="error").setup("fit")
    assert not isinstance(info.value, DroppableRecord)  # an error even under invalid_records=skip


@pytest.mark.parametrize("regime", REGIMES)
def test_prompt_longer_than_max_length_with_truncation_drop(regime, tokenizer, tmp_path, caplog):
    rows = records(regime)
    rows[2]["prompt"] = LONG_PROMPT
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    message = (
        "prompt longer than max_prompt_length=48 tokens" if regime == "prompt" else "longer than max_length=48 tokens"
    )
    assert_skipped_then_strict(
        regime,
        tokenizer,
        train,
        caplog,
        where(train, 2, "prompt") + re.escape(message),
        max_length=48,
        truncation="drop",
    )


@pytest.mark.parametrize("regime", REGIMES)
def test_prompt_longer_than_max_length_keeps_its_end_by_default(regime, tokenizer, tmp_path):
    rows = records(regime)
    rows[2]["prompt"] = LONG_PROMPT
    dm = data_module(regime, tokenizer, write_jsonl(tmp_path / "train.jsonl", rows), max_length=48)
    dm.setup("fit")
    assert dm.skipped["train"] == 0
    assert len(dm.datasets["train"][2]["prompt"]) == dm.max_prompt_length == (48 if regime == "prompt" else 24)


# ---- non-UTF-8 bytes -------------------------------------------------------------------------
def write_bytes(path: Path, content: bytes) -> Path:
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as handle:
            handle.write(content)
    else:
        path.write_bytes(content)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".json"])
@pytest.mark.parametrize("regime", REGIMES)
def test_non_utf8_bytes_name_the_file_line_and_byte(regime, suffix, tokenizer, tmp_path):
    lines = [json.dumps(row).encode() for row in records(regime)]
    lines[2] = lines[2].replace(b"Question", b"Caf\xe9 question")  # Latin-1, not UTF-8
    content = b"\n".join(lines) + b"\n" if suffix != ".json" else b"[\n" + b",\n".join(lines) + b"\n]\n"
    train = write_bytes(tmp_path / f"train{suffix}", content)
    line = content[: content.index(b"\xe9")].count(b"\n") + 1
    column = lines[2].index(b"\xe9") + 1
    head = f"{train}, record 2: " if suffix != ".json" else f"{train}: "  # a .json file has no record per line
    message = f"{head}line {line} is not UTF-8 text (byte 0xe9 at character {column}); save the file as UTF-8"
    with pytest.raises(DataError, match=re.escape(message)):
        data_module(regime, tokenizer, train).setup("fit")


def test_valid_non_ascii_utf8_is_read(tokenizer, tmp_path):
    rows = records("paired")
    rows[2]["prompt"] = "Café? ünïcödé ✓ "
    dm = data_module("paired", tokenizer, write_jsonl(tmp_path / "train.jsonl", rows))
    dm.setup("fit")
    assert tokenizer.decode(dm.datasets["train"][2]["prompt"]) == "Café? ünïcödé ✓ "


# ---- line not JSON ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["not-json", "json-list", "json-file"])
@pytest.mark.parametrize("regime", REGIMES)
def test_line_not_json(regime, kind, tokenizer, tmp_path):
    lines = [json.dumps(row) for row in records(regime)]
    if kind == "json-file":
        train = tmp_path / "train.json"
        train.write_text("[\n" + ",\n".join(lines[:2]) + ",\n{oops\n]\n", encoding="utf-8")
        message = re.escape(f"{train}: not valid JSON (line 4: Expecting property name enclosed in double quotes)")
    else:
        lines[2] = "{this is not json" if kind == "not-json" else "[1, 2]"
        train = tmp_path / "train.jsonl"
        train.write_text("\n".join(lines) + "\n", encoding="utf-8")
        problem = (
            "is not valid JSON (Expecting property name enclosed in double quotes)"
            if kind == "not-json"
            else "is a JSON list, expected an object"
        )
        message = re.escape(f"{train}, record 2: line 3 {problem}")
    with pytest.raises(DataError, match=message):
        data_module(regime, tokenizer, train).setup("fit")


# ---- empty file ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["zero-bytes", "blank-lines", "empty-json-list", "empty-val-file"])
@pytest.mark.parametrize("regime", REGIMES)
def test_empty_file(regime, kind, tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", records(regime))
    val = None
    if kind == "empty-val-file":
        empty = val = tmp_path / "val.jsonl"
        val.write_bytes(b"")
    else:
        empty = train = tmp_path / ("train.json" if kind == "empty-json-list" else "train.jsonl")
        train.write_text({"zero-bytes": "", "blank-lines": "\n  \n\n", "empty-json-list": "[]"}[kind], encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{empty}: no records (the file is empty)")):
        data_module(regime, tokenizer, train, val=val).setup("fit")


# ---- labels not boolean (unpaired) -----------------------------------------------------------
@pytest.mark.parametrize("label", [1, 0, "true", "yes", None, 0.5])
def test_unpaired_label_not_boolean(label, tokenizer, tmp_path):
    rows = records("unpaired")
    rows[2]["label"] = label
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    message = f"expected a boolean (true = desirable, false = undesirable), got {label!r}"
    with pytest.raises(DataError, match=where(train, 2, "label") + re.escape(message)):
        data_module("unpaired", tokenizer, train).setup("fit")


# ---- scores not numeric (listwise; paired scores and margin) ---------------------------------
@pytest.mark.parametrize(
    "regime, change, reported, message",
    [
        ("listwise", {"scores": ["high", "mid", "low"]}, "scores[0]", "expected a finite number, got 'high'"),
        ("listwise", {"scores": [1.0, None, 0.0]}, "scores[1]", "expected a finite number, got null"),
        ("listwise", {"scores": [1.0, float("nan"), 0.0]}, "scores[1]", "expected a finite number, got nan"),
        ("listwise", {"scores": [True, False, False]}, "scores[0]", "expected a finite number, got True"),
        (
            "listwise",
            {"scores": "1, 0.5, 0"},
            "scores",
            "expected a list of 3 numbers (one per response), got '1, 0.5, 0'",
        ),
        (
            "listwise",
            {"scores": [1.0, 0.0]},
            "scores",
            "expected a list of 3 numbers (one per response), got [1.0, 0.0]",
        ),
        ("listwise", {"ranks": ["first", "second", "third"]}, "ranks[0]", "expected a finite number, got 'first'"),
        ("paired", {"score_chosen": "high"}, "score_chosen", "expected a finite number, got 'high'"),
        (
            "paired",
            {"score_chosen": 0.9, "score_rejected": True},
            "score_rejected",
            "expected a finite number, got True",
        ),
        ("paired", {"score_chosen": float("inf")}, "score_chosen", "expected a finite number, got inf"),
        ("paired", {"margin": "big"}, "margin", "expected a finite number, got 'big'"),
        (
            "paired",
            {"score_chosen": 1e300},
            "score_chosen",
            "1e+300 is too large: scores must fit float32 (|x| <= 3.4e38); rescale them",
        ),
        ("listwise", {"scores": [1.0, -1e39, 0.0]}, "scores[1]", "-1e+39 is too large: scores must fit float32"),
    ],
    ids=[
        "words",
        "null",
        "nan",
        "booleans",
        "string",
        "wrong-length",
        "ranks",
        "score-chosen",
        "score-rejected",
        "infinite",
        "margin",
        "beyond-float32",
        "listwise-beyond-float32",
    ],
)
def test_scores_not_numeric(regime, change, reported, message, tokenizer, tmp_path):
    rows = records(regime)
    rows[2].update(change)
    if "ranks" in change:
        del rows[2]["scores"]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError, match=where(train, 2, reported) + re.escape(message)):
        data_module(regime, tokenizer, train).setup("fit")


# ---- unknown chat-template role --------------------------------------------------------------
@pytest.mark.parametrize("role", ["robot", "tool"])
@pytest.mark.parametrize("regime", [*REGIMES, "sft-messages"])
def test_unknown_chat_role(regime, role, tokenizer, tmp_path):
    turn = {"role": role, "content": "42"}
    if regime == "sft-messages":
        regime, rows = "sft", records("sft")
        rows[2] = {"messages": [turn, {"role": "assistant", "content": "answer"}]}
        field = "messages"
    else:
        rows = records(regime)
        rows[2]["prompt"] = [turn]
        field = "prompt"
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    if role == "robot":  # not a chat role at all: rejected when the record is read
        message = where(train, 2, f"{field}[0]") + re.escape(
            "unknown chat role 'robot' (known: system, developer, user, assistant, tool, ipython)"
        )
    else:  # a known role this tokenizer's chat template refuses: rejected when rendered, in the field that holds it
        message = where(train, 2, field) + re.escape(
            "the chat template cannot render this conversation: unknown chat role: tool"
        )
    with pytest.raises(DataError, match=message):
        data_module(regime, tokenizer, train).setup("fit")


# ---- tokenizer without a pad token -----------------------------------------------------------
@pytest.mark.parametrize("regime", REGIMES)
def test_tokenizer_without_pad_token_pads_with_eos(regime, tmp_path):
    """The documented fallback: batches are padded with EOS, and padding stays masked out."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.pad_token = None
    eos = tokenizer.eos_token_id
    dm = data_module(regime, tokenizer, write_jsonl(tmp_path / "train.jsonl", records(regime)))
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))  # held-out records of different lengths: padding needed
    if regime == "prompt":
        pad = batch["prompt_mask"] == 0
        assert pad.any() and (batch["prompt_ids"][pad] == eos).all()
    else:
        pad = batch["attention_mask"] == 0
        assert pad.any() and (batch["input_ids"][pad] == eos).all()
        assert (batch["labels"][pad] == IGNORE).all()


@pytest.mark.parametrize("regime", REGIMES)
def test_tokenizer_without_pad_or_eos_token_is_an_error_before_training(regime, tmp_path):
    tokenizer = build_tiny_tokenizer()
    tokenizer.pad_token = None
    tokenizer.eos_token = None
    dm = data_module(regime, tokenizer, write_jsonl(tmp_path / "train.jsonl", records(regime)))
    message = (
        f"{type(dm).__name__}: the tokenizer has neither a pad nor an eos token, so batches cannot be padded; "
        "set tokenizer.pad_token"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        dm.setup("fit")


def test_loaded_tokenizer_without_pad_token_uses_eos_or_is_named(tmp_path, caplog):
    tokenizer = build_tiny_tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path / "no-pad")
    with caplog.at_level(logging.INFO, logger="lit_align.model.loading"):
        loaded = load_tokenizer(ModelSettings(tokenizer=str(tmp_path / "no-pad")))
    assert loaded.pad_token_id == loaded.eos_token_id == tokenizer.eos_token_id
    assert "tokenizer has no pad token; using eos '<|eos|>' for padding (padding is masked out)" in caplog.text

    tokenizer.eos_token = None
    tokenizer.save_pretrained(tmp_path / "no-pad-no-eos")
    folder = str(tmp_path / "no-pad-no-eos")
    with pytest.raises(
        ModelLoadError, match=re.escape(f"tokenizer {folder!r} has neither a pad nor an eos token; set one")
    ):
        load_tokenizer(ModelSettings(tokenizer=folder))


# ---- model path missing ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "path, message",
    [
        ("./no/such/model", "model.name_or_path: local model folder './no/such/model' does not exist"),
        ("/no/such/model.gguf", "model.name_or_path: GGUF file '/no/such/model.gguf' does not exist"),
    ],
    ids=["folder", "gguf"],
)
@pytest.mark.parametrize("regime", REGIMES)
def test_missing_model_path_is_named_by_the_cli(regime, path, message, in_tmp):
    with pytest.raises(
        SystemExit, match="^" + re.escape(f"lit-align fit: {message}\n")
    ):  # the loader's own error, first and alone
        main(
            [
                "fit",
                "--config",
                str(CONFIGS / f"{CONFIG_OF[regime]}.yaml"),
                "--model.init_args.model.name_or_path",
                path,
            ]
        )
    assert not Path("runs").exists()


def test_missing_relative_model_folder_is_named_when_the_hub_lookup_fails(monkeypatch, in_tmp):
    """``outputs/sft`` (the on-policy configs' starting policy) without ``./`` is also a possible hub
    id; when neither exists, the error says there is no such local folder."""
    from lit_align.model import loading

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(loading.AutoTokenizer, "from_pretrained", offline)
    message = (
        "cannot load tokenizer from 'outputs/sft': no local folder 'outputs/sft' exists, "
        "and as a hub id: We couldn't connect"
    )
    with pytest.raises(ModelLoadError, match=re.escape(message)):
        load_tokenizer(ModelSettings(name_or_path="outputs/sft"))


def test_a_missing_folder_a_config_writes_is_refused_at_once_with_the_command_that_writes_it(monkeypatch, in_tmp):
    """Where ``configs/sft.yaml`` exports to ``outputs/sft``, a missing ``outputs/sft`` is that
    stage's output, not a hub id: no hub lookup (retried for a minute offline), the command named."""
    from lit_align.model import loading

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(loading.AutoTokenizer, "from_pretrained", no_hub)
    (in_tmp / "configs" / "nested").mkdir(parents=True)
    (in_tmp / "configs" / "sft_arithmetic.yaml").write_text("callbacks: [{init_args: {output_dir: outputs/sft_x}}]\n")
    (in_tmp / "configs" / "nested" / "sft.yaml").write_text("init_args:\n  output_dir: 'outputs/sft'\n")
    with pytest.raises(
        ModelLoadError, match="'outputs/sft' does not exist yet: configs/nested/sft.yaml writes it"
    ) as error:
        load_tokenizer(ModelSettings(name_or_path="outputs/sft"))
    assert error.value.hint == "run `lit-align fit --config configs/nested/sft.yaml` first"
    with pytest.raises(ModelLoadError, match="as a hub id: the hub was asked"):  # a name no config writes
        load_tokenizer(ModelSettings(name_or_path="outputs/sft_"))


# ---- unknown config key / wrong type in YAML -------------------------------------------------
def tiny_yaml(tmp_path: Path, regime: str, section: str, key: str, value: str) -> Path:
    """A minimal config of ``regime`` with ``key: value`` added to the trainer, model or data section."""
    method, data = CLASSES[regime]
    args = {
        "trainer": {},
        "model": {"reward": "{class_path: lit_align.online.rewards.WordRulesReward}"} if regime == "prompt" else {},
        "data": {},
    }
    args[section][key] = value
    lines = [f"trainer: {{{', '.join(f'{k}: {v}' for k, v in args['trainer'].items())}}}"]
    for name, class_path in (("model", method), ("data", data)):
        lines += [f"{name}:", f"  class_path: {class_path}", "  init_args:" + ("" if args[name] else " {}")]
        lines += [f"    {k}: {v}" for k, v in args[name].items()]
    path = tmp_path / "bad.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize(
    "section, key, value, expected",
    [
        ("data", "max_lenght", "64", ["Problem with given class_path '{data}'", "Option 'max_lenght' is not accepted"]),
        (
            "data",
            "max_length",
            "lots",
            [
                "Problem with given class_path '{data}'",
                'Parser key "max_length"',
                "Expected a <class 'int'>. Got value: lots",
            ],
        ),
        ("model", "lr", "0.1", ["Problem with given class_path '{method}'", "Option 'lr' is not accepted"]),
        (
            "model",
            "optimizer",
            "{lr: fast}",
            ["Problem with given class_path '{method}'", 'Parser key "optimizer.lr"', "Got value: fast"],
        ),
    ],
    ids=["data-unknown-key", "data-wrong-type", "model-unknown-key", "model-wrong-type"],
)
def test_bad_yaml_is_named_by_the_parser(regime, section, key, value, expected, in_tmp, capsys):
    config = tiny_yaml(in_tmp, regime, section, key, value)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config)])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    method, data = CLASSES[regime]
    for words in expected:
        assert words.format(method=method, data=data) in err, err
    assert not Path("runs").exists()


def test_unknown_trainer_key_in_yaml_is_named(in_tmp, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(tiny_yaml(in_tmp, "paired", "trainer", "max_stepz", "3"))])
    assert "Subcommand 'fit' does not accept option 'trainer.max_stepz'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag, value, expected",
    [
        ("--model", "dpo", "model dpo: no method of lit_align.methods or class of your own is called that"),
        ("--model", "lit_align.methods.GRPOO", "model lit_align.methods.GRPOO: no method of lit_align.methods"),
        ("--data", "PreferenceDataModul", "data PreferenceDataModul: no data module of lit_align.data"),
    ],
)
def test_a_misspelt_class_is_one_line_with_the_closest_names_and_no_usage(flag, value, expected, in_tmp, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "dpo.yaml"), flag, value])
    assert exit_info.value.code == 2
    first, hint = capsys.readouterr().err.strip().split("\n")  # no usage of every option before it
    assert first.startswith(f"lit-align fit: error: {expected}"), first
    closest = {"dpo": "DPO", "lit_align.methods.GRPOO": "GRPO", "PreferenceDataModul": "PreferenceDataModule"}[value]
    assert hint.startswith(f"hint: did you mean {closest} or "), hint
    assert "PairedPreferenceModule" not in hint  # regime bases are subclassed, not run
    assert not Path("runs").exists()


def test_a_class_of_ones_own_that_cannot_be_imported_names_what_it_lacks(in_tmp, capsys):
    Path("mine.py").write_text(
        "import not_a_package_xyz\nfrom lit_align.methods import DPO\n\n\nclass My(DPO):\n    pass\n"
    )
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / "dpo.yaml"), "--model", "mine.My"])
    err = capsys.readouterr().err
    assert err.startswith(
        "lit-align fit: error: model mine.My cannot be imported: No module named 'not_a_package_xyz'\n"
    )
    assert len(err.strip().split("\n")) == 2, err


def test_a_configured_class_needing_a_missing_package_says_which_without_a_traceback(in_tmp, capsys):
    """A logger or callback whose package is not installed (WandbLogger without wandb): one line naming
    the class and the package, the install command as the hint, before anything is loaded."""
    Path("needs.py").write_text(
        "from lightning.pytorch.callbacks import Callback\n\n\nclass NeedsPackage(Callback):\n"
        "    def __init__(self):\n        import not_a_package_xyz  # noqa: F401\n"
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "dpo.yaml"), "--trainer.callbacks+=needs.NeedsPackage"])
    assert str(exit_info.value) == (
        "lit-align fit: needs.NeedsPackage needs a package that is not installed: No module named 'not_a_package_xyz'\n"
        "hint: pip install not_a_package_xyz; LIT_ALIGN_DEBUG=1 shows the traceback"
    )
    if importlib.util.find_spec("wandb") is None:  # Lightning's own requirement message and install command
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", str(CONFIGS / "dpo.yaml"), "--trainer.logger", "WandbLogger"])
        message, hint = str(exit_info.value).split("\n")
        assert re.fullmatch(
            r"lit-align fit: lightning.pytorch.loggers.WandbLogger needs a package that is not installed: "
            r"Requirement 'wandb>=[\d.]+' not met",
            message,
        ), message
        assert re.match(r"hint: pip install -U 'wandb>=[\d.]+'; ", hint), hint
    assert not Path("runs").exists()


# ---- corrupt checkpoint ----------------------------------------------------------------------
def bad_checkpoint(folder: Path, kind: str) -> Path:
    path = folder / f"{kind}.ckpt"
    if kind == "garbage":
        path.write_bytes(b"\x00 not a checkpoint \xff" * 20)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":  # a checkpoint cut short, as by a full disk or a killed copy
        torch.save({"state_dict": {"weight": torch.zeros(4096)}}, path)
        path.write_bytes(path.read_bytes()[:8000])
    elif kind == "other-zip":  # a zip archive, but not one torch.save wrote
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("notes.txt", "hello")
    elif kind == "not-lightning":
        torch.save({"weight": torch.zeros(4)}, path)
    return path


NOT_ZIP = "cannot be read (not a zip archive as torch.save writes: empty, truncated or another kind of file)"


@pytest.mark.parametrize(
    "kind, problem",
    [
        ("garbage", NOT_ZIP),
        ("empty", NOT_ZIP),
        ("truncated", NOT_ZIP),
        ("other-zip", "cannot be read (RuntimeError: "),  # then torch's own words, which vary by version
        ("not-lightning", "is not a Lightning checkpoint (it has no state_dict)"),
        ("missing", "does not exist"),
    ],
    ids=["garbage", "empty", "truncated", "other-zip", "not-lightning", "missing"],
)
@pytest.mark.parametrize("command", ["fit", "validate", "test", "export"])
def test_corrupt_checkpoint_is_named(command, kind, problem, in_tmp):
    path = bad_checkpoint(in_tmp, kind)
    if command == "export":
        argv = ["export", "--ckpt_path", str(path), "--output_dir", str(in_tmp / "out")]
    else:
        argv = [command, "--config", str(CONFIGS / "dpo.yaml"), "--ckpt_path", str(path)]
    named = re.escape(
        f"lit-align {command}: " + ("checkpoint " if kind != "not-lightning" else "") + f"{str(path)!r} {problem}"
    )
    with pytest.raises(SystemExit, match=named):
        main(argv)
    assert not Path("runs").exists() and not (in_tmp / "out").exists()


def test_corrupt_sharded_checkpoint_folder_is_named(in_tmp):
    """A folder that is no sharded checkpoint, and one whose shards cannot be read (Lightning's
    converter fails): export names the folder and the reason."""
    folder = in_tmp / "epoch=0-step=3.ckpt"
    folder.mkdir()
    argv = ["export", "--ckpt_path", str(folder), "--output_dir", str(in_tmp / "out")]
    with pytest.raises(SystemExit, match=re.escape(f"{str(folder)!r} is a folder but not a sharded checkpoint")):
        main(argv)
    (folder / ".metadata").write_bytes(b"\x00 not metadata \xff" * 20)
    torch.save({"lit_align_class": "lit_align.methods.dpo:DPO"}, folder / "meta.pt")
    with pytest.raises(SystemExit, match=re.escape(f"sharded checkpoint {str(folder)!r} cannot be read (")):
        main(argv)
    assert not (in_tmp / "out").exists()


# ---- corrupt or wrong containers (class 6) ---------------------------------------------------------
def _gzip_bytes(content: bytes) -> bytes:
    return gzip.compress(content)


def _parquet_bytes(rows: list[dict]) -> bytes:
    import io

    import pyarrow
    import pyarrow.parquet

    buffer = io.BytesIO()
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), buffer)
    return buffer.getvalue()


JSONL = "".join(json.dumps(row) + "\n" for row in [good("paired", i) for i in range(50)]).encode()
CONTAINERS = {
    "truncated-jsonl-gz": (
        "train.jsonl.gz",
        _gzip_bytes(JSONL)[:120],
        "the gzip data is truncated or corrupt (EOFError: ",
    ),
    "truncated-json-gz": (
        "train.json.gz",
        _gzip_bytes(json.dumps([good("paired", i) for i in range(50)]).encode())[:120],
        "the gzip data is truncated or corrupt (EOFError: ",
    ),
    "corrupt-gz-checksum": (
        "train.jsonl.gz",
        _gzip_bytes(JSONL)[:-8] + b"\x00" * 8,
        "the gzip data is truncated or corrupt (BadGzipFile: CRC check failed",
    ),
    "gz-not-gzip": (
        "train.jsonl.gz",
        JSONL,
        "the name ends in .gz but the file is not gzip-compressed (BadGzipFile: Not a gzipped file",
    ),
    "truncated-parquet": (
        "train.parquet",
        _parquet_bytes([good("paired", i) for i in range(50)])[:300],
        "is a truncated or corrupt parquet file (Arrow",
    ),
    "parquet-not-parquet": ("train.parquet", JSONL, "is not a parquet file (ArrowInvalid: "),
}


@pytest.mark.parametrize("kind", CONTAINERS)
@pytest.mark.parametrize("regime", ["paired", "sft"])
def test_corrupt_or_mislabelled_file_is_named_with_what_is_wrong(kind, regime, tokenizer, tmp_path):
    name, content, problem = CONTAINERS[kind]
    train = tmp_path / name
    train.write_bytes(content)
    with pytest.raises(DataError, match="^" + re.escape(f"{train}: {problem}")) as info:
        data_module(regime, tokenizer, train).setup("fit")
    assert not isinstance(info.value, DroppableRecord)


def test_a_damaged_saved_datasets_folder_is_named(tokenizer, tmp_path):
    import datasets

    folder = tmp_path / "saved"
    datasets.Dataset.from_list(records("paired", 8)).save_to_disk(str(folder))
    (arrow,) = folder.glob("*.arrow")
    arrow.write_bytes(arrow.read_bytes()[:100])
    with pytest.raises(
        DataError, match="^" + re.escape(f"{folder}: is a saved `datasets` folder that cannot be read (")
    ):
        data_module("paired", tokenizer, folder).setup("fit")


# ---- a byte-order mark is valid UTF-8 (class 11) ---------------------------------------------------
@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".json", ".json.gz"])
@pytest.mark.parametrize("regime", REGIMES)
def test_utf8_byte_order_mark_is_accepted(regime, suffix, tokenizer, tmp_path):
    rows = records(regime)
    text = "".join(json.dumps(r) + "\n" for r in rows) if suffix.startswith(".jsonl") else json.dumps(rows)
    train = write_bytes(tmp_path / f"train{suffix}", b"\xef\xbb\xbf" + text.encode())  # as Notepad and Excel save UTF-8
    dm = data_module(regime, tokenizer, train)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == len(rows)
    first = dm.datasets["train"][0]
    assert tokenizer.decode(first["prompt"], skip_special_tokens=True).startswith("Question 0")


# ---- the field that is wrong is the one named (class 7) --------------------------------------------
@pytest.mark.parametrize(
    "change, reported, message",
    [
        ({"chosen": ["good answer", "more"]}, "chosen[0]", "expected a message {'role': ..., 'content': ...}"),
        ({"rejected": ["bad"]}, "rejected[0]", "expected a message {'role': ..., 'content': ...}"),
        (
            {"chosen": [{"role": "assistant", "content": 5}]},
            "chosen[0]",
            "message content must be a string or a list of text parts, got int",
        ),
        (
            {"prompt": [{"role": "user", "content": "Q"}], "chosen": [{"role": "robot", "content": "x"}]},
            "chosen[0]",
            "unknown chat role 'robot'",
        ),
        (
            {"prompt": [{"role": "user", "content": "Q"}], "rejected": [{"role": "user", "content": "x"}]},
            "rejected[0]",
            "a response must start with an assistant message, got role 'user'",
        ),
    ],
    ids=["chosen-strings", "rejected-strings", "content-not-text", "response-role", "response-not-assistant"],
)
def test_the_wrong_response_is_named_not_the_prompt(change, reported, message, tokenizer, tmp_path):
    rows = records("paired")
    rows[2].update(change)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError, match="^" + where(train, 2, reported) + re.escape(message)):
        data_module("paired", tokenizer, train).setup("fit")


def test_conversations_without_a_shared_prompt_name_the_responses(tokenizer, tmp_path):
    rows = records("paired")
    rows[2] = {
        "chosen": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "x"}],
        "rejected": [{"role": "user", "content": "B"}, {"role": "assistant", "content": "y"}],
    }
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(
        DataError,
        match="^"
        + where(train, 2, "chosen")
        + re.escape("chosen and rejected conversations share no leading messages"),
    ):
        data_module("paired", tokenizer, train).setup("fit")


@pytest.mark.parametrize(
    "regime, columns, change, reported, message",
    [
        (
            "paired",
            {"chosen": "response_j", "rejected": "response_k"},
            {"response_j": 5},
            "response_j",
            "expected a string, got int",
        ),
        ("paired", {"prompt": "question"}, {"question": {"text": "Q"}}, "question", "expected a string, got dict"),
        (
            "paired",
            {"chosen": "response_j", "rejected": "response_k"},
            {"response_k": "good answer 2"},
            "response_k",
            "chosen and rejected responses are identical",
        ),
        (
            "unpaired",
            {"completion": "answer", "label": "thumbs_up"},
            {"thumbs_up": "yes"},
            "thumbs_up",
            "expected a boolean",
        ),
        (
            "listwise",
            {"responses": "answers", "scores": "ratings"},
            {"answers": ["best", 5, "worst"]},
            "answers[1]",
            "expected a string, got int",
        ),
        (
            "listwise",
            {"responses": "answers", "scores": "ratings"},
            {"ratings": [1.0, "x", 0.0]},
            "ratings[1]",
            "expected a finite number, got 'x'",
        ),
        ("sft", {"completion": "output"}, {"output": 5}, "output", "expected a string, got int"),
        ("prompt", {"prompt": "instruction"}, {"instruction": 5}, "instruction", "expected a string, got int"),
    ],
    ids=[
        "paired-response",
        "paired-prompt",
        "paired-identical",
        "unpaired-label",
        "listwise-response",
        "listwise-score",
        "sft",
        "prompt",
    ],
)
def test_errors_name_the_files_own_column_when_columns_are_mapped(
    regime, columns, change, reported, message, tokenizer, tmp_path
):
    rows = []
    for row in records(regime):
        rows.append({columns.get(key, key): value for key, value in row.items()})
    rows[2].update(change)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    val = write_jsonl(tmp_path / "heldout.jsonl", [{columns.get(k, k): v for k, v in good(regime, 10).items()}])
    dm = MODULES[regime](train=str(train), val=str(val), columns=columns, use_cache=False, invalid_records="error")
    dm.tokenizer = tokenizer
    with pytest.raises(DataError, match="^" + where(train, 2, reported) + re.escape(message)):
        dm.setup("fit")


def test_a_template_that_rejects_a_response_names_that_response(tmp_path):
    """A chat template that refuses some assistant content: the error names the response, not the prompt."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and 'forbidden' in m['content'] %}"
        "{{ raise_exception('assistant turns cannot say forbidden') }}{% endif %}"
        "<|{{ m['role'] }}|>{{ m['content'] }}<|eos|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    rows = [
        {"prompt": [{"role": "user", "content": f"Q{i}"}], "chosen": "fine", "rejected": "also fine"} for i in range(4)
    ]
    rows[2]["rejected"] = "forbidden words"
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(
        DataError,
        match="^"
        + where(train, 2, "rejected")
        + re.escape("the chat template cannot render this conversation: assistant turns cannot say forbidden"),
    ):
        data_module("paired", tokenizer, train, val=write_jsonl(tmp_path / "v.jsonl", rows[:1])).setup("fit")
