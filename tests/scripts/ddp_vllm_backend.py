"""Two-process (gloo, CPU) GRPO on the vllm backend under DDP or FSDP2; used by tests/test_vllm_backend.py.

Each rank drives its own vLLM engine (vLLM's ``external_launcher`` executor inside the training
processes) and after every update (DDP averages it over both ranks; under FSDP2 each rank updates
its shards, which are gathered for the push, LoRA merged on the gathered copies) gets the policy's
weights pushed. Each rank checks that its engine's log-probs of its own samples equal its
trainer's (1e-4, fp32) at every rollout, and that the two ranks sampled different completions
(their engines' seeds differ); rank 0 prints OK.

    python tests/scripts/ddp_vllm_backend.py CACHE_DIR [ddp|fsdp2] [full|lora]
"""

import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _ddp import two_process_trainer  # noqa: E402

from lit_align.data import PromptDataModule, WordRulesTask  # noqa: E402
from lit_align.methods import GRPO  # noqa: E402
from lit_align.online.rewards import RewardFunction  # noqa: E402
from lit_align.runtime.strategies import FSDP2Strategy  # noqa: E402


class LengthReward(RewardFunction):
    def score(self, prompts, completions):
        return [float(len(completion)) for completion in completions]


if __name__ == "__main__":
    strategy = sys.argv[2] if len(sys.argv) > 2 else "ddp"
    weights = sys.argv[3] if len(sys.argv) > 3 else "full"
    L.seed_everything(0)
    module = GRPO(
        reward=LengthReward(),
        samples_per_prompt=4,
        minibatch_size=8,
        generation={
            "max_new_tokens": 8,
            "temperature": 1.0,
            "backend": "vllm",
            "vllm": {"kv_cache_gib": 1, "max_model_len": 128},
        },
        model={
            "tiny": {"hidden_size": 128, "num_heads": 4, "intermediate_size": 256},
            **({"lora": {"r": 4}} if weights == "lora" else {}),
        },
        optimizer={"lr": 3e-2, "warmup_ratio": 0.0},
    )
    seen = []
    log_rollout = module.log_rollout
    module.log_rollout = lambda stage, rollout, *a, **k: seen.append(rollout) or log_rollout(stage, rollout, *a, **k)
    task = WordRulesTask(num_train=16, num_val=2, rules=("first",))
    data = PromptDataModule(task=task, batch_size=4, max_length=32, cache_dir=sys.argv[1])
    trainer = two_process_trainer(max_steps=6, strategy=FSDP2Strategy() if strategy == "fsdp2" else "ddp")
    trainer.fit(module, data)
    assert len(seen) == 3, len(seen)
    gaps = [float((rollout.sampler_logps - rollout.old_logps)[rollout.mask].abs().max()) for rollout in seen]
    assert max(gaps) < 1e-4, gaps
    first = seen[0].batch["input_ids"]
    shapes = [torch.zeros(2, dtype=torch.long) for _ in range(2)]
    dist.all_gather(shapes, torch.tensor(first.shape))
    padded = torch.nn.functional.pad(first, (0, int(max(s[1] for s in shapes)) - first.shape[1]))
    gathered = [torch.zeros_like(padded) for _ in range(2)]
    dist.all_gather(gathered, padded)
    assert not torch.equal(gathered[0], gathered[1]), "both ranks sampled the same rows"
    if trainer.is_global_zero:
        print("OK", len(seen), "rollouts per rank, largest engine/trainer gap", max(gaps))
