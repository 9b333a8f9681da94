"""The order in which examples reach each process: the same global batches for any number of processes.

With ``B`` examples per process and ``R`` processes, a global batch is ``B * R`` consecutive
examples of one seeded permutation per epoch, and process ``r`` takes the ``r``-th slice of it. One
process with batch size ``B * R`` therefore sees exactly the union of what ``R`` processes see at
each step, so DDP and FSDP runs reproduce a single-process run with the same global batch (up to
floating-point summation order). Lightning's own ``DistributedSampler`` deals examples round-robin
from a permutation that depends on the number of processes, which does not.

The order also resumes exactly: a run restored from a mid-epoch checkpoint skips the batches the
epoch had already completed, so steps after a resume see the data an uninterrupted run would.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DistributedSampler


class GlobalBatchOrder(DistributedSampler):
    """Example indices for one process (a ``DistributedSampler``, so Lightning keeps it as is).

    Args:
        size: number of examples.
        batch_size: examples per process per step (``B``).
        shuffle: permute the examples each epoch (seeded by ``seed + epoch``); else in order.
        seed: permutation seed.
        num_replicas: number of processes (``R``).
        rank: this process.
        skip_batches: global batches to skip at the start of the first pass (a resumed epoch).

    A last global batch smaller than ``B * R`` is split into near-equal contiguous parts (sizes
    differ by at most one); if it holds fewer examples than processes, a process without one
    repeats one of them, so every process runs the same number of steps (FSDP's forward is
    collective).
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        skip_batches: int = 0,
    ):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        # DistributedSampler.__init__ is not called: it would ask torch.distributed for the world
        self.size, self.batch_size, self.shuffle, self.seed = size, batch_size, shuffle, seed
        self.num_replicas, self.rank, self.epoch, self.skip_batches = num_replicas, rank, 0, skip_batches
        self.drop_last = False

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.num_replicas

    def order(self) -> list[int]:
        """This epoch's permutation of all examples (the same on every process)."""
        if not self.shuffle:
            return list(range(self.size))
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()

    def local_part(self, chunk: list[int]) -> list[int]:
        """This process's slice of one global batch."""
        if len(chunk) == self.global_batch_size:
            return chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        if len(chunk) < self.num_replicas:
            return [chunk[self.rank % len(chunk)]]
        base, extra = divmod(len(chunk), self.num_replicas)
        start = self.rank * base + min(self.rank, extra)
        return chunk[start : start + base + (self.rank < extra)]

    def __iter__(self) -> Iterator[int]:
        order, step = self.order(), self.global_batch_size
        skip, self.skip_batches = self.skip_batches, 0  # only the resumed pass starts late
        for start in range(skip * step, self.size, step):
            yield from self.local_part(order[start : start + step])

    def __len__(self) -> int:
        """Indices of a whole pass (also when resuming: Lightning counts the epoch's batches from
        its restored progress, and the pass ends when the skipped order runs out)."""
        full, rest = divmod(self.size, self.global_batch_size)
        return full * self.batch_size + (len(self.local_part(list(range(rest)))) if rest else 0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


def resumed_epoch_position(trainer) -> tuple[int, bool]:
    """(batches of the current epoch already trained, whether that epoch had ended) of the
    checkpoint a ``fit`` is resuming from; ``(0, False)`` when not resuming mid-run. The train
    loader skips the first number; a finished epoch means the resumed run starts the next one.

    Lightning restores the loop counters before it asks for the train loader, but only corrects
    them later (``_TrainingEpochLoop.reset``): a checkpoint written in ``on_train_batch_end``
    (``ModelCheckpoint(every_n_train_steps=...)``) records the batch as processed but not yet
    completed, and Lightning counts it as completed when the loop restarts. The same rule is
    applied here.
    """
    loop = getattr(trainer, "fit_loop", None) if trainer is not None else None
    if loop is None or not loop.restarting:
        return 0, False
    progress = loop.epoch_loop.batch_progress
    current = progress.current
    completed = current.completed
    if current.ready == current.started == current.processed == completed + 1:  # saved in on_train_batch_end
        completed += 1
    if progress.is_last_batch and completed >= current.ready:  # the saved epoch had ended
        return 0, True
    return completed, False
