"""The order in which examples reach each process: the same global batches for any number of processes.

With ``B`` examples per process and ``R`` processes, a global batch is ``B * R`` consecutive
examples of one seeded permutation per epoch, and process ``r`` takes the ``r``-th slice of it. One
process with batch size ``B * R`` therefore sees exactly the union of what ``R`` processes see at
each step, so DDP and FSDP runs reproduce a single-process run with the same global batch (up to
floating-point summation order). Lightning's own ``DistributedSampler`` deals examples round-robin
from a permutation that depends on the number of processes, which does not.

The order also resumes exactly: :class:`ResumableLoader` knows where in its epoch it is (the
epoch and the batches it has handed out), a data module saves that position in checkpoints
(``LightningDataModule.state_dict``) and gives it back to the new loader's order on resume
(:meth:`GlobalBatchOrder.resume_at`), which then skips the batches the epoch had already trained
on, so steps after a resume see the data an uninterrupted run would.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler


class GlobalBatchOrder(DistributedSampler):
    """Example indices for one process (a ``DistributedSampler``, so Lightning keeps it as is).

    Args:
        size: number of examples.
        batch_size: examples per process per step (``B``).
        shuffle: permute the examples each epoch (seeded by ``seed + epoch``); else in order.
        seed: permutation seed.
        num_replicas: number of processes (``R``).
        rank: this process.

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
    ):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        # DistributedSampler.__init__ is not called: it would ask torch.distributed for the world
        self.size, self.batch_size, self.shuffle, self.seed = size, batch_size, shuffle, seed
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0
        self.drop_last = False
        self.resume: tuple[int, int] | None = None
        """(epoch, global batches) where a checkpoint stopped, until a pass of that epoch or a later one starts."""
        self.pass_epoch: int | None = None
        """The epoch of the pass that started last (None before the first)."""
        self.pass_start = 0
        """Global batches that pass skipped (those its epoch had trained before a resume)."""

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.num_replicas

    def resume_at(self, epoch: int, batches: int) -> None:
        """Start the first pass of ``epoch`` after its first ``batches`` global batches. Decided
        when a pass starts, not here: Lightning may create the loader's iterator before it
        restores a checkpoint or sets the epoch. A pass of a later epoch drops it (the checkpoint
        had ended its epoch)."""
        self.resume = (epoch, batches)

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
        skip = 0
        if self.resume is not None and self.epoch >= self.resume[0]:
            epoch, batches = self.resume
            skip, self.resume = (batches if epoch == self.epoch else 0), None
        self.pass_epoch, self.pass_start = self.epoch, skip
        order, step = self.order(), self.global_batch_size
        for start in range(skip * step, self.size, step):
            yield from self.local_part(order[start : start + step])

    def __len__(self) -> int:
        """Indices of a whole pass (also when resuming: Lightning counts the epoch's batches from
        its restored progress, and the pass ends when the skipped order runs out)."""
        full, rest = divmod(self.size, self.global_batch_size)
        return full * self.batch_size + (len(self.local_part(list(range(rest)))) if rest else 0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class ResumableLoader(DataLoader):
    """A ``DataLoader`` whose sampler is a :class:`GlobalBatchOrder` and which knows its position
    in the epoch: :meth:`position` is the epoch and the global batches of it handed out so far
    (those skipped on a resume included). Lightning fetches no batch ahead from a loader with a
    length, so at a checkpoint that is the number of batches the epoch has trained on
    (``tests/test_lightning_internals.py`` checks that)."""

    batches_out = 0
    """Batches handed out by the current pass."""

    def __iter__(self) -> Iterator[Any]:
        self.sampler.pass_epoch = None  # set again when the new pass's order starts
        self.batches_out = 0
        return _Pass(self, super().__iter__())

    def position(self) -> dict[str, int] | None:
        """``{"epoch", "batches"}`` of the current pass, or None before any pass started."""
        order = self.sampler
        if order.pass_epoch is None:
            return None
        return {"epoch": order.pass_epoch, "batches": order.pass_start + self.batches_out}


class _Pass:
    """One pass of a :class:`ResumableLoader`: the ``DataLoader``'s iterator, its batches counted."""

    def __init__(self, loader: ResumableLoader, iterator: Iterator[Any]):
        self.loader, self.iterator, self.started = loader, iterator, False

    def __iter__(self) -> _Pass:
        return self

    def __len__(self) -> int:
        return len(self.iterator)

    def __next__(self) -> Any:
        if not self.started:
            self.started = True
            order = self.loader.sampler
            if order.pass_epoch is not None and (order.pass_epoch != order.epoch or order.resume is not None):
                # worker processes took this pass's order when the iterator was made, before Lightning
                # set the epoch or restored the position: make it again (the global RNG left as it was)
                with torch.random.fork_rng(devices=[]):
                    self.iterator = DataLoader.__iter__(self.loader)
        batch = next(self.iterator)
        self.loader.batches_out += 1
        return batch
