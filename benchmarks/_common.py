"""Shared helpers for the benchmark scripts: peak RSS in a fresh process, workers, small stats.

Memory is measured as resident set size (RSS) of a fresh worker process, so it counts every
allocation (torch's CPU allocator, glibc, Python) and nothing leaks in from earlier runs. Linux
keeps a per-process RSS high-water mark (``VmHWM``) that can be reset to the current RSS by writing
``5`` to ``/proc/self/clear_refs``; elsewhere we fall back to ``getrusage().ru_maxrss``, which is
never reset (so it includes the set-up peak, an upper bound of the measured phase).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

MIB = 1024 * 1024


def _status_kib(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (Linux), or None."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def ru_maxrss_bytes() -> int:
    """Lifetime peak RSS from getrusage (kilobytes on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def current_rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else ru_maxrss_bytes()


def reset_peak_rss() -> bool:
    """Reset the RSS high-water mark to the current RSS; False where the OS cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """RSS high-water mark since the last :func:`reset_peak_rss` (lifetime peak if never reset)."""
    kib = _status_kib("VmHWM")
    return kib * 1024 if kib is not None else ru_maxrss_bytes()


class PeakRSS:
    """Context manager: ``.delta`` = peak RSS inside the block minus the RSS on entry, in bytes.

    ``.ru_delta`` is the same from ``ru_maxrss`` (cannot be reset: a cross-check that is only
    meaningful when the block's peak exceeds everything before it).
    """

    def __enter__(self) -> PeakRSS:  # noqa: PYI034 (typing.Self needs Python 3.11)
        self.resettable = reset_peak_rss()
        self.start = current_rss_bytes()
        return self

    def __exit__(self, *exc) -> None:
        self.delta = peak_rss_bytes() - self.start
        self.ru_delta = ru_maxrss_bytes() - self.start


def _cpu_times() -> tuple[int, int] | None:
    """(idle, total) jiffies of all CPUs from /proc/stat, or None off Linux."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return fields[3] + fields[4], sum(fields)


def wait_for_idle(min_idle_pct: float, window_s: float = 5.0, timeout_s: float = 600.0) -> float | None:
    """Block until the host's CPUs were at least ``min_idle_pct`` idle over ``window_s`` (other
    jobs on a shared machine skew wall times); give up after ``timeout_s``. Returns the last idle %."""
    deadline, idle = time.monotonic() + timeout_s, None
    while (before := _cpu_times()) is not None:
        time.sleep(window_s)
        after = _cpu_times()
        idle = 100.0 * (after[0] - before[0]) / max(1, after[1] - before[1])
        if idle >= min_idle_pct or time.monotonic() > deadline:
            break
    return idle


def worker_env(threads: int = 2) -> dict[str, str]:
    """Environment for a worker: OMP/MKL threads fixed (unless already set by the caller)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env.setdefault("MKL_NUM_THREADS", env["OMP_NUM_THREADS"])
    return env


def run_worker(script: str | Path, args: list[str], threads: int = 2, timeout: float | None = None) -> dict:
    """Run ``python script args`` in a fresh process; return the JSON object on its last stdout line."""
    cmd = [sys.executable, str(script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=worker_env(threads), timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def emit(result: dict) -> None:
    """Worker side of :func:`run_worker`: print the result as one JSON line."""
    print(json.dumps(result), flush=True)


def median(values) -> float:
    return float(statistics.median(values))


def machine_summary() -> str:
    """One line naming the machine, for table captions."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    threads = os.environ.get("OMP_NUM_THREADS", "2")
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, {threads} threads, torch {torch.__version__}, "
        f"Python {platform.python_version()}"
    )


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
