"""The run's curves as a picture in its folder: ``curves.png`` (and the values, ``curves.jsonl``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from lightning import Callback, Trainer

from lit_align.methods.alignment import AlignmentModule
from lit_align.report.curves import FIGURE_FILE, HISTORY_FILE, Record, draw
from lit_align.runtime.atomic import atomic_write_text

log = logging.getLogger(__name__)


class Curves(Callback):
    """Record the logged training metrics (every ``trainer.log_every_n_steps`` steps), the
    learning rate and each validation's metrics, whatever the logger; write them to
    ``<run folder>/curves.jsonl`` at every validation, and at the end of ``fit`` (also when it
    stops on an error) draw ``<run folder>/curves.png``: loss, preference accuracy or reward,
    margins, KL where logged, learning rate (:mod:`lit_align.report.curves`).
    ``lit-align plot RUN_DIR [RUN_DIR...]`` draws a run still in progress, or several runs on one
    figure, from the same files.

    ``lit-align fit`` adds one (``--curves false`` leaves it out); one under ``trainer.callbacks``
    replaces it. Only process 0 records and writes.
    """

    def __init__(self):
        self.history: list[Record] = []
        self._last_train_step = -1
        self.folder = Path(".")
        """The run folder (set in ``setup``)."""

    def setup(self, trainer: Trainer, pl_module: AlignmentModule, stage: str) -> None:
        # every process asks: Trainer.log_dir broadcasts process 0's folder (a collective), so it
        # cannot be asked later by process 0 alone
        self.folder = Path(trainer.log_dir or trainer.default_root_dir)

    @property
    def state_key(self) -> str:
        return "Curves"

    def state_dict(self) -> dict:
        """The history so far, so a resumed run's picture starts at step 0."""
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))

    def on_train_batch_end(self, trainer: Trainer, pl_module: AlignmentModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or step == self._last_train_step or step % trainer.log_every_n_steps:
            return
        self._last_train_step = step
        record = {"step": step, **_scalars(trainer, "train/")}
        groups = trainer.optimizers[0].param_groups if trainer.optimizers else []
        if groups and "lr" in groups[0]:  # TRPO's placeholder optimizer has no parameter groups
            record["lr"] = float(groups[0]["lr"])
        self.history.append(record)

    def on_validation_end(self, trainer: Trainer, pl_module: AlignmentModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        values = _scalars(trainer, "val/")
        if values:
            self.history.append({"step": trainer.global_step, **values})
            self.write(trainer, figure=False)

    def on_fit_end(self, trainer: Trainer, pl_module: AlignmentModule) -> None:
        if trainer.is_global_zero:
            self.write(trainer)

    def on_exception(self, trainer: Trainer, pl_module: AlignmentModule, exception: BaseException) -> None:
        if trainer.is_global_zero and self.history:
            try:
                self.write(trainer)
            except Exception as error:  # the run's own error is the one to report
                log.warning("could not draw the curves after the error: %s", error)

    def write(self, trainer: Trainer, figure: bool = True) -> Path | None:
        """Write ``curves.jsonl`` (and with ``figure``, ``curves.png``) in the run folder; the
        figure's path, if drawn."""
        if not self.history:
            return None
        folder = self.folder
        atomic_write_text("".join(json.dumps(record) + "\n" for record in self.history), folder / HISTORY_FILE)
        return draw({folder.name: self.history}, folder / FIGURE_FILE, title=_title(trainer)) if figure else None


def _scalars(trainer: Trainer, prefix: str) -> Record:
    """The one-number metrics under ``prefix`` Lightning holds now."""
    return {
        key: float(value)
        for key, value in trainer.callback_metrics.items()
        if key.startswith(prefix) and getattr(value, "numel", lambda: 1)() == 1
    }


def _title(trainer: Trainer) -> str:
    module = trainer.lightning_module
    settings = getattr(module, "model_settings", None)
    model = f" on {settings.name_or_path}" if settings is not None else ""
    return f"{type(module).__name__}{model}"
