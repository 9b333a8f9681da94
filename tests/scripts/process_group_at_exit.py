"""One process under DDP (gloo) fits DPO for a step; used by tests/test_distributed.py.

Prints the backend after fit (the group is still there for the caller) and, from an exit handler
registered before fit (so it runs after every handler registered during fit), whether the process
group still exists when the interpreter starts to shut down.

    python tests/scripts/process_group_at_exit.py CACHE_DIR
"""

import atexit
import sys

import torch.distributed as dist
from _ddp import two_process_trainer

from lit_align.data import PreferenceDataModule, WordRulesTask
from lit_align.methods import DPO

if __name__ == "__main__":
    atexit.register(lambda: print("process group at exit:", dist.is_initialized(), flush=True))
    trainer = two_process_trainer(max_steps=1, devices=1)  # one process, still DDP over gloo
    task = WordRulesTask(num_train=4, num_val=2)
    trainer.fit(DPO(), PreferenceDataModule(batch_size=2, max_length=32, task=task, cache_dir=sys.argv[1]))
    print("process group after fit:", dist.get_backend())
