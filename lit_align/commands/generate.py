"""``lit-align generate``: completions of prompts by a trained policy (or any model), as JSONL.

lit-align generate --model runs/.../last.ckpt --prompt $'First letter of cab:\\n'
lit-align generate --model outputs/policy --prompts prompts.jsonl --output completions.jsonl

One ``{"prompt": ..., "completion": ...}`` line per prompt, in input order, on stdout or written
atomically to ``--output``.
"""

from __future__ import annotations

import json
import sys
import typing
from typing import Any

from lit_align.commands import CommandError
from lit_align.commands.models import load_policy
from lit_align.commands.prompts import complete, read_prompt_file, tokenize_prompts
from lit_align.data.formats import as_conversation
from lit_align.errors import SettingError
from lit_align.model.loading import ModelLoadError
from lit_align.online.rollout import GenerationSettings
from lit_align.runtime.atomic import atomic_write_text
from lit_align.settings import check_values

MODEL_HELP = (
    "A lit-align checkpoint (.ckpt file or sharded folder), an exported Hugging Face folder (full or "
    "adapter-only LoRA), a hub id, a .gguf file, package://DIST/FILE or tiny."
)


def add_generation_arguments(parser, max_new_tokens: int | None = 64) -> None:
    """The generation options ``generate`` and ``eval`` share."""
    parser.add_argument("--batch_size", type=int, default=8, help="Prompts generated together.")
    parser.add_argument(
        "--max_new_tokens", type=int | None, default=max_new_tokens, help="Longest completion in tokens."
    )
    parser.add_argument(
        "--chat_template_kwargs",
        type=dict | None,
        default=None,
        help="Extra chat-template variables as JSON, e.g. '{\"enable_thinking\": false}'.",
    )
    parser.add_argument(
        "--chat",
        action="store_true",
        help="Send each text prompt as a user message through the tokenizer's chat template (for chat models); "
        "prompts given as messages are rendered so anyway.",
    )
    parser.add_argument(
        "--system_prompt",
        type=str | None,
        default=None,
        help="A system message before every prompt without one (text prompts then go through the chat template).",
    )


def build_parser():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(
        prog="lit-align generate",
        description="Complete prompts with a trained policy (or any model) and write JSONL "
        '{"prompt": ..., "completion": ...} lines.',
    )
    parser.add_argument("--model", type=str, required=True, help=MODEL_HELP)
    parser.add_argument("--prompt", action="append", default=None, help="A prompt (repeat the flag for several).")
    parser.add_argument(
        "--prompts",
        type=str | None,
        default=None,
        help="A file of prompts: .txt (one per line) or JSONL/JSON/parquet records with a 'prompt' (text or "
        "chat messages) or 'messages' field.",
    )
    parser.add_argument("--output", type=str | None, default=None, help="JSONL file to write (default: stdout).")
    add_generation_arguments(parser)
    parser.add_argument("--temperature", type=float, default=0.0, help="Sampling temperature (0 = greedy).")
    parser.add_argument("--top_p", type=float, default=1.0, help="Nucleus sampling: keep this much probability.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the sampling.")
    return parser


def given_prompts(prompt: list[str] | None, prompts_file: str | None) -> tuple[list[Any], str]:
    """(prompts, where they came from) of ``--prompt`` or ``--prompts``: exactly one is given."""
    if (prompt is None) == (prompts_file is None):
        raise CommandError(
            "give the prompts either with --prompt TEXT (repeatable) or with --prompts FILE"
            + (", not both" if prompt is not None else ""),
            hint="--prompts reads a .txt file (one prompt per line) or JSONL records with a 'prompt' or 'messages' "
            "field",
        )
    if prompt is not None:
        if not prompt:
            raise CommandError("--prompt was given no text")
        return list(prompt), "--prompt"
    return read_prompt_file(prompts_file), prompts_file


def generation_settings(max_new_tokens: int, temperature: float, top_p: float) -> GenerationSettings:
    """:class:`GenerationSettings` of the command's options, range-checked (a :class:`SettingError`
    naming the option)."""
    hints = typing.get_type_hints(GenerationSettings, include_extras=True)
    values = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
    try:
        check_values("options", hints, values)
    except SettingError as error:
        error.hint = f"change --{error.setting}"
        raise
    return GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)


def jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def main(argv: list[str]) -> None:
    """``lit-align generate``: parse, load the model, complete the prompts, write the JSONL."""
    import lightning

    args = build_parser().parse_args(argv)
    prompts, source = given_prompts(args.prompt, args.prompts)
    if args.batch_size < 1:
        raise CommandError(f"--batch_size must be >= 1, got {args.batch_size}", hint="change --batch_size")
    generation = generation_settings(args.max_new_tokens, args.temperature, args.top_p)
    loaded = load_model_option(args.model)
    loaded.model.to(device())
    rendered = [as_conversation(prompt, args.chat, args.system_prompt) for prompt in prompts]
    ids = tokenize_prompts(rendered, loaded.tokenizer, args.chat_template_kwargs, source=source)
    lightning.seed_everything(args.seed, verbose=False)
    completions = complete(loaded.model, loaded.tokenizer, ids, generation, args.batch_size, args.temperature)
    empty = sum(not completion for completion in completions)
    texts = any(isinstance(prompt, str) for prompt in prompts)
    if empty and texts and not args.chat and args.system_prompt is None and loaded.tokenizer.chat_template:
        print(
            f"note: {empty} of {len(completions)} completions are empty (the model ended at once); for a chat model, "
            "--chat sends each text prompt as a user message through its chat template",
            file=sys.stderr,
        )
    text = jsonl([{"prompt": _plain(p), "completion": c} for p, c in zip(prompts, completions, strict=True)])
    if args.output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        atomic_write_text(text, args.output)
        print(f"wrote {len(completions)} completions to {args.output}", file=sys.stderr)


def load_model_option(source: str):
    """:func:`load_policy` of a ``--model``/``--baseline`` value; a model that cannot be loaded
    gets a hint listing what the option takes."""
    try:
        return load_policy(source)
    except ModelLoadError as error:
        error.hint = error.hint or f"--model takes {MODEL_HELP[0].lower()}{MODEL_HELP[1:]}"
        raise


def device():
    """Where the commands run the model: the first GPU when there is one, else the CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _plain(prompt: Any) -> Any:
    """A prompt as JSON: text, or its messages as a list of dicts."""
    return prompt if isinstance(prompt, str) else [dict(message) for message in prompt]
