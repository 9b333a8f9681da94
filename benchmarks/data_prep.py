"""Preparing a large preference file: wall time and peak memory of reading + tokenizing + caching.

    python benchmarks/data_prep.py                              # 200k pairs, about 15 minutes on 2 cores
    python benchmarks/data_prep.py --quick                      # 5k pairs, a smoke run
    python benchmarks/data_prep.py --checkout /tmp/before       # adds the data module of another checkout

Writes a seeded JSONL file of explicit ``{prompt, chosen, rejected}`` pairs (50-300 words each,
words drawn from a Zipf-weighted made-up vocabulary) into a temporary folder, trains a byte-level
BPE tokenizer (vocabulary 8000) on part of it, then prepares the file with
``PreferenceDataModule.setup()`` in a fresh process per variant:

* ``--checkout`` (optional, e.g. a ``git worktree`` of an older commit): that checkout's data
  module, first run (tokenize and write its cache) and second run (read the cache);
* this checkout with ``num_proc`` 1 and 2 (first runs, each with an empty cache), and the second
  run of the ``num_proc=1`` cache.

Each worker reports the wall time of ``setup()`` and its CPU time (user + system, ``num_proc``
workers included: on a shared machine the wall time of several workers depends on what else
runs), the time to read every tokenized example once afterwards (what a method's per-example
check costs), its own peak RSS (``VmHWM``, the process started fresh; memory-mapped Arrow pages
count while resident), the largest peak RSS of its child processes (``num_proc`` workers, forked:
pages shared with the parent count in both) and the size of the cache on disk. Prints a markdown
table and writes benchmarks/results/data_prep.csv.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import MIB, machine_summary, markdown_table, worker_env  # noqa: E402
from _report import write_csv  # noqa: E402

MAX_LENGTH = 1024
VOCAB_SIZE = 8000


# ---- the data ---------------------------------------------------------------------------------
def make_vocabulary(rng: random.Random, size: int = 6000) -> list[str]:
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "sh", "ing", "er", "an", "ou"]
    words = set()
    while len(words) < size:
        words.add("".join(rng.choice(syllables) for _ in range(rng.choice((1, 1, 2, 2, 2, 3, 3, 4)))))
    return sorted(words)


def make_text(rng: random.Random, words: list[str], weights: list[float]) -> str:
    """50-300 words in sentences of 4-20 words."""
    count = rng.randint(50, 300)
    drawn = rng.choices(words, cum_weights=weights, k=count)
    sentences, start = [], 0
    while start < count:
        end = min(count, start + rng.randint(4, 20))
        sentence = " ".join(drawn[start:end])
        sentences.append(sentence[0].upper() + sentence[1:] + ".")
        start = end
    return " ".join(sentences)


def write_pairs(path: Path, pairs: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    words = make_vocabulary(rng)
    cumulative, total = [], 0.0
    for rank in range(len(words)):
        total += 1.0 / (rank + 1)  # Zipf
        cumulative.append(total)
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(pairs):
            record = {key: make_text(rng, words, cumulative) for key in ("prompt", "chosen", "rejected")}
            handle.write(json.dumps(record) + "\n")


def train_tokenizer(data: Path, out: Path, sample: int = 5000) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    def texts():
        with open(data, encoding="utf-8") as handle:
            for _, line in zip(range(sample), handle, strict=False):
                yield from json.loads(line).values()

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<|pad|>", "<|bos|>", "<|eos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts(), trainer=trainer)
    tokenizer.save(str(out))


# ---- one variant, in a fresh process ----------------------------------------------------------
def _vm_hwm_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (``num_proc`` workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def worker(spec: dict) -> dict:
    import logging

    from transformers import PreTrainedTokenizerFast

    import lit_align
    from lit_align.data import PreferenceDataModule

    logging.basicConfig(level=logging.WARNING)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=spec["tokenizer"], pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|eos|>"
    )
    settings = dict(train=spec["data"], max_length=MAX_LENGTH, cache_dir=spec["cache"])
    if spec.get("num_proc"):
        settings["num_proc"] = spec["num_proc"]
    data = PreferenceDataModule(**settings)
    data.tokenizer = tokenizer
    before = _vm_hwm_bytes()
    cpu_before = _cpu_seconds()
    start = time.perf_counter()
    data.setup("fit")
    setup_s = time.perf_counter() - start
    setup_cpu_s = _cpu_seconds() - cpu_before
    peak = _vm_hwm_bytes()
    start = time.perf_counter()
    tokens = sum(len(ex["prompt"]) + len(ex["chosen"]) + len(ex["rejected"]) for ex in data.datasets["train"])
    read_s = time.perf_counter() - start
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    cache = sum(p.stat().st_size for p in Path(spec["cache"]).rglob("*") if p.is_file())
    return {
        "lit_align": str(Path(lit_align.__file__).resolve().parents[1]),
        "setup_s": setup_s,
        "setup_cpu_s": setup_cpu_s,
        "read_all_s": read_s,
        "examples": sum(len(split) for split in data.datasets.values()),
        "train_tokens": tokens,
        "rss_before_mib": before / MIB,
        "peak_rss_mib": peak / MIB,
        "children_peak_rss_mib": children / MIB,
        "cache_mib": cache / MIB,
    }


def run_variant(spec: dict, checkout: Path) -> dict:
    env = worker_env(threads=1)
    env["PYTHONPATH"] = str(checkout) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("HF_DATASETS_CACHE", str(Path(spec["cache"]) / "hf"))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=checkout, timeout=7200, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed ({proc.returncode}): {spec}\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if Path(result["lit_align"]) != checkout.resolve():
        raise RuntimeError(f"the worker imported lit_align from {result['lit_align']}, not {checkout}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=200_000)
    parser.add_argument("--quick", action="store_true", help="5000 pairs")
    parser.add_argument("--checkout", type=Path, help="another checkout whose data module to measure too")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--workdir", type=Path, help="keep the data, tokenizer and caches here (default: a temp dir)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    pairs = 5000 if args.quick else args.pairs
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lit-align-data-prep-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        data, tokenizer = workdir / f"pairs-{pairs}.jsonl", workdir / "tokenizer.json"
        if not data.exists():
            start = time.perf_counter()
            write_pairs(data, pairs)
            print(f"wrote {data} ({data.stat().st_size / MIB:.0f} MiB) in {time.perf_counter() - start:.0f}s")
        if not tokenizer.exists():
            train_tokenizer(data, tokenizer)
        this = HERE.parent
        variants = []  # (label, checkout, num_proc, cache folder)
        if args.checkout:
            variants += [
                ("before: first run", args.checkout, None, "before"),
                ("before: cached", args.checkout, None, "before"),
            ]
        variants += [
            ("after, num_proc=1: first run", this, 1, "after-1"),
            ("after, num_proc=2: first run", this, 2, "after-2"),
            ("after: cached", this, 1, "after-1"),
        ]
        for cache in {cache for *_, cache in variants}:
            shutil.rmtree(workdir / cache, ignore_errors=True)
        results = []
        for label, checkout, num_proc, cache in variants:
            print(f"{label} ...", file=sys.stderr, flush=True)
            spec = dict(data=str(data), tokenizer=str(tokenizer), cache=str(workdir / cache), num_proc=num_proc)
            results.append((label, run_variant(spec, checkout)))
            print(json.dumps(results[-1][1]), file=sys.stderr, flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    header = [
        "variant",
        "setup s",
        "setup CPU s",
        "read all s",
        "peak RSS MiB",
        "RSS before MiB",
        "largest child MiB",
        "cache MiB",
        "examples",
    ]
    rows = [
        [
            label,
            f"{r['setup_s']:.1f}",
            f"{r['setup_cpu_s']:.1f}",
            f"{r['read_all_s']:.1f}",
            f"{r['peak_rss_mib']:.0f}",
            f"{r['rss_before_mib']:.0f}",
            f"{r['children_peak_rss_mib']:.0f}",
            f"{r['cache_mib']:.0f}",
            r["examples"],
        ]
        for label, r in results
    ]
    write_csv(args.out / "data_prep.csv", header, rows)
    print(f"\n{pairs} pairs, max_length {MAX_LENGTH}, BPE vocabulary {VOCAB_SIZE}\nMachine: {machine_summary()}\n")
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
