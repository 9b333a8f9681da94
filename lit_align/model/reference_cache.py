"""Cached reference log-probs: one pass before training instead of a reference forward per step.

With ``model.reference: cached`` the module, when fit/validate/test starts, looks for a file
``<cache_dir>/reference/<data key>-<model key>.pt``. The data key is the tokenized-data key
(sources, data settings, tokenizer); the model key covers everything that changes the reference's
numbers (model source and its files, dtype, quantization, attention backend, tiny-model shape and
seed, library versions) and nothing that does not (LoRA, checkpointing, chunk size). If the file
is there and readable, its per-token log-probs are attached to every example; otherwise they are
computed from the *initial* policy (adapters disabled under LoRA), written atomically, and
attached. No reference weights are ever held while training.

Multi-process runs: every rank computes the log-probs of its own shard of the examples (shards
padded to the same number of batches, which FSDP needs because each forward is collective),
the shards are all-gathered, and rank 0 writes the file; all ranks then hold every value.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist

from lit_align.data.collate import REFERENCE_FIELD, Collator, Layout, PairLayout
from lit_align.data.datamodule import AlignmentDataModule
from lit_align.data.sources import source_fingerprint
from lit_align.errors import SettingError
from lit_align.model.backbone import Backbone
from lit_align.model.loading import resolve_model_path
from lit_align.model.reference import CachedLogps
from lit_align.runtime.atomic import atomic_torch_save, load_or_none
from lit_align.runtime.progress import progress
from lit_align.settings import ModelSettings

log = logging.getLogger(__name__)
VERSION = 2
IRRELEVANT = ("lora", "gradient_checkpointing", "disable_dropout", "reference", "logp_chunk_size", "trust_remote_code")


def model_fingerprint(settings: ModelSettings) -> str:
    """Changes whenever the reference model would give different log-probs."""
    import transformers

    identity = {k: v for k, v in dataclasses.asdict(settings).items() if k not in IRRELEVANT}
    if settings.name_or_path != "tiny":
        source, gguf = resolve_model_path(settings)
        identity["files"] = source_fingerprint(str(Path(source) / gguf) if gguf else source)
    identity["versions"] = [VERSION, torch.__version__, transformers.__version__]
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def reference_cache_path(datamodule: AlignmentDataModule, settings: ModelSettings) -> Path:
    return datamodule.cache_root() / "reference" / f"{datamodule.cache_key()}-{model_fingerprint(settings)}.pt"


@torch.no_grad()
def compute_reference_logps(
    backbone: Backbone,
    examples: list[dict],
    batch_size: int,
    pad_token_id: int,
    device: torch.device,
    layout: Layout | None = None,
) -> list[list[torch.Tensor]]:
    """Per example, the per-token reference log-probs of each of its responses (in ``layout``
    order), from the current policy with adapters disabled; the caller guarantees the policy
    still has its initial weights."""
    layout = layout or PairLayout()
    collate = Collator(pad_token_id, layout)
    was_training = backbone.training
    backbone.eval()
    results = []
    with progress(len(examples), "reference log-probs", unit="examples") as bar:
        try:
            for start in range(0, len(examples), batch_size):
                chunk = [
                    {k: v for k, v in ex.items() if k != REFERENCE_FIELD} for ex in examples[start : start + batch_size]
                ]
                batch = {k: v.to(device) for k, v in collate(chunk).items()}
                with CachedLogps.source(backbone):
                    logps = backbone.logps(batch)
                values = [[None] * len(layout.responses(ex)) for ex in chunk]
                for row, (i, k) in enumerate(layout.rows(chunk)):
                    values[i][k] = logps.tokens[row][logps.mask[row]].float().cpu()
                results.extend(values)
                bar.update(len(chunk))
        finally:
            backbone.train(was_training)
    return results


def _compute_sharded(
    backbone: Backbone,
    examples: list[dict],
    batch_size: int,
    pad_token_id: int,
    device: torch.device,
    layout: Layout,
) -> list:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return compute_reference_logps(backbone, examples, batch_size, pad_token_id, device, layout)
    world, rank = dist.get_world_size(), dist.get_rank()
    per_rank = -(-len(examples) // world)
    indices = list(range(rank, len(examples), world))
    indices += indices[-1:] * (per_rank - len(indices))  # equal batch counts on every rank
    mine = compute_reference_logps(backbone, [examples[i] for i in indices], batch_size, pad_token_id, device, layout)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, list(zip(indices, mine, strict=True)))
    by_index = {index: values for shard in gathered for index, values in shard}
    return [by_index[i] for i in range(len(examples))]


def attach_reference_logps(
    backbone: Backbone,
    datamodule: AlignmentDataModule,
    policy_is_initial: bool,
    device: torch.device,
    is_global_zero: bool = True,
) -> Path:
    """Load (or compute and store) cached reference log-probs; the data module attaches them to its examples."""
    path = reference_cache_path(datamodule, backbone.settings)
    payload = load_or_none(path)
    if payload is not None and any(
        len(payload.get(split, ())) != len(examples) for split, examples in datamodule.datasets.items()
    ):
        payload = None
    if payload is None:
        if not policy_is_initial:
            raise SettingError(
                None,
                "model.reference",
                f"model.reference=cached: no usable cache at {path}, and the policy is no longer the initial "
                "model (it was trained or loaded from a checkpoint), so the reference cannot be recomputed "
                "from it; start from the initial model once to build the cache",
            )
        log.info(
            "computing reference log-probs once for %s",
            ", ".join(f"{len(v)} {k}" for k, v in datamodule.datasets.items()),
        )
        size = datamodule.hparams.eval_batch_size or datamodule.hparams.batch_size
        pad = datamodule.tokenizer.pad_token_id
        payload = {
            split: _compute_sharded(backbone, examples, size, pad, device, datamodule.layout)
            for split, examples in datamodule.datasets.items()
        }
        if is_global_zero:
            try:
                atomic_torch_save(payload, path)
            except OSError as error:  # read-only or full: the values are kept in memory for this run
                log.warning(
                    "cannot write the reference log-probs cache in %s (%s); keeping them in memory for this run only. "
                    "Set data.init_args.cache_dir or $LIT_ALIGN_CACHE to a writable folder",
                    path.parent,
                    error.strerror or error,
                )
    datamodule.attach_reference(payload)
    return path
