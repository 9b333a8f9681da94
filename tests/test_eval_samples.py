"""Held-out evaluation of on-policy methods with several completions per prompt
(``generation.eval_samples``: mean@k), and its refusal where it would do nothing."""

from __future__ import annotations

import lightning as L
import pytest
from conftest import quiet_trainer

from lit_align.data import PromptDataModule, WordRulesTask
from lit_align.errors import SettingError
from lit_align.methods import GRPO
from lit_align.online.rewards import RewardFunction


class FirstOfEachGroup(RewardFunction):
    """1 for the first completion of every k in a row, 0 for the others: per-prompt mean 1/k when
    the k completions of a prompt come together. Records the prompts it was given."""

    def __init__(self, k: int):
        self.k, self.prompts = k, []

    def score(self, prompts, completions):
        self.prompts += list(prompts)
        return [float(i % self.k == 0) for i in range(len(completions))]


def validate(k: int, held_out_samples: list) -> tuple[dict, FirstOfEachGroup]:
    L.seed_everything(0)
    reward = FirstOfEachGroup(k)
    module = GRPO(
        reward=reward,
        samples_per_prompt=2,
        kl={"beta": 0.0},
        model={"name_or_path": "tiny"},
        generation={"max_new_tokens": 3, "eval_temperature": 1.0, "eval_samples": k},
    )
    module.held_out_samples, module.held_out_sample_limit = held_out_samples, 100  # as the Samples callback sets them
    data = PromptDataModule(task=WordRulesTask(num_train=8, num_val=6), batch_size=6, max_length=32)
    (metrics,) = quiet_trainer(limit_val_batches=1).validate(module, data, verbose=False)
    return metrics, reward


@pytest.mark.parametrize("k", [1, 4])
def test_held_out_scores_are_averaged_over_each_prompts_k_completions(k):
    """Scores 1, 0, ..., 0 within each prompt's k completions: val/objective/scores is exactly 1/k,
    so the k completions of a prompt are scored together and averaged per prompt; every prompt is
    scored k times in a row; the samples kept for people are each prompt's first completion."""
    samples: list = []
    metrics, reward = validate(k, samples)
    assert metrics["val/objective/scores"] == pytest.approx(1 / k)
    prompts = reward.prompts
    assert len(prompts) == 6 * k
    assert all(prompts[i] == prompts[i - i % k] for i in range(len(prompts)))  # each prompt k times in a row
    assert len(set(prompts)) == 6
    assert [s["prompt"] for s in samples] == prompts[::k]  # the Samples callback: each prompt's first
    assert all(s["score"] == 1.0 for s in samples)
    assert 0 < metrics["val/response_length"] <= 3


def test_several_held_out_completions_at_temperature_0_are_refused_by_name():
    with pytest.raises(SettingError, match=r"generation\.eval_samples.*eval_temperature 0 \(greedy\)"):
        GRPO(generation={"eval_samples": 4})
    GRPO(generation={"eval_samples": 4, "eval_temperature": 0.7})  # sampled: accepted
