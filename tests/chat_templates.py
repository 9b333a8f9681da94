"""Chat templates of the model families people train, written here from each family's documented
behaviour (no download), with byte-level tokenizers that hold the family's special tokens as
single tokens. Used by tests/test_chat_templates.py."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerFast

from lit_align.model.tiny import build_tiny_tokenizer

TOOL_CALLS = """{%- macro tool_calls(message) -%}
{%- for call in message.get('tool_calls') or [] -%}
{{- '<tool_call>\\n{"name": "' + call['function']['name'] + '", "arguments": ' -}}
{{- (call['function']['arguments'] | tojson) + '}\\n</tool_call>' -}}
{%- endfor -%}
{%- endmacro -%}
{%- macro text(content) -%}
{%- if content is string -%}{{ content }}{%- elif content -%}{%- for part in content -%}{{ part['text'] }}{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
"""

LLAMA_31 = """{{- bos_token -}}
{%- set date = date_string if date_string is defined else '26 Jul 2024' -%}
{%- if messages[0]['role'] == 'system' -%}
{%- set system = messages[0]['content'] | trim -%}{%- set rest = messages[1:] -%}
{%- else -%}{%- set system = '' -%}{%- set rest = messages -%}{%- endif -%}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' -}}
{{- 'Cutting Knowledge Date: December 2023\\nToday Date: ' + date + '\\n\\n' + system + '<|eot_id|>' -}}
{%- for message in rest -%}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + (message['content'] | trim) + '<|eot_id|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"""

QWEN25 = (
    TOOL_CALLS
    + """{%- if messages[0]['role'] != 'system' -%}
{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' -}}
{%- endif -%}
{%- for message in messages -%}
{%- if message['role'] == 'tool' -%}
{{- '<|im_start|>user\\n<tool_response>\\n' + text(message['content']) + '\\n</tool_response><|im_end|>\\n' -}}
{%- elif message['role'] == 'assistant' -%}
{{- '<|im_start|>assistant\\n' + text(message['content']) -}}
{%- if message.get('tool_calls') and message['content'] -%}{{- '\\n' -}}{%- endif -%}
{{- tool_calls(message) + '<|im_end|>\\n' -}}
{%- else -%}
{{- '<|im_start|>' + message['role'] + '\\n' + text(message['content']) + '<|im_end|>\\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"""
)

QWEN3 = (
    TOOL_CALLS
    + """{%- set ns = namespace(last_query=-1) -%}
{%- for message in messages -%}{%- if message['role'] == 'user' -%}{%- set ns.last_query = loop.index0 -%}{%- endif -%}
{%- endfor -%}
{%- for message in messages -%}
{%- if message['role'] == 'assistant' -%}
{%- set content = text(message['content']) -%}
{%- if message.get('reasoning_content') -%}{%- set reasoning = message['reasoning_content'] -%}
{%- elif '</think>' in content -%}{%- set reasoning = content.split('</think>')[0].split('<think>')[-1] -%}
{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}
{%- else -%}{%- set reasoning = '' -%}{%- endif -%}
{%- if loop.index0 > ns.last_query and (loop.last or reasoning) -%}
{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content -}}
{%- else -%}{{- '<|im_start|>assistant\\n' + content -}}{%- endif -%}
{{- tool_calls(message) + '<|im_end|>\\n' -}}
{%- elif message['role'] == 'tool' -%}
{{- '<|im_start|>user\\n<tool_response>\\n' + text(message['content']) + '\\n</tool_response><|im_end|>\\n' -}}
{%- else -%}
{{- '<|im_start|>' + message['role'] + '\\n' + text(message['content']) + '<|im_end|>\\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}
{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}
{%- endif -%}"""
)

DEEPSEEK_R1_DISTILL = """{{- bos_token -}}
{%- for message in messages -%}
{%- if message['role'] == 'system' -%}{{- message['content'] -}}{%- endif -%}
{%- endfor -%}
{%- for message in messages -%}
{%- if message['role'] == 'user' -%}{{- '<｜User｜>' + message['content'] -}}
{%- elif message['role'] == 'assistant' -%}
{%- set content = message['content'] -%}
{%- if '</think>' in content -%}{%- set content = content.split('</think>')[-1] -%}{%- endif -%}
{{- '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<｜Assistant｜><think>\\n' -}}{%- endif -%}"""

MISTRAL = """{%- if messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] + '\\n\\n' -%}
{%- set rest = messages[1:] -%}{%- else -%}{%- set system = '' -%}{%- set rest = messages -%}{%- endif -%}
{{- bos_token -}}
{%- for message in rest -%}
{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}
{%- endif -%}
{%- if message['role'] == 'user' -%}
{{- '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' -}}
{%- else -%}{{- ' ' + message['content'] + eos_token -}}{%- endif -%}
{%- endfor -%}"""

GEMMA2 = """{{- bos_token -}}
{%- if messages[0]['role'] == 'system' -%}{{- raise_exception('System role not supported') -}}{%- endif -%}
{%- for message in messages -%}
{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}
{%- endif -%}
{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
{{- '<start_of_turn>' + role + '\\n' + (message['content'] | trim) + '<end_of_turn>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"""

SMOLLM2 = """{%- for message in messages -%}
{%- if loop.first and message['role'] != 'system' -%}
{{- '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' -}}
{%- endif -%}
{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"""


@dataclass(frozen=True)
class Family:
    """A model family's template and tokens."""

    name: str
    template: str
    bos: str | None
    eos: str
    end_of_turn: str
    """What the template puts after a reply's text (the end of turn, as text)."""
    specials: tuple[str, ...]


CHATML = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
FAMILIES = {
    family.name: family
    for family in (
        Family(
            "llama3",
            LLAMA_31,
            "<|begin_of_text|>",
            "<|eot_id|>",
            "<|eot_id|>",
            ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|end_of_text|>"),
        ),
        Family(
            "llama3-base-eos",
            LLAMA_31,
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|eot_id|>",
            ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        ),
        Family("qwen2.5", QWEN25, None, "<|im_end|>", "<|im_end|>\n", CHATML),
        Family("qwen3", QWEN3, None, "<|im_end|>", "<|im_end|>\n", CHATML),
        Family(
            "deepseek-r1-distill",
            DEEPSEEK_R1_DISTILL,
            "<｜begin▁of▁sentence｜>",
            "<｜end▁of▁sentence｜>",
            "<｜end▁of▁sentence｜>",
            ("<｜User｜>", "<｜Assistant｜>"),
        ),
        Family("mistral", MISTRAL, "<s>", "</s>", "</s>", ()),
        Family("gemma2", GEMMA2, "<bos>", "<eos>", "<end_of_turn>\n", ("<start_of_turn>", "<end_of_turn>")),
        Family("smollm2", SMOLLM2, None, "<|im_end|>", "<|im_end|>\n", CHATML),
    )
}


def family_tokenizer(name: str) -> PreTrainedTokenizerFast:
    """A lossless byte-level tokenizer with ``name``'s special tokens (one id each) and template."""
    family = FAMILIES[name]
    tokenizer = build_tiny_tokenizer()
    tokens = {"eos_token": family.eos, "additional_special_tokens": list(family.specials)}
    if family.bos:
        tokens["bos_token"] = family.bos
    tokenizer.add_special_tokens(tokens)
    if not family.bos:
        tokenizer.bos_token = None
    tokenizer.chat_template = family.template
    return tokenizer
