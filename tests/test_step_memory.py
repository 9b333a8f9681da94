"""What a training step keeps allocated: gradients are freed right after each optimizer step (not
held through the next forward pass, as Lightning's closure would: forward, zero_grad, backward), and
a preference method's reference runs before the policy holds its activations. The memory these save
is measured in benchmarks/against_trl.py (docs/benchmarks.md); here, the behaviour."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import quiet_trainer

from lit_align.data import (
    ListwiseDataModule,
    PreferenceDataModule,
    PromptDataModule,
    UnpairedDataModule,
    WordRulesTask,
)
from lit_align.methods import DPO, GRPO, KTO, LiPO
from lit_align.rewards import WordRulesReward
from lit_align.settings import ModelSettings, OptimizerSettings


class GradientsAtBatchStart(L.Callback):
    """For each training batch: whether any trained parameter holds a gradient when it begins."""

    def __init__(self):
        self.at_start: list[bool] = []

    @staticmethod
    def holding(module) -> bool:
        return any(p.grad is not None for p in module.parameters() if p.requires_grad)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.at_start.append(self.holding(pl_module))


def fit_dpo(callbacks, **trainer_settings) -> None:
    L.seed_everything(0)
    module = DPO(model=ModelSettings(reference="copy"), optimizer=OptimizerSettings(lr=1e-3))
    data = PreferenceDataModule(task=WordRulesTask(num_train=16, num_val=4), batch_size=2, max_length=32)
    settings = {"limit_val_batches": 0, "num_sanity_val_steps": 0, **trainer_settings}
    quiet_trainer(callbacks=callbacks, **settings).fit(module, data)


def test_gradients_are_freed_after_each_optimizer_step_not_held_through_the_next_forward():
    """Without the release in AlignmentModule.optimizer_step, every batch after the first begins
    (and runs its forward) with the previous step's gradients still allocated."""
    record = GradientsAtBatchStart()
    fit_dpo([record], max_steps=3)
    assert record.at_start == [False, False, False]


def test_accumulated_gradients_are_kept_between_micro_batches_and_freed_after_the_step():
    """accumulate_grad_batches=2: the second micro-batch adds to the first's gradients (still held
    when it begins), the step after it frees them."""
    record = GradientsAtBatchStart()
    fit_dpo([record], max_steps=2, accumulate_grad_batches=2)
    assert record.at_start == [False, True, False, True]


@pytest.mark.parametrize(
    ("method", "data_module"),
    [(DPO, PreferenceDataModule), (KTO, UnpairedDataModule), (LiPO, ListwiseDataModule)],
    ids=["paired", "unpaired", "listwise"],
)
def test_the_reference_runs_before_the_policy(method, data_module):
    """The reference's transient memory is freed before the policy's activations are held: its
    forward comes first (paired, unpaired and listwise methods alike)."""
    module = method(model=ModelSettings(reference="copy"))
    order: list[str] = []
    # the decoders: log-probs run each model's decoder, then the LM head in chunks
    module.backbone.reference.get_decoder().register_forward_hook(lambda *_: order.append("reference"))
    module.backbone.policy.get_decoder().register_forward_hook(lambda *_: order.append("policy"))
    data = data_module(task=WordRulesTask(num_train=4, num_val=2), batch_size=2, max_length=32)
    quiet_trainer(max_steps=1, limit_val_batches=0, num_sanity_val_steps=0).fit(module, data)
    assert order == ["reference", "policy"]


@pytest.mark.parametrize("minibatch_size", [None, 4])
def test_on_policy_updates_free_their_gradients_after_each_optimizer_step(minibatch_size):
    """GRPO's manual optimisation: after every minibatch's step no gradient is held, so none is
    carried through the next rollout's generation and forward."""
    L.seed_everything(0)
    held: list[bool] = []

    class Recording(GRPO):
        def optimise(self, part, ptx=None, current=None):
            super().optimise(part, ptx, current)
            held.append(any(p.grad is not None for p in self.parameters() if p.requires_grad))

    module = Recording(
        reward=WordRulesReward(),
        samples_per_prompt=2,
        minibatch_size=minibatch_size,
        kl={"beta": 0.0},
        model={"name_or_path": "tiny"},
        generation={"max_new_tokens": 2, "temperature": 1.0},
    )
    data = PromptDataModule(task=WordRulesTask(rules=("first",)), batch_size=4, max_length=32)
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, data)
    assert held == [False, False]  # max_steps counts optimizer steps: 2 rollouts, or 1 of 2 minibatches
    assert torch.isfinite(torch.tensor(float(trainer.callback_metrics["train/loss"])))
