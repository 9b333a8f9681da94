"""Two-process DDP (gloo, CPU) KTO steps; used by tests/test_unpaired.py.

Each rank records its own mismatched log-ratios and the z0 its loss used; rank 0 checks that z0
is the mean over both ranks' rows (clamped at 0), not the local mean, and prints OK.

    python tests/scripts/ddp_kto_reference_point.py CACHE_DIR
"""

import sys

import lightning as L
import torch
import torch.distributed as dist
from _ddp import two_process_trainer

from lit_align.data import UnpairedDataModule, WordRulesTask
from lit_align.methods import KTO
from lit_align.settings import OptimizerSettings


class RecordingKTO(KTO):
    """KTO that keeps (local mismatched log-ratios, z0 used) of every step."""

    records: list

    def loss(self, completions, ref_completions, desirable, mismatched, ref_mismatched):
        output = super().loss(completions, ref_completions, desirable, mismatched, ref_mismatched)
        self.records.append(
            (
                (mismatched.sum - ref_mismatched.sum).detach().double(),
                output.metrics["kl"].detach().flatten()[0].double(),
            )
        )
        return output


if __name__ == "__main__":
    L.seed_everything(0)
    module = RecordingKTO(beta=0.1, optimizer=OptimizerSettings(lr=5e-2))
    module.records = []
    data = UnpairedDataModule(
        batch_size=3, max_length=48, task=WordRulesTask(num_train=24, num_val=4), cache_dir=sys.argv[1]
    )
    trainer = two_process_trainer(max_steps=4)
    trainer.fit(module, data)
    checked = 0
    for local, z0 in module.records:
        gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, local)
        expected = torch.cat(gathered).mean().clamp(min=0)
        assert torch.allclose(z0, expected, atol=1e-6), (float(z0), float(expected), float(local.mean()))
        checked += int(local.mean().clamp(min=0) != expected)  # a step where the local estimate differs
    if trainer.is_global_zero:
        assert checked > 0, "every step's local z0 equalled the global one: the check proved nothing"
        print("OK", len(module.records), "steps", checked, "with local != global")
