"""On-policy training under FSDP2 against one process or DDP; used by tests/test_distributed.py.

An on-policy method (``METHODS``: GRPO with a frozen reference copy, the same with an LM head tied
to the embeddings, GRPO with LoRA, A2C with its value head; 2 epochs over each rollout, so two
backward passes per training step) on 8 prompts per step: one process x 8 (``single``), or two
processes (gloo, CPU) x 4 under DDP (``ddp``) or
:class:`lit_align.runtime.strategies.FSDP2Strategy` (``fsdp``). Training completions are fixed: a
function of the prompt, the sample's index and the policy's version, drawn the same on any process,
so the runs see the same rollouts and their losses compare step by step; held-out evaluation
generates greedily with the (sharded) policy itself. Rank 0 writes ``<method>_<mode>.json`` into
FOLDER: the per-step training losses (averaged over processes) and the held-out score.

    python tests/scripts/fsdp_on_policy.py FOLDER single|ddp|fsdp grpo|grpo_tied|grpo_lora|a2c
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch
from _ddp import two_process_trainer

from lit_align.data import PromptDataModule, WordRulesTask
from lit_align.data.tokenize import end_of_turn_ids
from lit_align.methods import A2C, GRPO
from lit_align.online.rewards import RewardFunction
from lit_align.online.rollout import Sampled, completion_batch
from lit_align.runtime.strategies import FSDP2Strategy


class LengthReward(RewardFunction):
    def score(self, prompts, completions):
        return [float(len(completion)) for completion in completions]


class FixedCompletions:
    """Training rollouts of fixed completions (greedy evaluation is left as is)."""

    losses: list

    def sample(self, batch, samples, temperature=None):
        if temperature == self.generation.eval_temperature:
            return super().sample(batch, samples, temperature)
        pad, stops = self.tokenizer.pad_token_id, end_of_turn_ids(self.tokenizer)
        stop = stops if isinstance(stops, int) else stops[0]
        rows = []
        for ids, mask in zip(batch["prompt_ids"], batch["prompt_mask"], strict=True):
            key = hash(tuple(ids[mask.bool()].tolist()))
            for index in range(samples):
                generator = torch.Generator().manual_seed((key + 7919 * index + 104729 * self.policy_version) % 2**62)
                length = int(torch.randint(1, 6, (), generator=generator))
                tokens = torch.randint(40, 120, (length,), generator=generator).tolist()
                rows.append(tokens + [stop] + [pad] * (5 - length))
        sequences = torch.cat(
            [batch["prompt_ids"].repeat_interleave(samples, 0), torch.tensor(rows, device=self.device)], 1
        )
        masks = batch["prompt_mask"].repeat_interleave(samples, 0)
        tokens, ended = completion_batch(sequences, masks, stops, pad)
        return Sampled(tokens, ended, None)

    def log_metrics(self, stage, values, batch_size):
        super().log_metrics(stage, values, batch_size)
        if stage == "train" and "loss" in values:
            loss = values["loss"].detach().reshape(-1).mean()
            self.losses.append(float(self.trainer.strategy.reduce(loss, reduce_op="mean")))


class FixedGRPO(FixedCompletions, GRPO):
    pass


class FixedA2C(FixedCompletions, A2C):
    pass


SHARED = {
    "reward": LengthReward(),
    "epochs": 2,
    "generation": {"max_new_tokens": 6, "temperature": 1.0},
    "optimizer": {"lr": 1e-2, "warmup_ratio": 0.0},
}
METHODS = {
    # 4 samples per prompt, a frozen reference copy for the KL term
    "grpo": lambda: FixedGRPO(samples_per_prompt=4, kl={"beta": 0.04}, model={"reference": "copy"}, **SHARED),
    # an LM head tied to the embeddings (as SmolLM2's): the causal LM is the unit around the layers
    "grpo_tied": lambda: FixedGRPO(
        samples_per_prompt=4,
        kl={"beta": 0.04},
        model={"reference": "copy", "tiny": {"tie_word_embeddings": True}},
        **SHARED,
    ),
    # LoRA (frozen base and trainable adapters in one unit), the reference = adapters off
    "grpo_lora": lambda: FixedGRPO(samples_per_prompt=4, kl={"beta": 0.04}, model={"lora": {"r": 4}}, **SHARED),
    # a value head (its own unit), two samples per prompt
    "a2c": lambda: FixedA2C(samples_per_prompt=2, **SHARED),
}


if __name__ == "__main__":
    folder, mode, method = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    L.seed_everything(0)
    module = METHODS[method]()
    module.losses = []
    processes = 1 if mode == "single" else 2
    data = PromptDataModule(
        batch_size=8 // processes,
        max_length=32,
        task=WordRulesTask(num_train=24, num_val=8, rules=("first",)),
        cache_dir=str(folder / "cache"),
    )
    strategy = {"single": "auto", "ddp": "ddp", "fsdp": FSDP2Strategy()}[mode]
    trainer = two_process_trainer(max_steps=6, devices=processes, strategy=strategy)
    trainer.fit(module, data)
    module.held_out_samples = []
    trainer.limit_val_batches = 1.0
    (scores,) = trainer.validate(module, data, verbose=False)
    if trainer.is_global_zero:
        result = {"losses": module.losses, "val": scores["val/objective/scores"]}
        (folder / f"{method}_{mode}.json").write_text(json.dumps(result))
        print("OK", json.dumps(result))
