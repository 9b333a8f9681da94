"""``lit-align``: LightningCLI over the methods and data modules, plus ``export``, ``convert-pairs``,
``generate`` and ``eval`` (:mod:`lit_align.commands`).

lit-align fit --config configs/dpo.yaml [--model.beta 0.2]
lit-align validate|test --config configs/dpo.yaml [--ckpt_path ...]
lit-align export --ckpt_path runs/.../last.ckpt --output_dir outputs/policy [--merge_lora true]
lit-align convert-pairs --input pairs.jsonl --output unpaired.jsonl
lit-align plot runs/lightning_logs/version_0 [runs/lightning_logs/version_1 ...] [--output curves.png]
lit-align generate --model runs/.../last.ckpt --prompt TEXT [--prompt TEXT ...] | --prompts FILE [--output out.jsonl]
lit-align eval --model runs/.../last.ckpt|outputs/policy --data FILE [--reward CLASS|FOLDER] [--baseline MODEL]
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import re
import signal
import sys
import warnings
from pathlib import Path
from typing import Annotated, Literal

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from jsonargparse import Namespace, set_parsing_settings  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402

from lit_align.callbacks import Curves, NonFiniteLoss, Samples, SaveOnSigterm  # noqa: E402
from lit_align.commands import COMMANDS, evaluate, generate  # noqa: E402
from lit_align.commands.parser import LitAlignParser  # noqa: E402
from lit_align.commands.plot import plot_main  # noqa: E402
from lit_align.data.datamodule import AlignmentDataModule  # noqa: E402
from lit_align.data.unpaired import convert_pairs_file  # noqa: E402
from lit_align.errors import (  # noqa: E402
    DEBUG_VARIABLE,
    CheckpointError,
    LitAlignError,
    SettingError,
    debugging,
    error_chain,
    find_lit_align_error,
)
from lit_align.methods.alignment import AlignmentModule  # noqa: E402
from lit_align.report.model_card import record_from_checkpoint  # noqa: E402
from lit_align.runtime.atomic import AtomicCheckpointIO, unwritable  # noqa: E402
from lit_align.runtime.checkpoints import load_module_from_checkpoint, read_checkpoint  # noqa: E402
from lit_align.runtime.lightning_internals import RichProgressBarUnlimitedEpochs  # noqa: E402
from lit_align.settings import Range, check_values  # noqa: E402

# settings dataclasses document each field in an attribute docstring: show them in --help
set_parsing_settings(docstring_parse_attribute_docstrings=True)

log = logging.getLogger(__name__)
TRAINER_RANGES = {
    "accumulate_grad_batches": Annotated[int, Range(1)],
    "val_check_interval": Annotated[float, Range(0, low_open=True)],
    "check_val_every_n_epoch": Annotated[int, Range(1)],
    "log_every_n_steps": Annotated[int, Range(1)],
    "gradient_clip_val": Annotated[float, Range(0)],
    "max_steps": Annotated[int, Range(-1)],
    "min_steps": Annotated[int, Range(0)],
    "num_sanity_val_steps": Annotated[int, Range(-1)],
}
"""Ranges of Trainer settings that Lightning takes without checking and then fails on mid-run
(0 for accumulate_grad_batches or val_check_interval divides by zero; a negative
gradient_clip_val would flip the gradients): checked before anything is built."""
DESCRIPTION = (
    "Train language models with alignment methods. The commands: fit, validate and test (LightningCLI's, "
    "e.g. lit-align fit --config configs/dpo.yaml), export, convert-pairs, generate, eval and plot "
    "(lit-align COMMAND --help for each)."
)
"""What ``lit-align --help`` says first (LightningCLI's parser lists only fit, validate and test)."""
NO_PREDICT = LitAlignError(
    "no such command: lit-align methods have no predict_step (the commands are fit, validate, test, export, "
    "convert-pairs, generate, eval and plot)"
)
NO_PREDICT.hint = (
    "to generate with a trained policy: lit-align generate --model runs/.../last.ckpt --prompt TEXT (or --prompts FILE)"
)
LIGHTNING_CKPT_NAMES = ("best", "last", "hpc")  # --ckpt_path values Lightning resolves itself, not files
DEFAULT_RUN_FOLDER = "runs"

TRAINER_DEFAULTS = {
    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": DEFAULT_RUN_FOLDER}},
    "accelerator": "auto",
    "num_sanity_val_steps": 0,
    # no_grad instead of inference_mode for evaluation: metric states are shared between the
    # validation before fit and the validations during fit, and inference tensors cannot be
    # updated outside inference mode
    "inference_mode": False,
}


class LitAlignCLI(LightningCLI):
    """LightningCLI that validates once before ``fit`` and prints held-out accuracy before/after.

    Every trainer it builds also gets, after the configured callbacks, the reliability callbacks
    (:mod:`lit_align.callbacks.reliability`): ``SaveOnSigterm`` (SIGTERM saves ``last.ckpt`` in the
    checkpoint folder, then the process exits with status 143) and
    ``NonFiniteLoss(action=<--nonfinite_loss>)``; and what a person looks at:
    ``Samples(count=<--samples>)`` (held-out completions at every validation) and ``Curves``
    (``curves.png`` in the run folder, unless ``--curves false``). A callback of any of these
    classes listed under ``trainer.callbacks`` replaces the default one. Checkpoints are written atomically in their
    own folder (:class:`lit_align.runtime.atomic.AtomicCheckpointIO`).
    """

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's subcommands but ``predict``: no lit-align method has a ``predict_step``
        (:data:`NO_PREDICT` says what to do instead)."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name != "predict"}

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--validate_before_fit",
            type=bool,
            default=True,
            help="Run the held-out set once before training so the log shows where accuracy starts (not when"
            " resuming from --ckpt_path: the run that wrote the checkpoint logged its score).",
        )
        parser.add_argument(
            "--samples",
            type=Annotated[int, Range(0)],
            default=8,
            help="Held-out prompts the policy completes at every validation, written to <run folder>/samples/"
            "step_<k>.jsonl and sent to the logger (0: none). A Samples callback under trainer.callbacks overrides "
            "this.",
        )
        parser.add_argument(
            "--curves",
            type=bool,
            default=True,
            help="Draw the run's curves into <run folder>/curves.png at every validation and when fit ends "
            "(values in curves.jsonl). A Curves callback under trainer.callbacks overrides this.",
        )
        parser.add_argument(
            "--nonfinite_loss",
            type=Literal["stop", "skip"],
            default="stop",
            help="A NaN/inf training loss: stop with an error naming the step and batch, or skip that optimizer step "
            "(counted as train/skipped_nonfinite). A NonFiniteLoss callback under trainer.callbacks overrides this.",
        )

    def instantiate_trainer(self, **kwargs):
        """The trainer, with the default reliability callbacks added unless configured, and
        :class:`lit_align.runtime.atomic.AtomicCheckpointIO` for Lightning's plain checkpoint writer."""
        from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

        init = self.config_init.get(str(self.subcommand), self.config_init)  # the subcommand's part, if any
        configured = kwargs.get("callbacks", (init.get("trainer") or {}).get("callbacks")) or []
        configured = list(configured) if isinstance(configured, (list, tuple)) else [configured]
        defaults = [SaveOnSigterm(), NonFiniteLoss(action=init.get("nonfinite_loss") or "stop")]
        samples = init.get("samples", 8)
        if samples:
            defaults.append(Samples(count=samples))
            defaults[-1].default = True
        if init.get("curves", True):
            defaults.append(Curves())
        kwargs["callbacks"] = configured + [
            cb for cb in defaults if not any(isinstance(c, type(cb)) for c in configured)
        ]
        if _draws_lightnings_rich_bar(kwargs, init.get("trainer") or {}):
            kwargs["callbacks"].append(RichProgressBarUnlimitedEpochs())
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # checkpoints written in place, atomically
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def parse_arguments(self, parser, args) -> None:
        """Parse, then check ``--ckpt_path`` (before Lightning unpickles it and replaces the model's
        settings with the checkpoint's): a readable Lightning checkpoint of the configured method.
        Every setting the checkpoint's hyper-parameters replace is reported."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if (
            ckpt_path
            and ckpt_path not in LIGHTNING_CKPT_NAMES
            and not ckpt_path.startswith("registry")
            and "://" not in ckpt_path
        ):
            checkpoint = read_checkpoint(ckpt_path, weights_only=True)  # as Lightning reads it next
            check_checkpoint_method(checkpoint, ckpt_path, self.config[subcommand].get("model"))
            report_checkpoint_overrides(checkpoint, ckpt_path, self.config[subcommand].get("model"))

    def before_instantiate_classes(self) -> None:
        """Before any model or data is loaded: the Trainer settings Lightning does not check
        (:data:`TRAINER_RANGES`), the run folder (``trainer.default_root_dir``, when set, also
        holds the default logger's runs instead of ``./runs``) and checkpoint folders can be written."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.get("trainer")
        if trainer is None:
            return
        check_trainer_settings(trainer)
        check_writable_folders(trainer)

    def instantiate_classes(self) -> None:
        """As LightningCLI's, but an error a constructor raises on purpose (a setting out of its
        range, a model that cannot be loaded) reaches the user as itself, not inside the parser's
        "does not validate against any of the Union subtypes" and a dump of the whole namespace."""
        try:
            super().instantiate_classes()
        except Exception as error:
            ours = find_lit_align_error(error)
            if ours is None:
                raise
            if isinstance(ours, SettingError) and ours.hint is None:
                key = config_key(self.config[self.subcommand] if self.subcommand else self.config, ours)
                if key is not None:
                    ours.hint = (
                        f"change {key} in the YAML"
                        if "[" in key
                        else f"change {key} (in the YAML, or --{key} on the command line)"
                    )
            raise ours from None

    def fit(self, model, datamodule=None, **kwargs) -> None:
        """``trainer.fit``; resuming mid-epoch with a lit-align data module, Lightning's warning
        that the dataloader "is not resumable" is silenced: its sampler skips the batches the
        checkpointed epoch already trained on (:mod:`lit_align.data.sampling`)."""
        with warnings.catch_warnings():
            if isinstance(datamodule, AlignmentDataModule):
                warnings.filterwarnings(
                    "ignore", message="You're resuming from a checkpoint that ended before the epoch ended"
                )
            self.trainer.fit(model, datamodule=datamodule, **kwargs)

    def before_fit(self) -> None:
        self._before = None
        if self.config[self.subcommand].get("validate_before_fit"):
            from lightning.pytorch.strategies import FSDPStrategy

            if isinstance(self.trainer.strategy, FSDPStrategy):
                # FSDP flattens the module's parameters in place: a wrapper built for validate
                # leaves them sharded for the one fit builds; the first validation of fit shows the start
                from lightning.pytorch.utilities.rank_zero import rank_zero_only

                if rank_zero_only.rank == 0:  # every process runs this CLI; one line is enough
                    print("validate_before_fit skipped under FSDP", flush=True)
                return
            if self.config[self.subcommand].get("ckpt_path"):
                # the model here is the freshly built one, not the checkpoint's: its score would be
                # the start of the first run, not of this one (which that run already logged)
                print("validate_before_fit skipped when resuming from --ckpt_path", flush=True)
                return
            results = self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
            self._before = results[0] if results else None

    def after_fit(self) -> None:
        metric = self.model.headline_metric
        after = self.trainer.callback_metrics.get(metric)
        if not self.trainer.is_global_zero:
            return
        if after is not None:
            before = "" if not self._before else f"{self._before[metric]:.3f} -> "
            print(f"held-out {metric}: {before}{float(after):.3f}", flush=True)
        line = run_folder_line(self.trainer.logger)
        if line:
            print(line, flush=True)


RUN_FILES = ("curves.png", "samples", "metrics.csv", "checkpoints")
"""What a person looks at in a run's folder, in the order the closing line names them."""


def run_folder_line(logger) -> str | None:
    """The closing line that says where the run's curves, samples, metrics and checkpoints went (the
    logger's folder, as process 0 sees it: ``Trainer.log_dir`` would be a collective), or None when
    nothing was logged there."""
    folder = getattr(logger, "log_dir", None)
    if not folder or not Path(folder).is_dir():
        return None
    found = [
        name + ("/" if (Path(folder) / name).is_dir() else "") for name in RUN_FILES if (Path(folder) / name).exists()
    ]
    return f"run folder: {folder}" + (f" ({', '.join(found)})" if found else "")


def _draws_lightnings_rich_bar(kwargs: dict, trainer_init: dict) -> bool:
    """Whether the trainer built from ``kwargs`` (and the config's ``trainer``) would get Lightning's
    default Rich progress bar: the bar is enabled, no progress bar is configured, and ``rich`` is
    installed (Lightning draws its tqdm bar otherwise)."""
    from lightning.pytorch.callbacks import ProgressBar

    enabled = kwargs.get("enable_progress_bar", trainer_init.get("enable_progress_bar"))
    configured_bar = any(isinstance(c, ProgressBar) for c in kwargs["callbacks"])
    return enabled is not False and not configured_bar and importlib.util.find_spec("rich") is not None


def export_main(argv: list[str]) -> None:
    """``lit-align export``: a checkpoint of any lit-align module to a Hugging Face folder."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(
        prog="lit-align export", description="Export a trained policy (and tokenizer) as a Hugging Face folder."
    )
    parser.add_argument("--ckpt_path", type=str, required=True, help="Lightning checkpoint written by lit-align fit.")
    parser.add_argument("--output_dir", type=str, required=True, help="Destination folder (written atomically).")
    parser.add_argument(
        "--merge_lora",
        type=bool,
        default=False,
        help="With LoRA: merge adapters into the base weights instead of saving the adapter only.",
    )
    args = parser.parse_args(argv)
    module = load_module_from_checkpoint(args.ckpt_path)
    try:  # its metadata only; a checkpoint whose settings need full unpickling was already read that way above
        stored = read_checkpoint(args.ckpt_path, weights_only=True)
    except CheckpointError:
        stored = read_checkpoint(args.ckpt_path, weights_only=False)
    run = record_from_checkpoint(stored, module, args.ckpt_path)
    try:
        path = module.export_hf(args.output_dir, merge_lora=args.merge_lora, run=run)
    except OSError as error:  # disk full, permissions: the export is staged, so nothing was replaced
        raise SystemExit(
            f"lit-align export: writing {args.output_dir!r} failed ({error}); "
            f"its previous contents, if any, are unchanged"
        ) from error
    print(f"exported to {path}")


def convert_pairs_main(argv: list[str]) -> None:
    """``lit-align convert-pairs``: paired preference data to unpaired {prompt, completion, label} JSONL."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(
        prog="lit-align convert-pairs",
        description="Write each preference pair as a desirable (chosen) and an undesirable (rejected) example.",
    )
    parser.add_argument(
        "--input",
        type=str,
        required=True,
        help="Paired data: a file, saved datasets folder or hub name (any paired format).",
    )
    parser.add_argument("--output", type=str, required=True, help="Unpaired JSONL to write (atomically).")
    parser.add_argument(
        "--format",
        type=str,
        default="auto",
        help="Paired format: auto, explicit, conversational, implicit or transcript.",
    )
    parser.add_argument(
        "--split", type=str, default="train", help="Split to read from a hub dataset or saved DatasetDict."
    )
    args = parser.parse_args(argv)
    count, skipped = convert_pairs_file(args.input, args.output, format=args.format, split=args.split)
    print(f"wrote {count} unpaired records to {args.output} ({skipped} pairs skipped: empty or identical responses)")


def generate_main(argv: list[str]) -> None:
    """``lit-align generate``: completions of prompts (:mod:`lit_align.commands.generate`)."""
    generate.main(argv)


def evaluate_main(argv: list[str]) -> None:
    """``lit-align eval``: held-out metrics of a checkpoint or export (:mod:`lit_align.commands.evaluate`)."""
    evaluate.main(argv)


LIGHTNING_PYTREE_DEPRECATION = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


def main(argv: list[str] | None = None) -> None:
    """Entry point; ``argv`` defaults to the command line.

    The current folder is importable, as with ``python -m``: a ``class_path`` such as
    ``my_losses.MarginDPO`` finds ``my_losses.py`` next to where ``lit-align`` runs. An error lit-align
    raises on purpose (:class:`lit_align.errors.LitAlignError`) ends the run with its message and a
    hint on stderr and exit status 1, no traceback (``LIT_ALIGN_DEBUG=1`` shows it)."""
    words = sys.argv[1:] if argv is None else argv
    show_lit_align_logs()
    hide_lightning_product_tips()
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    command = next((word for word in words if word in COMMANDS), "")
    if words[:1] == ["predict"]:  # Lightning's subcommand, removed: say why and what to do instead
        raise SystemExit(f"lit-align predict: {NO_PREDICT}\nhint: {NO_PREDICT.hint}")
    try:
        with warnings.catch_warnings():
            # Lightning 2.6's pytree helper calls a torch API that torch 2.13 deprecates, at every
            # fit and validate: a note for Lightning's developers, not for whoever runs lit-align
            warnings.filterwarnings("ignore", message=LIGHTNING_PYTREE_DEPRECATION)
            run(words, from_command_line=argv is None)
    except Exception as error:
        ours = find_lit_align_error(error) or lightning_configuration_error(error) or missing_package_error(error)
        if ours is None or debugging():
            raise
        raise SystemExit(error_text(command, ours)) from None


def show_lit_align_logs() -> None:
    """lit-align's INFO lines (reference precompute, skipped records, progress without a terminal)
    on stderr, as Lightning shows its own: one handler on the ``lit_align`` logger, added once."""
    logger = logging.getLogger("lit_align")
    if not any(getattr(handler, "lit_align", False) for handler in logger.handlers):
        handler = logging.StreamHandler()
        handler.lit_align = True
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


class DropLightningTips(logging.Filter):
    """Drops Lightning's "💡 Tip:" lines (install litlogger, install litmodels), printed at every
    fit: advertisements for its cloud services, not about the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


LIGHTNING_INFO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
"""The loggers Lightning's ``rank_zero_info`` writes to (whichever of its modules was imported last)."""


def hide_lightning_product_tips() -> None:
    """Add :class:`DropLightningTips` to Lightning's info loggers, once."""
    for name in LIGHTNING_INFO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(existing, DropLightningTips) for existing in logger.filters):
            logger.addFilter(DropLightningTips())


def lightning_configuration_error(error: BaseException) -> LitAlignError | None:
    """Lightning's own refusal of a configuration (``MisconfigurationException``, e.g. a negative
    ``limit_val_batches``) as a message to print like ours, or None for any other error."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    refusal = next((link for link in error_chain(error) if isinstance(link, MisconfigurationException)), None)
    return None if refusal is None else SettingError(None, None, f"Lightning: {refusal}")


def missing_package_error(error: BaseException) -> LitAlignError | None:
    """A configured class that needs a package that is not installed (``--trainer.logger
    WandbLogger`` without ``wandb``, a user's module importing one) as one message naming the class
    and the package, with the install command as the hint, instead of the parser's dump of every
    type the setting accepts; None when no ``ModuleNotFoundError`` is behind ``error``."""
    chain = error_chain(error)
    missing = next((link for link in chain if isinstance(link, ModuleNotFoundError)), None)
    if missing is None:
        return None
    found = (re.search(r"Problem with given class_path '([^']+)'", str(link)) for link in chain)
    owner = next((match.group(1) for match in found if match), None)
    # Lightning's loggers say "Requirement 'wandb>=0.12.10' not met. HINT: Try running `pip install ...`"
    text, _, lightning_hint = str(missing).partition(" HINT: ")
    install = re.search(r"`(pip install [^`]+)`", lightning_hint)
    hint = install.group(1) if install else (f"pip install {missing.name}" if missing.name else None)
    where = f"{owner} needs a package that is not installed: " if owner else ""
    return SettingError(None, None, f"{where}{text.rstrip('.')}", hint=hint)


def run(words: list[str], from_command_line: bool = False) -> None:
    """Dispatch ``words`` (the arguments after ``lit-align``) to a command (``from_command_line``:
    they are ``sys.argv[1:]``, which LightningCLI reads itself)."""
    commands = {
        "export": export_main,
        "convert-pairs": convert_pairs_main,
        "generate": generate_main,
        "eval": evaluate_main,
        "plot": plot_main,
    }
    if words[:1] and words[0] in commands:
        commands[words[0]](words[1:])
        return
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        LitAlignCLI(
            AlignmentModule,
            AlignmentDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            trainer_defaults=TRAINER_DEFAULTS,
            save_config_kwargs={"overwrite": True},
            args=None if from_command_line else words,
            parser_class=LitAlignParser,
            parser_kwargs={"prog": "lit-align", "description": DESCRIPTION},
        )
    except SIGTERMException:
        # Lightning stopped at a batch boundary and SaveOnSigterm saved a checkpoint; a non-zero
        # status (as if killed by SIGTERM) tells schedulers the run did not finish
        sys.exit(128 + signal.SIGTERM)


def error_text(command: str, error: LitAlignError) -> str:
    """What ``lit-align COMMAND`` prints for one of its own errors: the message on one line, then
    a hint line (the error's own hint, and how to see the traceback)."""
    message = " ".join(str(error).split("\n"))
    debug = f"{DEBUG_VARIABLE}=1 shows the traceback"
    hint = f"hint: {error.hint}; {debug}" if error.hint else f"({debug})"
    return f"lit-align{' ' + command if command else ''}: {message}\n{hint}"


# ---- the trainer's settings and folders -----------------------------------------------------------
def check_trainer_settings(trainer: Namespace) -> None:
    """:class:`SettingError` for a Trainer setting out of :data:`TRAINER_RANGES`."""
    try:
        check_values("Trainer", TRAINER_RANGES, {name: trainer.get(name) for name in TRAINER_RANGES})
    except SettingError as error:
        error.hint = f"change trainer.{error.setting} (in the YAML, or --trainer.{error.setting} on the command line)"
        raise


def check_writable_folders(trainer: Namespace) -> None:
    """Point the default logger at ``default_root_dir`` when that is set, then check that the run
    folder and every ``ModelCheckpoint`` folder can be written (:class:`SettingError` naming the
    folder and the setting)."""
    logger = trainer.get("logger")
    init = logger.get("init_args") if isinstance(logger, Namespace) else None
    root = trainer.get("default_root_dir")
    folders = [(root or os.getcwd(), "trainer.default_root_dir", "run")]
    if init is not None and init.get("save_dir"):
        if root and init["save_dir"] == DEFAULT_RUN_FOLDER:
            init["save_dir"] = root
        else:
            folders = [(init["save_dir"], "trainer.logger.init_args.save_dir", "run")]
    for path, node in _walk(trainer.get("callbacks"), "trainer.callbacks"):
        if isinstance(node, Namespace) and str(node.get("class_path", "")).endswith("ModelCheckpoint"):
            dirpath = (node.get("init_args") or Namespace()).get("dirpath")
            if dirpath:
                folders.append((dirpath, f"{path}.init_args.dirpath", "checkpoint"))
    for folder, setting, kind in folders:
        problem = unwritable(folder)
        if problem:
            raise SettingError(
                None,
                setting,
                f"the {kind} folder {str(folder)!r} cannot be written ({problem}); "
                f"set {setting} to a folder you can write",
            )


# ---- checkpoints given to fit/validate/test ------------------------------------------------------
def check_checkpoint_method(checkpoint: dict, ckpt_path: str, model_config: Namespace | None) -> None:
    """Refuse a checkpoint written by another method than the configured one: Lightning would
    replace the configured class with the checkpoint's and silently train that."""
    recorded = checkpoint.get("lit_align_class") or ""
    configured = model_config.get("class_path") if isinstance(model_config, Namespace) else None
    if not configured or not recorded:
        return
    try:
        module_name, _, name = configured.rpartition(".")
        configured_class = getattr(importlib.import_module(module_name), name)
        same = f"{configured_class.__module__}:{configured_class.__qualname__}" == recorded
    except (ImportError, AttributeError, ValueError):  # the parser already named a class it cannot import
        same = configured.rpartition(".")[2] == recorded.rpartition(".")[2].rpartition(":")[2]
    if not same:
        written_by = recorded.replace(":", ".")
        error = CheckpointError(
            f"checkpoint {ckpt_path!r} was written by {written_by}, but the config trains {configured}; "
            "resuming would run the checkpoint's method instead"
        )
        error.hint = (
            f"use the config of {written_by.rpartition('.')[2]} with this checkpoint, or start without --ckpt_path"
        )
        raise error


def report_checkpoint_overrides(checkpoint: dict, ckpt_path: str, model_config: Namespace | None) -> list[str]:
    """Log (once, on process 0) every model setting whose configured value the checkpoint's
    hyper-parameters replace; Lightning's CLI restores those on resume. Returns the lines logged."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    stored = checkpoint.get("hyper_parameters") or {}
    given = model_config.get("init_args") if isinstance(model_config, Namespace) else None
    if not stored or given is None:
        return []
    given = _flat(given.as_dict() if isinstance(given, Namespace) else dict(given))
    lines = [
        f"  model.init_args.{key}: {given[key]!r} configured, {value!r} from the checkpoint"
        for key, value in _flat({k: v for k, v in stored.items() if not k.startswith("_")}).items()
        if key in given and _plain(given[key]) != _plain(value)
    ]
    if lines and rank_zero_only.rank == 0:
        log.warning(
            "resuming from %s: the checkpoint's hyper-parameters replace %d configured setting(s):\n%s",
            ckpt_path,
            len(lines),
            "\n".join(lines),
        )
    return lines


def _flat(values: dict, prefix: str = "") -> dict:
    """Nested dicts as one dict with dotted keys."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _plain(value):
    """``value`` with tuples as lists (a checkpoint stores a tuple setting as a list)."""
    if isinstance(value, (tuple, list)):
        return [_plain(item) for item in value]
    return value


def config_key(config: Namespace, error: SettingError) -> str | None:
    """Where in the parsed config the setting of ``error`` is written, e.g. ``model.init_args.beta``
    for ``DPO``'s ``beta``: below the entry whose ``class_path`` names the error's owner, or the one
    config key ending in the setting's name. None when neither is found."""
    if not error.setting:
        return None
    entries = list(_walk(config))
    if error.owner:
        for path, node in entries:
            if isinstance(node, Namespace) and str(node.get("class_path") or "").rpartition(".")[2] == error.owner:
                # settings dataclasses in a union (the built-in task) are written without init_args
                nested = "" if _is_dataclass_path(node.get("class_path")) else "init_args."
                return f"{path}.{nested}{error.setting}"
    matches = [path for path, _ in entries if path == error.setting or path.endswith("." + error.setting)]
    return matches[0] if len(matches) == 1 else None


def _is_dataclass_path(class_path: str) -> bool:
    """Whether ``class_path`` (``module.Name``) names a dataclass."""
    module, _, name = class_path.rpartition(".")
    try:
        return dataclasses.is_dataclass(getattr(importlib.import_module(module), name))
    except (ImportError, AttributeError, ValueError):
        return False


def _walk(node, path: str = ""):
    """(dotted path, value) of every entry of a parsed config, depth first."""
    if isinstance(node, Namespace):
        node = node.__dict__
    if isinstance(node, dict):
        for key, value in node.items():
            child = f"{path}.{key}" if path else key
            yield child, value
            yield from _walk(value, child)
    elif isinstance(node, list):
        for position, value in enumerate(node):
            child = f"{path}[{position}]"
            yield child, value
            yield from _walk(value, child)


if __name__ == "__main__":
    main()
