"""Rollouts of on-policy methods: sample completions and lay them out for training.

Sampling runs on a generation backend (``generation.backend``): ``hf``, transformers ``generate``
with the KV cache (here), or ``vllm``, a vLLM engine in the training process
(:mod:`lit_align.online.vllm_engine`); both give the same layout and the log-prob each sampled
token had under the sampler (``Sampled.sampler_logps``), which the trainer compares with its own.

``generate`` works on left-padded prompts; training batches in lit-align are right-padded
(``input_ids``, ``attention_mask``, ``labels`` with -100 off the response), so every row is
shifted left by its prompt padding. The completion is the generated tokens up to and including
the first end-of-turn token (EOS, or the chat template's own end of turn:
:func:`lit_align.data.tokenize.end_of_turn_ids`); a completion that hits ``max_new_tokens`` first
has none (``ended`` is False).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Annotated, Any, Literal, NamedTuple, Optional

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from lit_align.data.labels import IGNORE_INDEX, shift_labels
from lit_align.data.packing import at_positions
from lit_align.data.tokenize import end_of_turn_ids
from lit_align.errors import SettingError
from lit_align.losses.sampler_correction import SAMPLER_CORRECTIONS
from lit_align.settings import Count, NonNegative, NonNegativeInt, Positive, Range


@dataclass
class VLLMSettings:
    """The vLLM engine of ``generation.backend: vllm``."""

    gpu_memory_utilization: Annotated[float, Range(0, 1, low_open=True)] = 0.3
    """Fraction of the GPU's memory the engine may take (weights + KV cache); the rest stays with
    training. On CPU vLLM reads it as the fraction of the machine's memory to reserve (and refuses
    to start when that much is not free); the KV cache is sized by ``kv_cache_gib``."""
    kv_cache_gib: Optional[Positive] = None
    """KV-cache space in GiB (on CPU: ``VLLM_CPU_KVCACHE_SPACE``; on a GPU it overrides
    ``gpu_memory_utilization`` for the cache). Null: vLLM's choice."""
    max_model_len: Optional[Count] = None
    """Longest prompt + completion the engine accepts (null: the model's context length)."""
    enforce_eager: bool = True
    """Run without CUDA graphs / compilation. False compiles the model when the engine is built
    (on a GPU: CUDA graphs too): faster sampling for a slower start (SmolLM2-135M in bf16 on a
    2-core CPU: 46 s instead of 4 s to build, 1.1x the tokens/s, docs/benchmarks.md)."""
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None
    """The engine's weights and compute dtype; null: the policy's. ``bfloat16`` under an fp32
    policy samples about twice as fast (on a GPU, and on CPUs with AVX-512 bf16/AMX) from weights
    rounded to bf16, so the sampler's log-probs drift further from the trainer's: the trainer
    recomputes them by default, and ``sampler_correction`` weighs the difference when the
    engine's are used (docs/rollouts.md)."""
    sleep: bool = False
    """Put the engine to sleep between rollouts (level 1: weights offloaded, KV cache freed) so the
    update has the GPU's memory, and wake it for the next rollout. CUDA only."""


@dataclass
class SamplerCorrection:
    """Importance weights for the sampler/trainer mismatch (Yao et al. 2025), per token."""

    kind: Literal["tis", "mis"] = "tis"
    """``tis``: truncated IS, min(rho, cap); ``mis``: masked IS, rho where rho <= cap, else 0."""
    cap: Annotated[float, Range(1)] = 2.0
    """C, the largest ratio kept (Yao et al. use 2)."""

    def weights(self, trainer_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``[N, T]`` weights w_t of :data:`SAMPLER_CORRECTIONS` ``[kind]``."""
        return SAMPLER_CORRECTIONS[self.kind](trainer_logps, sampler_logps, mask, self.cap)


@dataclass
class GenerationSettings:
    """Sampling of completions: which engine samples, and how."""

    max_new_tokens: Count = 16
    """Longest completion in tokens."""
    temperature: NonNegative = 1.0
    """Sampling temperature for training rollouts (0 = greedy)."""
    top_p: Annotated[float, Range(0, 1, low_open=True)] = 1.0
    """Nucleus sampling: keep the smallest set of tokens with this much probability."""
    top_k: NonNegativeInt = 0
    """Keep only the k most likely tokens (0 = off)."""
    eval_temperature: NonNegative = 0.0
    """Temperature for held-out evaluation (0 = greedy, deterministic)."""
    eval_samples: Count = 1
    """Completions per held-out prompt at ``eval_temperature`` (> 0); their scores are averaged per
    prompt (mean@k), which lowers the sampling noise of the held-out score by sqrt(k)."""
    backend: Literal["hf", "vllm"] = "hf"
    """What samples the rollouts and held-out completions: ``hf`` (transformers ``generate`` on
    the policy itself) or ``vllm`` (a vLLM engine in each training process, the policy's weights
    pushed to it before each rollout; ``pip install lit-align[vllm]``)."""
    vllm: VLLMSettings = field(default_factory=VLLMSettings)
    """The vLLM engine's settings (only with ``backend: vllm``)."""

    def __post_init__(self) -> None:
        if self.eval_samples > 1 and self.eval_temperature == 0:
            raise SettingError(
                None,
                "generation.eval_samples",
                f"generation.eval_samples={self.eval_samples} completions per held-out prompt at "
                "generation.eval_temperature 0 (greedy) are all the same completion: set eval_temperature > 0, "
                "or eval_samples 1",
            )

    def config(self, tokenizer, samples: int, temperature: float) -> GenerationConfig:
        sampling = temperature > 0
        options = {"temperature": temperature, "top_p": self.top_p, "top_k": self.top_k or None} if sampling else {}
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=sampling,
            num_return_sequences=samples,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=end_of_turn_ids(tokenizer),
            use_cache=True,
            **options,
        )


class Sampled(NamedTuple):
    """Completions from a generation backend."""

    batch: dict[str, torch.Tensor]
    """Right-padded prompt + completion rows: ``input_ids``, ``attention_mask``, ``labels``."""
    ended: torch.Tensor
    """``[N]`` True where the completion ended with an end-of-turn token."""
    sampler_logps: torch.Tensor
    """``[N, T]`` log-prob of each completion token under the sampler's own (unprocessed, i.e.
    temperature 1) distribution, in the shifted label layout (0 off the completion)."""


@dataclass
class Rollout:
    """Completions of a batch of prompts and everything the update needs, one row per completion
    (the samples of a prompt are adjacent rows). Per-token tensors are ``[N, T]`` in the shifted
    label layout of :class:`lit_align.model.logprobs.SequenceLogps` (``mask`` True on completion tokens)."""

    batch: dict[str, torch.Tensor]
    """Right-padded prompt + completion rows: ``input_ids``, ``attention_mask``, ``labels``."""
    prompts: list[Any]
    """The raw prompt (text or chat messages) of each row."""
    completions: list[str]
    """Decoded completions (special tokens removed)."""
    ended: torch.Tensor
    """``[N]`` True where the completion ended with EOS."""
    scores: torch.Tensor
    """``[N]`` reward-function scores (EOS penalty included)."""
    mask: Optional[torch.Tensor] = None
    """``[N, T]`` True on completion tokens (set with the sampling pass)."""
    old_logps: Optional[torch.Tensor] = None
    """Per-token log-probs under the policy that sampled, as the trainer computes them (frozen
    during the update)."""
    sampler_logps: Optional[torch.Tensor] = None
    """Per-token log-probs the generation backend reported for its samples (``Sampled``)."""
    ref_logps: Optional[torch.Tensor] = None
    values: Optional[torch.Tensor] = None
    """Critic values at sampling time (actor-critic methods)."""
    advantages: Optional[torch.Tensor] = None
    returns: Optional[torch.Tensor] = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Method-specific per-row tensors (first dimension N), sliced with the rollout."""

    def take_sampling_pass(self, current: Any) -> None:
        """Freeze the sampling policy's pass (a :class:`lit_align.methods.on_policy.PolicyPass`):
        completion mask, log-probs and critic values, detached."""
        self.mask, self.old_logps = current.logps.mask, current.logps.tokens.detach()
        self.values = None if current.values is None else current.values.detach()

    @property
    def size(self) -> int:
        return int(self.scores.shape[0])

    def select(self, rows: torch.Tensor) -> "Rollout":
        """The rollout restricted to ``rows`` (e.g. a minibatch), columns trimmed to their longest row."""
        rows = rows.to(self.scores.device)
        width = int(self.batch["attention_mask"][rows].sum(1).max())
        changes: dict[str, Any] = {
            "batch": {key: value[rows, :width] for key, value in self.batch.items()},
            "prompts": [self.prompts[i] for i in rows.tolist()],
            "completions": [self.completions[i] for i in rows.tolist()],
            "extra": {key: value[rows] for key, value in self.extra.items()},
        }
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name not in changes and isinstance(value, torch.Tensor):
                changes[item.name] = value[rows] if value.dim() == 1 else value[rows, :width]
        return replace(self, **changes)


@torch.no_grad()
def sample_completions(
    policy,
    tokenizer,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    generation: GenerationSettings,
    samples: int = 1,
    temperature: float | None = None,
) -> Sampled:
    """Generate ``samples`` completions per prompt with transformers (in eval mode, KV cache on):
    right-padded training rows (prompt by prompt), whether each ended, and each sampled token's
    log-prob under the logits ``generate`` computed for it (the ``hf`` backend's sampler log-probs)."""
    temperature = generation.temperature if temperature is None else temperature
    recorder = SampledTokenLogps()
    was_training = policy.training
    policy.eval()
    try:
        sequences = policy.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            generation_config=generation.config(tokenizer, samples, temperature),
            logits_processor=LogitsProcessorList([recorder]),
            # sharded weights are gathered by collectives in every forward: a process whose rows all
            # ended keeps stepping until every process is done, or the others wait for it forever
            synced_gpus=is_sharded(policy),
        )
    finally:
        policy.train(was_training)
    prompt_mask = prompt_mask.repeat_interleave(samples, dim=0)
    stops = end_of_turn_ids(tokenizer)
    batch, ended = completion_batch(sequences, prompt_mask, stops, tokenizer.pad_token_id)
    step_logps = recorder.finish(sequences)
    return Sampled(batch, ended, place_completion_values(step_logps, sequences, prompt_mask, stops, batch))


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether FSDP2 shards ``model`` across processes (then every process must run each forward)."""
    from torch.distributed.fsdp import FSDPModule

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    return torch.distributed.get_world_size() > 1 and any(isinstance(m, FSDPModule) for m in model.modules())


class SampledTokenLogps(LogitsProcessor):
    """Records log softmax(logits)[sampled token] at each step of ``generate`` without keeping
    the ``[N, V]`` scores of every step (``output_logits`` would hold N x steps x V floats: 6 GB
    for 128 completions of 256 tokens at SmolLM2's vocabulary). A step's sampled token is only
    known at the next call (the last column of ``input_ids``), so each call keeps one step's log
    softmax and gathers the previous one; :meth:`finish` gathers the last. Custom processors run
    before ``generate``'s temperature/top-k/top-p warpers: these are the unprocessed log-probs."""

    def __init__(self) -> None:
        self.previous: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.previous is not None:
            self.steps.append(self.previous.gather(1, input_ids[:, -1:])[:, 0])
        self.previous = scores.float().log_softmax(-1)
        return scores

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """``[N, steps]`` log-probs of the generated columns of ``sequences``."""
        if self.previous is not None:
            self.steps.append(self.previous.gather(1, sequences[:, -1:])[:, 0])
            self.previous = None
        if not self.steps:
            return sequences.new_zeros((sequences.shape[0], 0), dtype=torch.float32)
        return torch.stack(self.steps, 1)


def place_completion_values(
    step_values: torch.Tensor,
    sequences: torch.Tensor,
    prompt_mask: torch.Tensor,
    eos_id: int | Sequence[int] | None,
    batch: dict[str, torch.Tensor],
) -> torch.Tensor:
    """Per-generated-step values ``[N, steps]`` (one per column of ``sequences`` after the
    prompt) moved to the completion tokens of :func:`completion_batch`'s rows, in the shifted
    label layout (position t holds the value of token t + 1; 0 elsewhere)."""
    response = sequences[:, prompt_mask.shape[1] :]
    stops = [] if eos_id is None else [eos_id] if isinstance(eos_id, int) else list(eos_id)
    is_eos = torch.isin(response, torch.tensor(stops, dtype=response.dtype, device=response.device))
    kept = (is_eos.long().cumsum(1) - is_eos.long()) == 0
    target = shift_labels(batch["labels"]) != IGNORE_INDEX
    return at_positions(step_values[:, : kept.shape[1]][kept].to(torch.float32), target)


def completion_batch(
    sequences: torch.Tensor, prompt_mask: torch.Tensor, eos_id: int | Sequence[int] | None, pad_id: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Left-padded ``generate`` output -> right-padded rows with labels on the completion tokens
    (up to and including the first end-of-turn token: ``eos_id``, one id or several), and whether
    each completion ended with one."""
    prompt_width = prompt_mask.shape[1]
    response = sequences[:, prompt_width:]
    stops = [] if eos_id is None else [eos_id] if isinstance(eos_id, int) else list(eos_id)
    is_eos = torch.isin(response, torch.tensor(stops, dtype=response.dtype, device=response.device))
    before_end = (is_eos.long().cumsum(1) - is_eos.long()) == 0  # up to and including the first EOS
    ended = is_eos.any(1)
    mask = torch.cat([prompt_mask.bool(), before_end], 1)
    pads = prompt_width - prompt_mask.sum(1)
    width = sequences.shape[1]
    index = (torch.arange(width, device=sequences.device)[None, :] + pads[:, None]) % width
    input_ids = torch.where(mask, sequences, pad_id).gather(1, index)
    mask = mask.gather(1, index)
    is_response = torch.arange(width, device=sequences.device)[None, :] >= (prompt_width - pads)[:, None]
    labels = torch.where(mask & is_response, input_ids, IGNORE_INDEX)
    keep = int(mask.sum(1).max())
    return {
        "input_ids": input_ids[:, :keep],
        "attention_mask": mask[:, :keep].long(),
        "labels": labels[:, :keep],
    }, ended


def concat_rollouts(rollouts: Sequence[Rollout], pad_id: int) -> Rollout:
    """One rollout of the rows of ``rollouts`` in order (e.g. several sampling rounds): per-token
    tensors right-padded to the widest (``input_ids`` with ``pad_id``, ``labels`` with -100, the
    rest with 0), lists and per-row tensors joined."""
    if len(rollouts) == 1:
        return rollouts[0]
    fills = {"input_ids": pad_id, "labels": IGNORE_INDEX}

    def join(tensors: list[torch.Tensor], fill: float = 0) -> torch.Tensor:
        if tensors[0].dim() == 1:
            return torch.cat(tensors)
        width = max(t.shape[1] for t in tensors)
        return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=fill) for t in tensors])

    first = rollouts[0]
    changes: dict[str, Any] = {
        "batch": {key: join([r.batch[key] for r in rollouts], fills.get(key, 0)) for key in first.batch},
        "prompts": [p for r in rollouts for p in r.prompts],
        "completions": [c for r in rollouts for c in r.completions],
        "extra": {key: join([r.extra[key] for r in rollouts]) for key in first.extra},
    }
    for item in fields(Rollout):
        value = getattr(first, item.name)
        if item.name not in changes and isinstance(value, torch.Tensor):
            changes[item.name] = join([getattr(r, item.name) for r in rollouts])
    return replace(first, **changes)
