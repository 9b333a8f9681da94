"""``lit-align eval``: the held-out metrics of a checkpoint or an export on a data file.

lit-align eval --model runs/.../last.ckpt --data heldout.jsonl
lit-align eval --model outputs/policy --data prompts.jsonl --reward lit_align.rewards.WordRulesReward --baseline tiny

Two kinds of evaluation:

* **the method's own validation** (preference data for paired, unpaired and listwise methods,
  demonstrations for SFT): the module is rebuilt from the checkpoint or export
  (:func:`lit_align.commands.models.load_method`) and validated by Lightning on a data module of
  its run's configuration whose held-out split is ``--data`` (and nothing else is read or
  tokenized: :attr:`lit_align.data.AlignmentDataModule.held_out_only`). The metrics are those
  validation logs (``val/rewards/accuracies``, ``val/rewards/margins``, ``val/loss``, ...), as
  ``lit-align validate`` reports them on the same data.
* **scores of generated completions** (on-policy methods, or any model with ``--reward``): one
  greedy completion per prompt of ``--data``, scored by the reward (``--reward``: a class path or
  an exported reward-model folder; default: the run's ``eval_reward``, else ``reward``):
  ``mean_score``; with ``--baseline MODEL``, the baseline's completions too (``baseline_mean_score``)
  and ``win_rate``, the fraction of prompts where the policy's completion scores higher (a tie
  counts 1/2).

The metrics are printed as a table and, with ``--output``, written as a JSON object (atomically).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from lit_align.commands import CommandError
from lit_align.commands.generate import (
    MODEL_HELP,
    add_generation_arguments,
    device,
    generation_settings,
    load_model_option,
)
from lit_align.commands.models import (
    CONFIG_FILE,
    RunConfig,
    find_run_config,
    import_class,
    instantiate,
    is_checkpoint,
    load_method,
)
from lit_align.commands.prompts import complete, read_prompts_and_answers, tokenize_prompts
from lit_align.data.collate import PromptLayout
from lit_align.data.datamodule import AlignmentDataModule
from lit_align.data.formats import as_conversation
from lit_align.online.reward_model import RewardModelReward
from lit_align.online.rewards import FunctionReward, RewardFunction, check_reward, require_answers, score_completions
from lit_align.runtime.atomic import atomic_write_text
from lit_align.runtime.progress import shows_bars

DEFAULT_MAX_NEW_TOKENS = 64


def build_parser():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(
        prog="lit-align eval", description="Held-out metrics of a checkpoint or an export on a data file."
    )
    parser.add_argument("--model", type=str, required=True, help=MODEL_HELP)
    parser.add_argument(
        "--data", type=str, required=True, help="Held-out data: any file, saved datasets folder or hub name."
    )
    parser.add_argument("--split", type=str | None, default=None, help="Split to read from a hub or saved dataset.")
    parser.add_argument(
        "--max_length", type=int | None, default=None, help="Longest sequence in tokens (default: the run's)."
    )
    parser.add_argument(
        "--reward",
        type=str | None,
        default=None,
        help="Score greedy completions with this reward: a class path (lit_align.rewards.WordRulesReward) or an "
        "exported reward-model folder. Default for on-policy runs: the run's eval_reward or reward.",
    )
    parser.add_argument(
        "--baseline", type=str | None, default=None, help="Also generate with this model and report the win rate."
    )
    parser.add_argument("--output", type=str | None, default=None, help="JSON file to write the metrics to.")
    add_generation_arguments(parser, max_new_tokens=None)
    return parser


def main(argv: list[str]) -> None:
    """``lit-align eval``: parse, evaluate, print the table, write the JSON."""
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise CommandError(f"--batch_size must be >= 1, got {args.batch_size}", hint="change --batch_size")
    metrics = evaluate(args)
    print(table(metrics))
    if args.output is not None:
        atomic_write_text(json.dumps(metrics, indent=2) + "\n", args.output)
        print(f"wrote the metrics to {args.output}", file=sys.stderr)


def evaluate(args) -> dict[str, float]:
    """The metrics of ``args.model`` on ``args.data`` (see the module's docstring for which)."""
    if not is_checkpoint(args.model) and not Path(args.model).expanduser().exists() and args.reward is None:
        raise CommandError(
            f"--model {args.model!r}: no such checkpoint or folder",
            hint="give a checkpoint written by lit-align fit or a folder written by lit-align export",
        )
    config = find_run_config(args.model)
    if args.reward is not None or (config is not None and PromptLayout in config.method_class().data_layouts):
        return completion_scores(args, config)
    if args.baseline is not None:
        raise CommandError(
            "--baseline compares generated completions, which needs a reward",
            hint="add --reward (e.g. lit_align.rewards.WordRulesReward)",
        )
    if args.chat or args.system_prompt is not None:
        raise CommandError(
            f"--{'chat' if args.chat else 'system_prompt'} renders the prompts of generated completions, and "
            "validating this run generates none (its data module renders the held-out data as in training)",
            hint="drop it, or add --reward to score greedy completions",
        )
    if config is None:
        raise CommandError(
            f"{args.model!r} has no {CONFIG_FILE}: the method and data settings of its run are needed to validate it",
            hint=f"copy the run's runs/lightning_logs/version_N/{CONFIG_FILE} into the folder, or give --reward to "
            "score its greedy completions instead",
        )
    return validation_metrics(args, config)


# ---- the method's own validation -----------------------------------------------------------------------
def validation_metrics(args, config: RunConfig) -> dict[str, float]:
    """Lightning's validation of the method on a data module of its run whose held-out split is
    ``args.data``: every ``val/...`` metric it logs."""
    import lightning

    if config.data is None:
        raise CommandError(f"{config.source} has no data settings (data.class_path): cannot build the held-out data")
    module = load_method(args.model, config)
    init = dict(config.data.get("init_args") or {})
    init.update(val=args.data, val_split=args.split, test=None, test_split=None, eval_batch_size=args.batch_size)
    if args.max_length is not None:
        init["max_length"] = args.max_length
    if args.chat_template_kwargs is not None:
        init["chat_template_kwargs"] = args.chat_template_kwargs
    data = instantiate({"class_path": config.data["class_path"], "init_args": init}, AlignmentDataModule)
    data.held_out_only = not module.data_request().class_counts  # class counts are counted on training data
    trainer = lightning.Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=shows_bars(),
        inference_mode=False,  # as the CLI's trainer validates (see lit_align.cli.TRAINER_DEFAULTS)
        accelerator="auto",
        devices=1,
    )
    trainer.validate(module, datamodule=data, verbose=False)
    return {name: float(value) for name, value in sorted(trainer.callback_metrics.items()) if name.startswith("val/")}


# ---- scores of generated completions -------------------------------------------------------------------
def completion_scores(args, config: RunConfig | None) -> dict[str, float]:
    """Mean reward of the policy's greedy completions of the prompts of ``args.data`` and, with
    ``args.baseline``, the baseline's mean and the policy's win rate over it."""
    reward = build_reward(args.reward, config)
    data_args = ((config.data if config is not None else None) or {}).get("init_args") or {}
    prompts, answers, records = read_prompts_and_answers(args.data, args.split or "train", data_args.get("columns"))
    require_answers(reward, answers, records, args.data)  # before generating
    template_kwargs = args.chat_template_kwargs or data_args.get("chat_template_kwargs")
    max_new_tokens = args.max_new_tokens or _configured_max_new_tokens(config)
    generation = generation_settings(max_new_tokens, 0.0, 1.0)
    max_prompt_length = args.max_length

    chat = args.chat or bool(data_args.get("chat"))  # as the run's PromptDataModule rendered prompts
    system_prompt = args.system_prompt if args.system_prompt is not None else data_args.get("system_prompt")
    rendered = [as_conversation(prompt, chat, system_prompt) for prompt in prompts]

    def scores(source: str, name: str) -> torch.Tensor:
        loaded = load_model_option(source)
        loaded.model.to(device())
        ids = tokenize_prompts(rendered, loaded.tokenizer, template_kwargs, max_prompt_length, args.data)
        completions = complete(loaded.model, loaded.tokenizer, ids, generation, args.batch_size, 0.0, name)
        return score_completions(reward, prompts, completions, answers).float().cpu()

    policy = scores(args.model, "Generating (policy)")
    metrics = {"mean_score": float(policy.mean())}
    if args.baseline is not None:
        baseline = scores(args.baseline, "Generating (baseline)")
        wins = (policy > baseline).float() + 0.5 * (policy == baseline).float()
        metrics.update(baseline_mean_score=float(baseline.mean()), win_rate=float(wins.mean()))
    return metrics


def build_reward(given: str | None, config: RunConfig | None):
    """The reward ``--reward`` names (an exported reward-model folder, or a class path built with
    no arguments), else the run's configured ``eval_reward``/``reward``, moved to the device."""
    if given is not None and Path(given).expanduser().is_dir():
        reward = RewardModelReward(given)
    elif given is not None:
        named = import_class(given, "--reward")
        reward = named() if isinstance(named, type) else FunctionReward(named)  # a class, or a plain function
    else:
        spec = config.reward_spec() if config is not None else None
        if spec is None:
            raise CommandError(
                f"no reward to score completions with: {config.source if config else '--model'} configures none",
                hint="give --reward (a class path such as lit_align.rewards.WordRulesReward, or a reward-model folder)",
            )
        reward = _configured_reward(spec)
    check_reward(reward, "lit-align eval", "--reward")
    return reward.to(device()) if hasattr(reward, "to") else reward


def _configured_reward(spec: Any):
    """A reward as a config writes it: ``{class_path, init_args}`` or a class path."""
    if isinstance(spec, str):
        return import_class(spec, "reward")()
    if issubclass(import_class(spec["class_path"], "reward.class_path"), RewardFunction):
        return instantiate(spec, RewardFunction)
    return import_class(spec["class_path"], "reward.class_path")(**(spec.get("init_args") or {}))


def _configured_max_new_tokens(config: RunConfig | None) -> int:
    """The run's ``generation.max_new_tokens`` (on-policy runs), else :data:`DEFAULT_MAX_NEW_TOKENS`."""
    args = (config.model.get("init_args") or {}) if config is not None else {}
    return (args.get("generation") or {}).get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS


def table(metrics: dict[str, float]) -> str:
    """The metrics as a two-column table (metric, value)."""
    width = max([len("metric"), *map(len, metrics)])
    lines = [f"{'metric':<{width}}  value"]
    lines += [f"{name:<{width}}  {value:.4f}" for name, value in metrics.items()]
    return "\n".join(lines)
