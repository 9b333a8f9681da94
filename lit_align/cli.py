"""``lit-align``: LightningCLI over the methods and data modules, plus an ``export`` step.

    lit-align fit --config configs/dpo.yaml [--model.beta 0.2]
    lit-align validate|test --config configs/dpo.yaml [--ckpt_path ...]
    lit-align export --ckpt_path runs/.../last.ckpt --output_dir outputs/policy [--merge_lora true]
    lit-align convert-pairs --input pairs.jsonl --output unpaired.jsonl
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import warnings
import zipfile
from typing import Literal

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from jsonargparse import set_parsing_settings  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402

from lit_align.backbone import ModelLoadError  # noqa: E402
from lit_align.data.datamodule import PreferenceDataModule  # noqa: E402
from lit_align.methods.alignment import AlignmentModule  # noqa: E402

# settings dataclasses document each field in an attribute docstring: show them in --help
set_parsing_settings(docstring_parse_attribute_docstrings=True)

LIGHTNING_CKPT_NAMES = ("best", "last", "hpc")  # --ckpt_path values Lightning resolves itself, not files

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
    """LightningCLI that validates once before ``fit`` and prints held-out accuracy before/after.

    Every trainer it builds also gets the reliability callbacks
    (:mod:`lit_align.callbacks.reliability`), after the configured ones: ``SaveOnSigterm`` (SIGTERM
    saves ``last.ckpt`` in the checkpoint folder, then the process exits with status 143) and
    ``NonFiniteLoss(action=<--nonfinite_loss>)``. A callback of either class listed under
    ``trainer.callbacks`` replaces the default one. Checkpoints are written atomically in their
    own folder (:class:`lit_align.atomic.AtomicCheckpointIO`).
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--validate_before_fit", type=bool, default=True, help="Run the held-out set once before training so the log shows where accuracy starts.")
        parser.add_argument("--nonfinite_loss", type=Literal["stop", "skip"], default="stop",
                            help="A NaN/inf training loss: stop with an error naming the step and batch, or skip that optimizer step "
                                 "(counted as train/skipped_nonfinite). A NonFiniteLoss callback under trainer.callbacks overrides this.")

    def instantiate_trainer(self, **kwargs):
        """The trainer, with the default reliability callbacks added unless configured, and
        :class:`lit_align.atomic.AtomicCheckpointIO` for Lightning's plain checkpoint writer."""
        from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

        from lit_align.atomic import AtomicCheckpointIO
        from lit_align.callbacks import NonFiniteLoss, SaveOnSigterm

        configured = kwargs.get("callbacks", self._get(self.config_init, "trainer", default={}).get("callbacks")) or []
        configured = list(configured) if isinstance(configured, (list, tuple)) else [configured]
        defaults = [SaveOnSigterm(), NonFiniteLoss(action=self._get(self.config_init, "nonfinite_loss", default="stop"))]
        kwargs["callbacks"] = configured + [cb for cb in defaults if not any(isinstance(c, type(cb)) for c in configured)]
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # checkpoints written in place, atomically
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def parse_arguments(self, parser, args) -> None:
        """Parse, then check ``--ckpt_path`` is a readable checkpoint (before Lightning unpickles it)."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and ckpt_path not in LIGHTNING_CKPT_NAMES and not ckpt_path.startswith("registry") and "://" not in ckpt_path:
            read_checkpoint(ckpt_path, f"lit-align {subcommand}", weights_only=True)  # as Lightning reads it next

    def instantiate_classes(self) -> None:
        """As LightningCLI's, but a model that cannot be loaded raises its own :class:`ModelLoadError`,
        not the parser's "does not validate against any of the Union subtypes" around it."""
        try:
            super().instantiate_classes()
        except ValueError as error:
            cause = error.__cause__
            while cause is not None and not isinstance(cause, ModelLoadError):
                cause = cause.__cause__
            if cause is None:
                raise
            raise cause from None

    def fit(self, model, datamodule=None, **kwargs) -> None:
        """``trainer.fit``; resuming mid-epoch with a lit-align data module, Lightning's warning
        that the dataloader "is not resumable" is silenced: its sampler skips the batches the
        checkpointed epoch already trained on (:mod:`lit_align.data.sampling`)."""
        with warnings.catch_warnings():
            if isinstance(datamodule, PreferenceDataModule):
                warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
            self.trainer.fit(model, datamodule=datamodule, **kwargs)

    def before_fit(self) -> None:
        self._before = None
        if self.config[self.subcommand].get("validate_before_fit"):
            from lightning.pytorch.strategies import FSDPStrategy

            if isinstance(self.trainer.strategy, FSDPStrategy):
                # FSDP flattens the module's parameters in place: a wrapper built for validate
                # leaves them sharded for the one fit builds; the first validation of fit shows the start
                print("validate_before_fit skipped under FSDP", flush=True)
                return
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
    try:
        path = module.export_hf(args.output_dir, merge_lora=args.merge_lora)
    except OSError as error:  # disk full, permissions: the export is staged, so nothing was replaced
        raise SystemExit(f"lit-align export: writing {args.output_dir!r} failed ({error}); "
                         f"its previous contents, if any, are unchanged") from error
    print(f"exported to {path}")


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
    checkpoint = read_checkpoint(ckpt_path, "lit-align export", weights_only=False)
    module_name, _, class_name = checkpoint.get("lit_align_class", "").partition(":")
    if not class_name:
        raise SystemExit(f"lit-align export: {ckpt_path!r} was not written by a lit-align module")
    cls = importlib.import_module(module_name)
    for part in class_name.split("."):
        cls = getattr(cls, part)
    if os.path.isdir(ckpt_path):  # a sharded FSDP checkpoint: consolidated into a temporary file first
        import tempfile

        import torch

        with tempfile.TemporaryDirectory() as folder:
            consolidated = os.path.join(folder, "consolidated.ckpt")
            torch.save(checkpoint, consolidated)
            return cls.load_from_checkpoint(consolidated, map_location="cpu")
    return cls.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=False)  # read with weights_only=False above too


def read_checkpoint(ckpt_path: str, command: str, weights_only: bool) -> dict:
    """The checkpoint at ``ckpt_path`` (tensors memory-mapped, not read), or ``SystemExit`` naming
    the file when it is missing, truncated or not a Lightning checkpoint."""
    import torch

    if os.path.isdir(ckpt_path):
        return read_sharded_checkpoint(ckpt_path, command, consolidate=not weights_only)
    if not os.path.isfile(ckpt_path):
        raise SystemExit(f"{command}: checkpoint {ckpt_path!r} does not exist")
    archive = zipfile.is_zipfile(ckpt_path)  # torch.save writes zip archives; one cut short is not
    try:  # anything else is still tried, as a legacy (pre zip) torch file
        checkpoint = torch.load(ckpt_path, map_location="cpu", mmap=archive, weights_only=weights_only)
    except Exception as error:  # pickle, zip and torch raise many types; the file is what matters
        reason = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}" if archive else \
            "not a zip archive as torch.save writes: empty, truncated or another kind of file"
        raise SystemExit(f"{command}: checkpoint {ckpt_path!r} cannot be read ({reason})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise SystemExit(f"{command}: {ckpt_path!r} is not a Lightning checkpoint (it has no state_dict)")
    return checkpoint


def read_sharded_checkpoint(ckpt_path: str, command: str, consolidate: bool) -> dict:
    """A sharded FSDP checkpoint folder (``state_dict_type: sharded``): checked for its metadata
    and, if ``consolidate``, gathered into one ordinary Lightning checkpoint dict in memory."""
    from pathlib import Path

    if not (Path(ckpt_path) / ".metadata").is_file() or not (Path(ckpt_path) / "meta.pt").is_file():
        raise SystemExit(f"{command}: {ckpt_path!r} is a folder but not a sharded checkpoint (no .metadata and meta.pt in it)")
    if not consolidate:
        return {"state_dict": None}
    from lightning.fabric.utilities.load import _load_distributed_checkpoint
    from lightning.pytorch.utilities.consolidate_checkpoint import _format_checkpoint

    try:
        return _format_checkpoint(_load_distributed_checkpoint(Path(ckpt_path)))
    except Exception as error:
        raise SystemExit(f"{command}: sharded checkpoint {ckpt_path!r} cannot be read ({type(error).__name__}: {error})") from None


def main(argv: list[str] | None = None) -> None:
    """Entry point; ``argv`` defaults to the command line."""
    words = sys.argv[1:] if argv is None else argv
    commands = {"export": export_main, "convert-pairs": convert_pairs_main}
    if words[:1] and words[0] in commands:
        commands[words[0]](words[1:])
        return
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
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
    except SIGTERMException:
        # Lightning stopped at a batch boundary and SaveOnSigterm saved a checkpoint; a non-zero
        # status (as if killed by SIGTERM) tells schedulers the run did not finish
        sys.exit(128 + signal.SIGTERM)


if __name__ == "__main__":
    main()
