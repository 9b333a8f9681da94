"""Progress bars for long phases outside Lightning's loops (reference precompute, generation).

Drawn like Lightning's own bar (tqdm on stderr: a count, a rate and an estimate of the time
left) when stderr is a terminal; elsewhere (logs, CI, tests) nothing is drawn and the phase logs
one line when it starts and one when it ends, so a log still shows where the time went. Only
process 0 draws under DDP/FSDP. tqdm comes with transformers and datasets, so nothing new is
installed.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm.auto import tqdm

log = logging.getLogger("lit_align")


def _is_process_zero() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def shows_bars() -> bool:
    """Whether progress bars are drawn here: stderr is a terminal and this is process 0."""
    return sys.stderr.isatty() and _is_process_zero()


@contextmanager
def progress(total: int, description: str, unit: str = "it") -> Iterator[tqdm]:
    """A bar of ``total`` ``unit`` for the block (``bar.update(n)`` as work is done); without a
    terminal, a log line at the start and one with the elapsed time at the end instead."""
    quiet = not shows_bars()
    started = time.monotonic()
    if quiet and _is_process_zero():
        log.info("%s: %d %s", description, total, unit)
    bar = tqdm(total=total, desc=description, unit=unit, disable=quiet, dynamic_ncols=True, leave=True)
    try:
        yield bar
    finally:
        bar.close()
        if quiet and _is_process_zero():
            log.info("%s: done in %.1f s", description, time.monotonic() - started)
