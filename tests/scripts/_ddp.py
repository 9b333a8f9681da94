"""The trainer every two-process test script runs: DDP over gloo on CPU, no logging, no validation."""

from typing import Any

import lightning as L


def two_process_trainer(max_steps: int, devices: int = 2, strategy: Any = "ddp") -> L.Trainer:
    """Two CPU processes under DDP (gloo; or ``devices`` processes under ``strategy``),
    ``max_steps`` optimizer steps, nothing written."""
    return L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
