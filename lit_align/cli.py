"""``lit-align``: LightningCLI over the methods and data modules, plus an ``export`` step.

    lit-align fit --config configs/dpo.yaml [--model.beta 0.2]
    lit-align validate|test --config configs/dpo.yaml [--ckpt_path ...]
    lit-align export --ckpt_path runs/.../last.ckpt --output_dir outputs/policy [--merge_lora true]
    lit-align convert-pairs --input pairs.jsonl --output unpaired.jsonl
"""

from __future__ import annotations

import importlib
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from jsonargparse import set_parsing_settings  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402

from lit_align.data.datamodule import PreferenceDataModule  # noqa: E402
from lit_align.methods.alignment import AlignmentModule  # noqa: E402

# settings dataclasses document each field in an attribute docstring: show them in --help
set_parsing_settings(docstring_parse_attribute_docstrings=True)

TRAINER_DEFAULTS = {
    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}},
    "accelerator": "auto",
    "num_sanity_val_steps": 0,
    # no_grad instead of inference_mode for evaluation: metric states are shared between the
    # validation before fit and the validations during fit, and inference tensors cannot be
    # updated outside inference mode
    "inference_mode": False,
}


class LitAlignCLI(LightningCLI):
    """LightningCLI that validates once before ``fit`` and prints held-out accuracy before/after."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--validate_before_fit", type=bool, default=True, help="Run the held-out set once before training so the log shows where accuracy starts.")

    def before_fit(self) -> None:
        self._before = None
        if self.config[self.subcommand].get("validate_before_fit"):
            results = self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
            self._before = results[0] if results else None

    def after_fit(self) -> None:
        metric = self.model.headline_metric
        after = self.trainer.callback_metrics.get(metric)
        if self.trainer.is_global_zero and after is not None:
            before = "" if not self._before else f"{self._before[metric]:.3f} -> "
            print(f"held-out {metric}: {before}{float(after):.3f}", flush=True)


def export_main(argv: list[str]) -> None:
    """``lit-align export``: a checkpoint of any lit-align module to a Hugging Face folder."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="lit-align export", description="Export a trained policy (and tokenizer) as a Hugging Face folder.")
    parser.add_argument("--ckpt_path", type=str, required=True, help="Lightning checkpoint written by lit-align fit.")
    parser.add_argument("--output_dir", type=str, required=True, help="Destination folder (written atomically).")
    parser.add_argument("--merge_lora", type=bool, default=False, help="With LoRA: merge adapters into the base weights instead of saving the adapter only.")
    args = parser.parse_args(argv)
    module = load_module_from_checkpoint(args.ckpt_path)
    print(f"exported to {module.export_hf(args.output_dir, merge_lora=args.merge_lora)}")


def convert_pairs_main(argv: list[str]) -> None:
    """``lit-align convert-pairs``: paired preference data to unpaired {prompt, completion, label} JSONL."""
    from jsonargparse import ArgumentParser

    from lit_align.data.unpaired import convert_pairs_file

    parser = ArgumentParser(prog="lit-align convert-pairs", description="Write each preference pair as a desirable (chosen) and an undesirable (rejected) example.")
    parser.add_argument("--input", type=str, required=True, help="Paired data: a file, saved datasets folder or hub name (any paired format).")
    parser.add_argument("--output", type=str, required=True, help="Unpaired JSONL to write (atomically).")
    parser.add_argument("--format", type=str, default="auto", help="Paired format: auto, explicit, conversational or implicit.")
    parser.add_argument("--split", type=str, default="train", help="Split to read from a hub dataset or saved DatasetDict.")
    args = parser.parse_args(argv)
    count, skipped = convert_pairs_file(args.input, args.output, format=args.format, split=args.split)
    print(f"wrote {count} unpaired records to {args.output} ({skipped} pairs skipped: empty or identical responses)")


def load_module_from_checkpoint(ckpt_path: str) -> AlignmentModule:
    """Rebuild the module class recorded in a lit-align checkpoint and load it (Lightning's
    ``load_from_checkpoint`` restores hyper-parameters and weights)."""
    import torch

    if not os.path.isfile(ckpt_path):
        raise SystemExit(f"lit-align export: checkpoint {ckpt_path!r} does not exist")
    recorded = torch.load(ckpt_path, map_location="cpu", mmap=True, weights_only=False).get("lit_align_class", "")
    module_name, _, class_name = recorded.partition(":")
    if not class_name:
        raise SystemExit(f"lit-align export: {ckpt_path!r} was not written by a lit-align module")
    cls = importlib.import_module(module_name)
    for part in class_name.split("."):
        cls = getattr(cls, part)
    return cls.load_from_checkpoint(ckpt_path, map_location="cpu")


def main(argv: list[str] | None = None) -> None:
    """Entry point; ``argv`` defaults to the command line."""
    words = sys.argv[1:] if argv is None else argv
    commands = {"export": export_main, "convert-pairs": convert_pairs_main}
    if words[:1] and words[0] in commands:
        commands[words[0]](words[1:])
        return
    LitAlignCLI(
        AlignmentModule,
        PreferenceDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        args=argv,
    )


if __name__ == "__main__":
    main()
