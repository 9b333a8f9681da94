"""Two-process DDP (gloo, CPU) GRPO steps with ``loss_type: dapo``; used by tests/test_grpo_family.py.

Each rank records, per optimizer step, its own completion-token count and the token counts its
loss was normalised with. Rank 0 checks that every step's denominator is the sum of both ranks'
tokens (not the local count), that a per-token loss of 1 normalises to world_size x local tokens /
global tokens (so DDP's gradient average is the gradient of the global token mean), that some step's local
count differed from the other rank's (else the check proves nothing), and prints OK.

    python tests/scripts/ddp_dapo_token_count.py CACHE_DIR
"""

import os
import sys

import lightning as L
import torch
import torch.distributed as dist
from _ddp import two_process_trainer

from lit_align.data import PromptDataModule, WordRulesTask
from lit_align.losses.grpo_family import LOSS_NORMALISATIONS
from lit_align.methods import GRPO
from lit_align.online.rewards import WordRulesReward
from lit_align.online.rollout import GenerationSettings
from lit_align.settings import OptimizerSettings


class RecordingGRPO(GRPO):
    """GRPO that keeps, for every loss, (local completion tokens, the counts the loss was
    normalised with, the normalisation of a per-token loss of 1 everywhere)."""

    records: list

    def token_counts(self, mask):
        counts = super().token_counts(mask)
        ones = LOSS_NORMALISATIONS["dapo"](torch.ones_like(mask, dtype=torch.float32), mask, counts)
        self.records.append((float(mask.sum()), counts, float(ones)))
        return counts


if __name__ == "__main__":
    L.seed_everything(0)
    module = RecordingGRPO(
        reward=WordRulesReward(),
        samples_per_prompt=2,
        loss_type="dapo",
        kl={"beta": 0.0},
        # the untrained model never ends a completion, so every one is max_new_tokens long: a different
        # limit per rank (4 and 6) makes the ranks' token counts differ, as real completions' lengths do
        generation=GenerationSettings(max_new_tokens=4 + 2 * int(os.environ.get("LOCAL_RANK", "0")), temperature=1.0),
        optimizer=OptimizerSettings(lr=1e-3),
    )
    module.records = []
    data = PromptDataModule(
        batch_size=2,
        max_length=32,
        task=WordRulesTask(num_train=16, num_val=4, rules=("reverse",)),
        cache_dir=sys.argv[1],
    )
    trainer = two_process_trainer(max_steps=4)
    trainer.fit(module, data)
    differed = 0
    for local, counts, ones_loss in module.records:
        gathered = [torch.zeros(1, dtype=torch.float64) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, torch.tensor([local], dtype=torch.float64))
        total = float(sum(gathered))
        assert counts.world_size == 2, counts
        assert counts.global_tokens == total, (counts.global_tokens, total, local)
        # a per-token loss of 1 everywhere: the process's share of the global token mean, times 2
        assert abs(ones_loss - 2 * local / total) < 1e-6, (ones_loss, local, total)
        differed += int(gathered[0] != gathered[1])
    if trainer.is_global_zero:
        assert differed > 0, "both ranks had the same token count at every step: the check proved nothing"
        print("OK", len(module.records), "steps", differed, "with different token counts per rank")
