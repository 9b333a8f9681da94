"""Two-process DDP (gloo, CPU) run with ``reference: cached``; used by tests/test_reference_cache.py.

python tests/scripts/ddp_cached_reference.py CACHE_DIR
"""

import sys

import lightning as L
from _ddp import two_process_trainer

from lit_align.data import PreferenceDataModule, WordRulesTask
from lit_align.methods import DPO
from lit_align.settings import ModelSettings

if __name__ == "__main__":
    L.seed_everything(0)
    module = DPO(model=ModelSettings(reference="cached"))
    data = PreferenceDataModule(
        batch_size=4, max_length=48, task=WordRulesTask(num_train=30, num_val=7), cache_dir=sys.argv[1]
    )
    trainer = two_process_trainer(max_steps=2)
    trainer.fit(module, data)
