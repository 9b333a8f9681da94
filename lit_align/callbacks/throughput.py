"""Throughput and MFU logging: Lightning's ThroughputMonitor fed with lit-align's analytic FLOPs."""

from __future__ import annotations

from typing import Annotated, Optional

from lightning.pytorch.callbacks import ThroughputMonitor

from lit_align.data.packing import row_count, token_count
from lit_align.runtime.lightning_internals import throughput_meters
from lit_align.settings import Positive, Range, check_arguments


def _pairs(batch) -> int:
    return row_count(batch) // 2


class Throughput(ThroughputMonitor):
    """Logs samples (pairs), tokens and FLOPs per second, and MFU, every ``log_every_n_steps``.

    FLOPs per batch come from the module's ``flops_per_batch`` (analytic, :mod:`lit_align.model.flops`).
    MFU needs the peak FLOP/s of one device: Lightning knows common GPUs; on a CPU, or to override,
    give ``peak_flops`` (e.g. 157e9 for the 2-core AVX2 CPU these docs were measured on).

    Args:
        peak_flops: peak FLOP/s of one device at the training dtype; unset = Lightning's table.
        window_size: number of batches in the moving average.
    """

    def __init__(self, peak_flops: Optional[Positive] = None, window_size: Annotated[int, Range(2)] = 20):
        check_arguments(self, locals())
        super().__init__(batch_size_fn=_pairs, length_fn=token_count, window_size=window_size)
        self.peak_flops = peak_flops

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.peak_flops is not None:
            self.available_flops = self.peak_flops
            for throughput in throughput_meters(self):
                throughput.available_flops = self.peak_flops
