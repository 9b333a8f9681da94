"""One process under DDP (gloo) fits DPO for a step; used by tests/test_distributed.py.

Prints the backend after fit (the group is still there for the caller) and, from an exit handler
registered before fit (so it runs after every handler registered during fit), whether the process
group still exists when the interpreter starts to shut down.

    python tests/scripts/process_group_at_exit.py CACHE_DIR
"""

import atexit
import sys

import lightning as L
import torch.distributed as dist

from lit_align.data import PreferenceDataModule, WordRulesTask
from lit_align.methods import DPO

if __name__ == "__main__":
    atexit.register(lambda: print("process group at exit:", dist.is_initialized(), flush=True))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        strategy="ddp",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    task = WordRulesTask(num_train=4, num_val=2)
    trainer.fit(DPO(), PreferenceDataModule(batch_size=2, max_length=32, task=task, cache_dir=sys.argv[1]))
    print("process group after fit:", dist.get_backend())
