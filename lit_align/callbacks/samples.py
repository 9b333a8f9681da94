"""What the model answers: completions of fixed held-out prompts at every validation.

A number says a run learns; a completion says what it learned. At each validation (the one
``lit-align fit`` runs before training included: ``step_0``), :class:`Samples` takes the first
``count`` held-out examples, has the policy complete their prompts (greedy by default, stopping at
the chat template's end of turn) and writes one JSON line per prompt to
``<run folder>/samples/step_<global step>.jsonl``: the prompt, the completion, and what the data
has beside it (``chosen``/``rejected`` of a pair, the ``completion`` and ``label`` of an unpaired
example, the ranked ``responses`` and ``scores`` of a list, the demonstration of SFT data). The
same rows go to the logger as text where it takes text (TensorBoard: a Markdown table under
``samples``; W&B: a table; MLflow: an artifact). On-policy methods already generate held-out
completions to score them: those are written (with their ``score``) instead of generating again.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, Trainer

from lit_align.data.collate import REFERENCE_FIELD, PromptCollator
from lit_align.errors import SettingError
from lit_align.methods.alignment import AlignmentModule
from lit_align.online.rollout import GenerationSettings, sample_completions
from lit_align.runtime.atomic import atomic_write_text
from lit_align.settings import Count, NonNegative, NonNegativeInt, check_values

log = logging.getLogger(__name__)
SAMPLES_FOLDER = "samples"


class Samples(Callback):
    """Write completions of the first ``count`` held-out prompts at every validation.

    Args:
        count: held-out prompts to complete (0: none, the callback does nothing).
        max_new_tokens: longest completion in tokens (on-policy methods use their own
            ``generation`` settings, since the completions are the ones they score).
        temperature: sampling temperature (0 = greedy: the same prompts give comparable answers
            from one validation to the next).

    ``lit-align fit`` adds one (``--samples N`` sets ``count``, ``--samples 0`` turns it off); a
    ``Samples`` callback under ``trainer.callbacks`` replaces it. Not under FSDP (each process
    holds a shard of the weights; generating would need them gathered): a configured one is an
    error there, the default one is skipped with a log line.
    """

    def __init__(self, count: NonNegativeInt = 8, max_new_tokens: Count = 64, temperature: NonNegative = 0.0):
        check_values(
            "Samples",
            {"count": NonNegativeInt, "max_new_tokens": Count, "temperature": NonNegative},
            {"count": count, "max_new_tokens": max_new_tokens, "temperature": temperature},
        )
        self.count, self.max_new_tokens, self.temperature = count, max_new_tokens, temperature
        self.default = False
        """Added by the CLI, not configured: skipped (instead of refused) where it cannot run."""
        self.written: list[Path] = []
        """The sample files written so far, in order."""
        self._active = True
        self.folder = Path(".")
        """The run folder (set in ``setup``)."""

    def setup(self, trainer: Trainer, pl_module: AlignmentModule, stage: str) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        self._active = self.count > 0 and isinstance(pl_module, AlignmentModule)
        # every process asks: Trainer.log_dir broadcasts process 0's folder (a collective)
        self.folder = Path(trainer.log_dir or trainer.default_root_dir)
        if self._active and isinstance(trainer.strategy, FSDPStrategy):
            if not self.default:
                raise SettingError(
                    "Samples",
                    "count",
                    "must be 0 under FSDP: held-out samples cannot be generated there (every process holds a shard "
                    "of the weights); remove the Samples callback, or set count: 0",
                )
            if trainer.is_global_zero:
                log.info("held-out samples are not generated under FSDP")
            self._active = False

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: AlignmentModule) -> None:
        if self._active and not trainer.sanity_checking:
            pl_module.held_out_samples = [] if pl_module.generates_held_out else None
            pl_module.held_out_sample_limit = self.count

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: AlignmentModule) -> None:
        if not self._active or trainer.sanity_checking:
            return
        collected = pl_module.held_out_samples
        pl_module.held_out_samples = None
        rows = collected if collected is not None else self.generate(trainer, pl_module)
        if not trainer.is_global_zero or not rows:
            return
        path = self.folder / SAMPLES_FOLDER / f"step_{trainer.global_step}.jsonl"
        atomic_write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), path)
        self.written.append(path)
        for logger in trainer.loggers:
            send = LOGGER_TEXT.get(type(logger).__name__)
            if send is not None:
                send(logger, rows, trainer.global_step)

    @torch.no_grad()
    def generate(self, trainer: Trainer, pl_module: AlignmentModule) -> list[dict[str, Any]]:
        """Completions of the first ``count`` held-out examples (every process generates the same
        ones; process 0 writes them)."""
        datamodule = trainer.datamodule
        examples = getattr(datamodule, "datasets", {}).get("val")
        if not examples:
            return []
        examples = examples[: min(self.count, len(examples))]
        tokenizer = pl_module.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        left_padded = PromptCollator(pad)([{"prompt": example["prompt"], "text": None} for example in examples])
        ids, mask = left_padded["prompt_ids"].to(pl_module.device), left_padded["prompt_mask"].to(pl_module.device)
        settings = GenerationSettings(max_new_tokens=self.max_new_tokens, temperature=self.temperature)
        batch = sample_completions(pl_module.backbone.policy, tokenizer, ids, mask, settings, 1, self.temperature).batch
        completions = pl_module.decode(batch)
        return [
            {"record": example.get("record"), **describe_example(example, tokenizer), "completion": completion}
            for example, completion in zip(examples, completions, strict=True)
        ]


def describe_example(example: dict[str, Any], tokenizer) -> dict[str, Any]:
    """The readable fields of a tokenized held-out example: token fields decoded (the prompt, a
    pair's chosen and rejected, a list's responses...), plain values (scores, labels) as they
    are. The data's own completion is renamed so it does not read as the model's: ``reference``
    (the demonstration of SFT data) or ``data_completion`` (an unpaired example, beside its ``label``)."""
    described: dict[str, Any] = {}
    renamed = {"completion": "data_completion" if "label" in example else "reference"}
    for name, value in example.items():
        if name in ("record", "kl_completion", REFERENCE_FIELD) or value is None:
            continue
        key = renamed.get(name, name)
        if _is_ids(value):
            described[key] = tokenizer.decode(value, skip_special_tokens=True)
        elif isinstance(value, (list, tuple)) and value and all(_is_ids(item) for item in value):
            described[key] = [tokenizer.decode(item, skip_special_tokens=True) for item in value]
        elif isinstance(value, (int, float, str, bool)) or (
            isinstance(value, (list, tuple)) and all(isinstance(item, (int, float)) for item in value)
        ):
            described[key] = value if not isinstance(value, tuple) else list(value)
    if "text" in described:  # prompt data keeps the prompt as written (text or chat messages)
        described["prompt"] = described.pop("text")
    return described


def _is_ids(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(item, int) for item in value)


# ---- the loggers that take text ------------------------------------------------------------------
def _markdown(rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cell = lambda value: json.dumps(value, ensure_ascii=False).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(column)) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


def _tensorboard(logger, rows: list[dict[str, Any]], step: int) -> None:
    logger.experiment.add_text(SAMPLES_FOLDER, _markdown(rows), step)


def _wandb(logger, rows: list[dict[str, Any]], step: int) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    data = [[json.dumps(row.get(column), ensure_ascii=False) for column in columns] for row in rows]
    logger.log_text(key=SAMPLES_FOLDER, columns=columns, data=data, step=step)


def _mlflow(logger, rows: list[dict[str, Any]], step: int) -> None:
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    logger.experiment.log_text(logger.run_id, text, f"{SAMPLES_FOLDER}/step_{step}.jsonl")


LOGGER_TEXT = {"TensorBoardLogger": _tensorboard, "WandbLogger": _wandb, "MLFlowLogger": _mlflow}
"""Logger class name -> how it is sent the samples; others (CSVLogger) have the run folder's files."""
