"""Throughput and MFU logging: Lightning's ThroughputMonitor fed with lit-align's analytic FLOPs."""

from __future__ import annotations

from typing import Annotated, Optional

from lightning.pytorch.callbacks import ThroughputMonitor

from lit_align.errors import SettingError
from lit_align.methods.alignment import AlignmentModule
from lit_align.runtime.lightning_internals import throughput_meters
from lit_align.settings import Positive, Range, check_arguments


class Throughput(ThroughputMonitor):
    """Logs samples, tokens and FLOPs per second, and MFU, every ``log_every_n_steps``.

    Samples and tokens are counted by the method (``batch_samples``/``batch_tokens`` of
    :class:`lit_align.methods.alignment.AlignmentModule`): a sample is a pair (paired methods and
    the reward model on pairs), a completion (unpaired; mismatched KL rows are not samples), a
    ranked list (listwise), a demonstration (SFT) or a sampled completion (on-policy); tokens are
    the real tokens the policy processed (every row, prompt and response; for on-policy methods
    the rollout's prompts and completions).

    FLOPs per batch come from the module's ``flops_per_batch`` (analytic, :mod:`lit_align.model.flops`).
    MFU needs the peak FLOP/s of one device: Lightning knows common GPUs; on a CPU, or to override,
    give ``peak_flops`` (e.g. 157e9 for the 2-core AVX2 CPU these docs were measured on).

    Args:
        peak_flops: peak FLOP/s of one device at the training dtype; unset = Lightning's table.
        window_size: number of batches in the moving average.
    """

    def __init__(self, peak_flops: Optional[Positive] = None, window_size: Annotated[int, Range(2)] = 20):
        check_arguments(self, locals())
        super().__init__(batch_size_fn=_unset, length_fn=_unset, window_size=window_size)
        self.peak_flops = peak_flops

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not isinstance(pl_module, AlignmentModule):
            raise SettingError(
                None,
                "trainer.callbacks",
                f"Throughput counts samples and tokens as a lit-align method does; "
                f"{type(pl_module).__name__} is not one",
            )
        self.batch_size_fn, self.length_fn = pl_module.batch_samples, pl_module.batch_tokens
        super().setup(trainer, pl_module, stage)
        if self.peak_flops is not None:
            self.available_flops = self.peak_flops
            for throughput in throughput_meters(self):
                throughput.available_flops = self.peak_flops


def _unset(batch) -> int:
    raise RuntimeError("Throughput counts batches only once setup() has its method")
