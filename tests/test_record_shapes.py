"""The record shapes people have, loaded without configuration: UltraFeedback-binarized, rich chat
messages (tool calls, tool results, reasoning, text parts), orca-style system fields and column
mappings, asserting on the decoded text the model trains on."""

import gzip
import json
import re
from pathlib import Path

import pytest

from lit_align.data import PreferenceDataModule
from lit_align.data.errors import DataError, DroppableRecord
from lit_align.data.formats import normalise_record
from lit_align.data.sft_datamodule import SFTDataModule
from lit_align.data.tokenize import tokenize_pair
from lit_align.errors import SettingError
from lit_align.model.tiny import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


def decoded(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=False)


def ultrafeedback_record(k: int) -> dict:
    """One record in HuggingFaceH4/ultrafeedback_binarized's shape."""
    prompt = f"Name a colour number {k}."
    return {
        "prompt": prompt,
        "prompt_id": f"{k:064x}",
        "chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": f"Blue is colour {k}."}],
        "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": "I cannot say."}],
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": f"Blue is colour {k}."}],
        "score_chosen": 8.0,
        "score_rejected": 3.5,
    }


def test_ultrafeedback_binarized_loads_without_configuration(tokenizer, tmp_path):
    records = [ultrafeedback_record(k) for k in range(6)]
    train = write_jsonl(tmp_path / "uf.jsonl", records)
    dm = PreferenceDataModule(train=train, val=train, max_length=96, cache_dir=str(tmp_path / "cache"))
    dm.tokenizer = tokenizer
    dm.setup("fit")
    example = dm.datasets["train"][0]
    # the text prompt is the user turn the conversations share; the replies are what follows it
    assert decoded(tokenizer, example["prompt"]) == "<|bos|><|user|>Name a colour number 0.<|eos|><|assistant|>"
    assert decoded(tokenizer, example["chosen"]) == "Blue is colour 0.<|eos|>"
    assert decoded(tokenizer, example["rejected"]) == "I cannot say.<|eos|>"
    assert (example["score_chosen"], example["score_rejected"]) == (8.0, 3.5)


def test_text_prompt_that_is_not_the_shared_user_turn_is_named(tokenizer):
    record = ultrafeedback_record(0) | {"prompt": "a different question"}
    with pytest.raises(
        DataError, match=r"^uf\.jsonl, record 3, field 'prompt': the text prompt is not a user turn of the conversation"
    ):
        normalise_record(record, "uf.jsonl", 3)


def test_text_prompt_beside_assistant_messages_is_the_user_turn(tokenizer):
    pair = normalise_record(
        {
            "prompt": "Hi?",
            "chosen": [{"role": "assistant", "content": "Hello."}],
            "rejected": [{"role": "assistant", "content": "Go away."}],
        },
        "d.jsonl",
        0,
    )
    assert pair.prompt == ({"role": "user", "content": "Hi?"},)
    assert (pair.chosen, pair.rejected) == ("Hello.", "Go away.")


def test_chat_prompt_repeated_in_the_responses_is_split_off():
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    pair = normalise_record(
        {
            "prompt": prompt,
            "chosen": prompt + [{"role": "assistant", "content": "Hello."}],
            "rejected": prompt + [{"role": "assistant", "content": "Go away."}],
        },
        "d.jsonl",
        0,
    )
    assert pair.prompt == tuple(prompt)
    assert (pair.chosen, pair.rejected) == ("Hello.", "Go away.")


TOOL_CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}


def test_tool_calls_and_tool_results_are_kept_as_they_are():
    chosen = [
        {"role": "assistant", "content": "", "tool_calls": [TOOL_CALL]},
        {"role": "tool", "name": "get_weather", "tool_call_id": "call_0", "content": '{"sky": "sunny"}'},
        {"role": "assistant", "content": "It is sunny in Paris.", "reasoning_content": "The tool said sunny."},
    ]
    record = {
        "prompt": [{"role": "user", "content": "Weather in Paris?"}],
        "chosen": chosen,
        "rejected": [{"role": "assistant", "content": "It always rains."}],
    }
    pair = normalise_record(record, "tools.jsonl", 0)
    assert pair.chosen == tuple(chosen)  # every field of every message, in order
    assert pair.rejected == "It always rains."


@pytest.mark.parametrize("content", [{"content": None}, {}], ids=["null", "absent"])
def test_tool_call_message_may_have_null_or_no_content(content):
    record = {
        "prompt": [{"role": "user", "content": "Weather?"}],
        "chosen": [{"role": "assistant", "tool_calls": [TOOL_CALL], **content}],
        "rejected": "No idea.",
    }
    assert normalise_record(record, "d.jsonl", 0).chosen[0]["tool_calls"] == [TOOL_CALL]


def test_text_parts_are_passed_to_the_template_as_they_are(tokenizer):
    parts = [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo."}]
    record = {"prompt": [{"role": "user", "content": "Hi?"}], "chosen": [{"role": "assistant", "content": parts}]}
    pair = normalise_record(record | {"rejected": "Go away."}, "d.jsonl", 0)
    assert pair.chosen == ({"role": "assistant", "content": parts},)
    # the tiny template joins content as text: a template that cannot render parts says so, naming the field
    with pytest.raises(DataError, match=r"^d\.jsonl, record 0, field 'chosen': the chat template cannot render"):
        tokenize_pair(pair, tokenizer, 96, 48, source="d.jsonl", index=0)


@pytest.mark.parametrize(
    "content, field, message",
    [
        (
            [{"type": "text", "text": "see"}, {"type": "image_url", "image_url": {"url": "x.png"}}],
            "chosen[0].content[1]",
            "content part 1 is 'image_url': only text parts ({'type': 'text', 'text': ...}) can be tokenized",
        ),
        ([{"type": "text", "text": 3}], "chosen[0].content[0]", "content part 0 is 'text': only text parts"),
        (["plain"], "chosen[0].content[0]", "content part 0 is 'str': only text parts"),
        (None, "chosen[0]", "message content must be a string or a list of text parts, got NoneType"),
    ],
    ids=["image", "text-not-string", "bare-string", "null-without-tool-calls"],
)
def test_content_that_is_not_text_is_named(content, field, message):
    record = {"prompt": "Hi?", "chosen": [{"role": "assistant", "content": content}], "rejected": "No."}
    with pytest.raises(DataError, match="^" + re.escape(f"d.jsonl, record 4, field '{field}': {message}")):
        normalise_record(record, "d.jsonl", 4)


def test_response_with_a_user_turn_is_named():
    record = {
        "prompt": [{"role": "user", "content": "Hi?"}],
        "chosen": [{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Thanks"}],
        "rejected": "No.",
    }
    with pytest.raises(
        DataError,
        match=re.escape("d.jsonl, record 0, field 'chosen[1]': a response holds the model's turns and tool results"),
    ):
        normalise_record(record, "d.jsonl", 0)


def test_tool_calls_must_be_a_list():
    record = {
        "prompt": "Hi?",
        "chosen": [{"role": "assistant", "content": "", "tool_calls": {"name": "f"}}],
        "rejected": "No.",
    }
    with pytest.raises(DataError, match=re.escape("field 'chosen[0]': tool_calls must be a list, got dict")):
        normalise_record(record, "d.jsonl", 0)


def test_orca_shape_with_column_mapping_and_system_field(tokenizer, tmp_path):
    """Intel/orca_dpo_pairs: {system, question, chosen, rejected}; ``columns`` maps the question."""
    records = [
        {
            "system": "You are terse." if k % 2 else "",
            "question": f"Add 2 and {k}.",
            "chosen": f"{k + 2}",
            "rejected": "5",
        }
        for k in range(1, 5)
    ]
    train = write_jsonl(tmp_path / "orca.jsonl", records)
    dm = PreferenceDataModule(
        train=train, val=train, columns={"prompt": "question"}, max_length=96, cache_dir=str(tmp_path / "c")
    )
    dm.tokenizer = tokenizer
    dm.setup("fit")
    with_system, without = dm.datasets["train"][0], dm.datasets["train"][1]
    assert decoded(tokenizer, with_system["prompt"]) == (
        "<|bos|><|system|>You are terse.<|eos|><|user|>Add 2 and 1.<|eos|><|assistant|>"
    )
    assert decoded(tokenizer, without["prompt"]) == "<|bos|><|user|>Add 2 and 2.<|eos|><|assistant|>"
    assert decoded(tokenizer, with_system["chosen"]) == "3<|eos|>"


def hh_record(k: int) -> dict:
    """One record in Anthropic/hh-rlhf's shape: two whole transcripts sharing all but the last reply."""
    shared = f"\n\nHuman: Hi {k}\n\nAssistant: Hello.\n\nHuman: Name a colour."
    return {"chosen": shared + "\n\nAssistant: Blue.", "rejected": shared + "\n\nAssistant: No."}


def test_hh_transcripts_as_chat_turns_are_rendered_with_the_chat_template(tokenizer, tmp_path):
    """format: transcript splits Anthropic HH transcripts at the Human / Assistant markers into chat
    turns (text stripped): the shared turns are the prompt, rendered with the tokenizer's chat
    template, and the last assistant turn is the reply. format: auto keeps reading them as text."""
    train = write_jsonl(tmp_path / "hh.jsonl", [hh_record(k) for k in range(4)])
    dm = PreferenceDataModule(train=train, val=train, format="transcript", max_length=96, cache_dir=str(tmp_path / "c"))
    dm.tokenizer = tokenizer
    dm.setup("fit")
    example = dm.datasets["train"][1]
    assert decoded(tokenizer, example["prompt"]) == (
        "<|bos|><|user|>Hi 1<|eos|><|assistant|>Hello.<|eos|><|user|>Name a colour.<|eos|><|assistant|>"
    )
    assert decoded(tokenizer, example["chosen"]) == "Blue.<|eos|>"
    assert decoded(tokenizer, example["rejected"]) == "No.<|eos|>"
    as_text = normalise_record(hh_record(1), "hh.jsonl", 0)
    assert (as_text.prompt, as_text.chosen) == (hh_record(1)["chosen"][: -len(" Blue.")], " Blue.")


def test_transcript_markers_are_settings():
    record = {"chosen": "USER: a\nBOT: b\nUSER: c\nBOT: d", "rejected": "USER: a\nBOT: b\nUSER: c\nBOT: e"}
    pair = normalise_record(record, "f.jsonl", 0, "transcript", assistant_marker="BOT:", user_marker="USER:")
    assert pair.prompt == (
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    )
    assert (pair.chosen, pair.rejected) == ("d", "e")


@pytest.mark.parametrize(
    "record, field, message",
    [
        (
            {"chosen": "Q: hi\n\nAssistant: a", "rejected": "Q: hi\n\nAssistant: b"},
            "chosen",
            "the text does not start with a turn marker ('\\n\\nHuman:', '\\n\\nAssistant:')",
        ),
        (
            {"prompt": "hi", "chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: b"},
            "prompt",
            "this record also has a prompt",
        ),
    ],
)
def test_transcript_that_is_not_one_is_named(record, field, message):
    with pytest.raises(DataError) as raised:
        normalise_record(record, "hh.jsonl", 3, "transcript")
    assert f"hh.jsonl, record 3, field '{field}'" in str(raised.value)
    assert message in str(raised.value)


def test_real_hh_split_reads_as_chat_turns():
    """The shared HH harmless-base split: every record that has a reply reads as chat turns, the
    prompt ending with a user turn (the 4 records with an empty chosen reply are dropped, as
    ``implicit`` drops them)."""
    source = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
    if not source.is_file():
        pytest.skip(f"{source} is not here")
    read, dropped = 0, 0
    with gzip.open(source, "rt") as handle:
        for index, line in enumerate(handle):
            try:
                pair = normalise_record(json.loads(line), str(source), index, "transcript")
            except DroppableRecord:
                dropped += 1
                continue
            assert pair.prompt[-1]["role"] == "user" and pair.prompt[0]["role"] == "user", index
            read += 1
    assert (read, dropped) == (2308, 4)


def test_stack_exchange_shape_with_column_mapping(tokenizer, tmp_path):
    """lvwerra/stack-exchange-paired: {question, response_j (preferred), response_k}."""
    records = [{"question": f"Q{k}?", "response_j": f"good {k}", "response_k": f"bad {k}"} for k in range(4)]
    train = write_jsonl(tmp_path / "se.jsonl", records)
    dm = PreferenceDataModule(
        train=train,
        val=train,
        columns={"prompt": "question", "chosen": "response_j", "rejected": "response_k"},
        max_length=64,
        cache_dir=str(tmp_path / "c"),
    )
    dm.tokenizer = tokenizer
    dm.setup("fit")
    example = dm.datasets["train"][2]
    assert decoded(tokenizer, example["prompt"]) == "Q2?"  # plain text: no template
    assert decoded(tokenizer, example["chosen"]) == "good 2<|eos|>"
    assert decoded(tokenizer, example["rejected"]) == "bad 2<|eos|>"


def test_chat_template_kwargs_without_chat_data_is_refused():
    with pytest.raises(
        SettingError, match=re.escape("PreferenceDataModule: chat_template_kwargs is set, but the only data is the")
    ):
        PreferenceDataModule(chat_template_kwargs={"enable_thinking": False})


def test_system_field_and_system_message_together_is_an_error():
    record = {
        "system": "A",
        "prompt": [{"role": "system", "content": "B"}, {"role": "user", "content": "Hi?"}],
        "chosen": "x",
        "rejected": "y",
    }
    with pytest.raises(DataError, match=re.escape("record 0, field 'system': the record has a system field and")):
        normalise_record(record, "d.jsonl", 0)


def test_sft_conversation_with_tool_turns_trains_on_the_whole_last_reply(tokenizer):
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Let me look."},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."},
    ]
    dm = SFTDataModule(train="x.jsonl", max_length=96)
    prompt, completion = dm._demonstration({"messages": messages}, "x.jsonl", 0)
    assert prompt == tuple(messages[:1])
    assert completion == tuple(messages[1:])


# ---- through the CLI: DPO trains end to end on these shapes ------------------------------------
def builtin_pairs(split: str, count: int) -> list[dict]:
    from lit_align.data.tasks import WordRulesTask

    return WordRulesTask().split(split)[:count]


def as_ultrafeedback(pair: dict, k: int) -> dict:
    prompt = pair["prompt"]
    turn = lambda text: [{"role": "user", "content": prompt}, {"role": "assistant", "content": text}]  # noqa: E731
    return {
        "prompt": prompt,
        "prompt_id": f"{k:064x}",
        "chosen": turn(pair["chosen"]),
        "rejected": turn(pair["rejected"]),
        "messages": turn(pair["chosen"]),
        "score_chosen": 9.0,
        "score_rejected": 2.0,
    }


def as_tool_calls(pair: dict, k: int) -> dict:
    """The chosen reply calls a tool, reads its result and answers; the rejected one answers directly."""
    word = pair["prompt"].split(": ", 1)[1].strip()
    call = {"type": "function", "function": {"name": "apply_rule", "arguments": {"word": word}}}
    return {
        "prompt": [{"role": "system", "content": "Use tools."}, {"role": "user", "content": pair["prompt"]}],
        "chosen": [
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "name": "apply_rule", "content": pair["chosen"]},
            {"role": "assistant", "content": pair["chosen"]},
        ],
        "rejected": [{"role": "assistant", "content": pair["rejected"]}],
    }


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["ultrafeedback", "tool-calls"])
def test_dpo_trains_end_to_end_through_the_cli(shape, in_tmp, capsys, measured):
    """Held-out preference accuracy from chance to >= 0.8 (tool calls: Qwen2.5's template, given as
    model.chat_template, renders them)."""
    from chat_templates import QWEN25
    from conftest import QUIET_FLAGS, metric_rows, seed_flags, short_run_flags

    from lit_align.cli import main

    convert, flags = {
        "ultrafeedback": (as_ultrafeedback, ["--data.init_args.max_length", "96"]),
        "tool-calls": (
            as_tool_calls,
            ["--data.init_args.max_length", "320", "--model.init_args.model.chat_template", "qwen25.jinja"],
        ),
    }[shape]
    (in_tmp / "qwen25.jinja").write_text(QWEN25)
    train = write_jsonl(in_tmp / "train.jsonl", [convert(p, k) for k, p in enumerate(builtin_pairs("train", 640))])
    val = write_jsonl(in_tmp / "val.jsonl", [convert(p, k) for k, p in enumerate(builtin_pairs("val", 64))])
    config = str(Path(__file__).resolve().parents[1] / "configs" / "dpo.yaml")
    main(
        ["fit", "--config", config, "--data.init_args.train", train, "--data.init_args.val", val]
        + flags
        + [*short_run_flags(60), *QUIET_FLAGS, *seed_flags()]
    )
    accuracies = measured("val/rewards/accuracies", metric_rows("val/rewards/accuracies"))
    assert len(accuracies) == 2 and 0.3 <= accuracies[0] <= 0.7, accuracies
    assert accuracies[-1] >= 0.8, accuracies
