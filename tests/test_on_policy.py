"""The SFT -> on-policy pipeline end to end: rollouts laid out for training, SFT data, and each
on-policy method raising the mean reward on held-out prompts of the built-in task."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning
import pytest
import torch

from lit_align.cli import main
from lit_align.data import DataError, PromptDataModule, SFTDataModule, WordRulesTask
from lit_align.logprobs import IGNORE_INDEX
from lit_align.methods import GRPO, PPO
from lit_align.rewards import WordRulesReward
from lit_align.rollout import completion_batch
from lit_align.tiny import build_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
ON_POLICY_CONFIGS = ["reinforce", "rloo", "grpo", "ppo", "a2c"]


def metric_rows(name: str) -> list[float]:
    (path,) = Path("runs").rglob("metrics.csv")
    with open(path) as handle:
        return [float(row[name]) for row in csv.DictReader(handle) if row.get(name)]


def test_completion_batch_right_aligns_rows_and_labels_up_to_the_first_eos():
    """Prompts (7, 8) left-padded with 0 and (5, 6, 7); completions: row 0 = (9, EOS=2, then
    tokens after EOS), row 1 = (3, 4, 4) without EOS. Rows move left by their prompt padding;
    labels cover the completion up to and including the first EOS."""
    sequences = torch.tensor([[0, 7, 8, 9, 2, 5], [5, 6, 7, 3, 4, 4]])
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    batch, ended = completion_batch(sequences, prompt_mask, eos_id=2, pad_id=0)
    assert batch["input_ids"].tolist() == [[7, 8, 9, 2, 0, 0], [5, 6, 7, 3, 4, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]
    N = IGNORE_INDEX
    assert batch["labels"].tolist() == [[N, N, 9, 2, N, N], [N, N, N, 3, 4, 4]]
    assert ended.tolist() == [True, False]


def test_sft_data_record_shapes_and_errors(tmp_path):
    path = tmp_path / "sft.jsonl"
    records = [
        {"prompt": "Say hi\n", "completion": "hi"},
        {"messages": [{"role": "user", "content": "Say yo"}, {"role": "assistant", "content": "yo"}]},
        {"text": "plain text"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in records))
    data = SFTDataModule(train=str(path), val=str(path), max_length=64, use_cache=False)
    data.tokenizer = build_tiny_tokenizer()
    data.setup()
    decoded = [data.tokenizer.decode(example["completion"], skip_special_tokens=True) for example in data.datasets["train"]]
    assert decoded == ["hi", "yo", "plain text"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "no reply"}]}))
    data = SFTDataModule(train=str(bad), val=str(bad), use_cache=False)
    data.tokenizer = build_tiny_tokenizer()
    with pytest.raises(DataError, match=r"bad.jsonl.*record 0.*messages.*assistant"):
        data.setup()


def test_prompt_data_module_batches_left_padded_prompts_and_raw_text():
    data = PromptDataModule(task=WordRulesTask(num_train=4, num_val=2, rules=("first",)), batch_size=4, use_cache=False)
    data.tokenizer = build_tiny_tokenizer()
    data.setup()
    batch = next(iter(data.train_dataloader()))
    assert batch["prompt_mask"][:, -1].all()  # left padding: every prompt ends in the last column
    for ids, mask, text in zip(batch["prompt_ids"], batch["prompt_mask"], batch["prompts"]):
        assert data.tokenizer.decode(ids[mask.bool()]) == text


def test_on_policy_methods_name_what_is_missing():
    with pytest.raises(ValueError, match="reference=cached is not possible"):
        PPO(model={"reference": "cached"})
    with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
        GRPO(samples_per_prompt=1)
    data = PromptDataModule(task=WordRulesTask(num_train=4, num_val=2), batch_size=2, use_cache=False)
    trainer = lightning.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="needs a reward"):
        trainer.fit(PPO(), datamodule=data)
    with pytest.raises(ValueError, match=r"ptx_coef=0.5 needs ``ptx`` batches.*PromptDataModule provides none"):
        trainer.fit(PPO(reward=WordRulesReward(), ptx_coef=0.5), datamodule=data)
    assert WordRulesReward()(["First letter of abc:\n"], ["a"]).tolist() == [1.0]
    with pytest.raises(ValueError, match="1 prompts but 2 completions"):
        WordRulesReward()(["First letter of abc:\n"], ["a", "b"])


@pytest.mark.slow
@pytest.mark.parametrize("method", ON_POLICY_CONFIGS)
def test_each_on_policy_method_raises_held_out_reward(method, in_sft_workdir):
    """Mean reward of sampled completions on 200 held-out prompts, validated before fit and at
    the end, rises clearly from the SFT policy (configs as shipped, run through the CLI)."""
    main(["fit", "--config", str(CONFIGS / f"{method}.yaml"), "--trainer.enable_checkpointing", "false", *QUIET])
    scores = metric_rows("val/objective/scores")
    assert scores[-1] >= scores[0] + 0.05, scores
    assert all(torch.isfinite(torch.tensor(metric_rows("train/loss"))))
