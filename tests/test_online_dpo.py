"""Online DPO: pair selection, the loss on fresh pairs, an end-to-end run, and the self-judge."""

import math

import lightning
import pytest
import torch
from conftest import LEARNING_SEED, QUIET_FLAGS, metric_rows, quiet_trainer
from test_on_policy import CONFIGS

from lit_align.cli import main
from lit_align.data import PromptDataModule, WordRulesTask
from lit_align.methods import OnlineDPO
from lit_align.methods.on_policy import PolicyPass
from lit_align.methods.online_dpo import best_worst_pairs
from lit_align.online.rewards import RewardFunction, WordRulesReward
from lit_align.online.rollout import Rollout
from lit_align.online.self_judge import SelfJudge


def test_best_worst_pairs_hand_values():
    """Three prompts, three samples each (rows 0-2, 3-5, 6-8):
    (0.2, 0.9, 0.5) -> chosen row 1, rejected row 0; (0.7, 0.7, 0.7) all tie -> no pair;
    (1.0, 0.0, 1.0) -> chosen row 6 (first of the tied best), rejected row 7."""
    scores = torch.tensor([0.2, 0.9, 0.5, 0.7, 0.7, 0.7, 1.0, 0.0, 1.0])
    chosen, rejected = best_worst_pairs(scores, 3)
    assert chosen.tolist() == [1, 6] and rejected.tolist() == [0, 7]


def test_best_worst_pairs_two_samples_and_errors():
    chosen, rejected = best_worst_pairs(torch.tensor([0.0, 1.0, 0.5, 0.5, 3.0, -1.0]), 2)
    assert chosen.tolist() == [1, 4] and rejected.tolist() == [0, 5]
    with pytest.raises(ValueError, match="at least 2"):
        best_worst_pairs(torch.zeros(4), 1)


def test_loss_on_pairs_hand_value():
    """One pair: policy log-probs (-1, -3), reference (-2, -2), beta 0.5: rewards 0.5 and -0.5,
    margin 1, loss = -log sigma(1) = log(1 + e^-1)."""
    module = OnlineDPO(beta=0.5, model={"name_or_path": "tiny"})
    mask = torch.ones(2, 1, dtype=torch.bool)
    part = Rollout(
        batch={},
        prompts=["p", "p"],
        completions=["a", "b"],
        ended=torch.ones(2, dtype=torch.bool),
        scores=torch.tensor([1.0, 0.0]),
        mask=mask,
        old_logps=torch.tensor([[-1.0], [-3.0]]),
        ref_logps=torch.tensor([[-2.0], [-2.0]]),
    )
    current = PolicyPass(logps=_logps(torch.tensor([[-1.0], [-3.0]]), mask), values=None, hidden=torch.zeros(2, 1, 1))
    loss, metrics = module.loss(part, current)
    assert float(loss) == pytest.approx(math.log(1 + math.exp(-1)))
    assert metrics["rewards/margins"].tolist() == [pytest.approx(1.0)]
    assert metrics["rewards/accuracies"].tolist() == [1.0]
    assert metrics["scores/chosen"].tolist() == [1.0] and metrics["scores/rejected"].tolist() == [0.0]


def _logps(tokens, mask):
    from lit_align.model.logprobs import SequenceLogps

    return SequenceLogps(tokens, mask)


def test_online_dpo_needs_two_samples_and_sampling():
    with pytest.raises(ValueError, match="OnlineDPO: samples_per_prompt must be >= 2, got 1"):
        OnlineDPO(samples_per_prompt=1, model={"name_or_path": "tiny"})
    with pytest.raises(ValueError, match="generation.temperature must be > 0"):
        OnlineDPO(generation={"temperature": 0.0}, model={"name_or_path": "tiny"})


class LetterFraction(RewardFunction):
    """Fraction of letters in the completion: varies under a random tiny model, so pairs form."""

    def score(self, prompts, completions):
        return [sum(c.isalpha() for c in text) / max(1, len(text)) for text in completions]


class PairRecordingOnlineDPO(OnlineDPO):
    """Checks every optimised part: first half chosen, second half rejected, each pair from one
    prompt with a strictly higher chosen score."""

    def on_fit_start(self):
        super().on_fit_start()
        self.parts, self.losses = [], []

    def loss(self, part, current):
        half = part.size // 2
        assert part.prompts[:half] == part.prompts[half:]
        assert bool((part.scores[:half] > part.scores[half:]).all())
        loss, metrics = super().loss(part, current)
        self.parts.append(half)
        self.losses.append(float(loss))
        return loss, metrics


def _trainer(steps, **kwargs):
    return quiet_trainer(max_steps=steps, accelerator="cpu", limit_val_batches=1, num_sanity_val_steps=0, **kwargs)


def _data():
    return PromptDataModule(task=WordRulesTask(rules=("first",)), batch_size=8, max_length=32)


def test_online_dpo_end_to_end():
    lightning.seed_everything(0)
    module = PairRecordingOnlineDPO(
        reward=LetterFraction(),
        eval_reward=WordRulesReward(),
        samples_per_prompt=3,
        model={"name_or_path": "tiny"},
        generation={"max_new_tokens": 4, "temperature": 1.0},
    )
    trainer = _trainer(4, val_check_interval=4, check_val_every_n_epoch=None)
    trainer.fit(module, _data())
    assert trainer.global_step == 4 and len(module.parts) == 4
    assert all(0 < pairs <= 8 for pairs in module.parts)
    assert all(math.isfinite(loss) for loss in module.losses)
    metrics = trainer.callback_metrics
    for name in (
        "train/pairs",
        "train/rewards/accuracies",
        "train/rewards/margins",
        "train/loss",
        "val/objective/scores",
    ):
        assert name in metrics and torch.isfinite(metrics[name])


class Constant(RewardFunction):
    def score(self, prompts, completions):
        return [1.0] * len(completions)


def test_online_dpo_all_ties_still_counts_steps():
    """Every sample scores the same: no pairs, the parameters stay, and max_steps still ends the run."""
    lightning.seed_everything(0)
    module = OnlineDPO(
        reward=Constant(), model={"name_or_path": "tiny"}, generation={"max_new_tokens": 2, "temperature": 1.0}
    )
    before = [p.detach().clone() for p in module.backbone.policy.parameters()]
    trainer = _trainer(2)
    trainer.fit(module, _data())
    assert trainer.global_step == 2 and float(trainer.callback_metrics["train/pairs"]) == 0
    assert all(torch.equal(a, b) for a, b in zip(before, module.backbone.policy.parameters(), strict=True))


def test_self_judge_probability_and_logit_dependence():
    """With one-token answers Y / N the score is sigmoid(z_Y - z_N) at the question's last
    position, z_v = w_v . h. With w_Y = w_N + u the score is sigmoid(u . h); with w_Y = w_N - u it
    is sigmoid(-u . h) = 1 - the first; with w_Y = w_N it is exactly 1/2."""
    torch.manual_seed(0)
    module = OnlineDPO(model={"name_or_path": "tiny"})
    judge = SelfJudge(template="Q: {prompt}\nA: {completion}\nCorrect?", yes="Y", no="N")
    with pytest.raises(RuntimeError, match="not attached"):
        judge(["p"], ["c"])
    judge.attach(module)
    prompts, completions = ["First letter of cab:\n", "First letter of dog:\n", "x"], ["c", "q", "a much longer answer"]
    head = module.backbone.lm_head(module.backbone.policy).weight
    yes_id, no_id = (module.tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in ("Y", "N"))
    plain = judge(prompts, completions)
    assert plain.shape == (3,) and bool(((plain >= 0) & (plain <= 1)).all())
    # independent check: full forward, logits at the last question token
    ids = judge.question_ids(prompts[0], completions[0])
    with torch.no_grad():
        logits = module.backbone.policy(input_ids=torch.tensor([ids])).logits[0, -1]
    assert float(plain[0]) == pytest.approx(float(torch.sigmoid(logits[yes_id] - logits[no_id])), abs=1e-5)
    u = torch.randn(head.shape[1])
    with torch.no_grad():
        head[yes_id] = head[no_id] + u
        up = judge(prompts, completions)
        head[yes_id] = head[no_id] - u
        down = judge(prompts, completions)
        head[yes_id] = head[no_id]
        even = judge(prompts, completions)
    assert not torch.allclose(up, plain)
    torch.testing.assert_close(up + down, torch.ones(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(even, torch.full((3,), 0.5), atol=1e-6, rtol=0)


def test_self_judge_multi_token_answers_in_unit_interval(tokenizer):
    """Default " yes" / " no" are several byte tokens under the tiny tokenizer: whole-answer
    log-probs, still a probability in [0, 1]; batching does not change the scores."""
    module = OnlineDPO(model={"name_or_path": "tiny"})
    judge = SelfJudge(batch_size=1)
    judge.attach(module)
    assert len(tokenizer(" yes", add_special_tokens=False)["input_ids"]) > 1
    prompts = [[{"role": "user", "content": "First letter of cab:"}], "Write in capitals: ab\n"]
    scores = judge(prompts, ["c", "AB"])
    assert bool(((scores >= 0) & (scores <= 1)).all())
    judge.batch_size = 8
    torch.testing.assert_close(judge(prompts, ["c", "AB"]), scores)
    judge.chat_template = True
    assert bool(((judge(prompts, ["c", "AB"]) >= 0) & (judge(prompts, ["c", "AB"]) <= 1)).all())


def test_self_judge_as_reward_end_to_end():
    """The module attaches the judge at fit start (the score is noise with a tiny random model)."""
    lightning.seed_everything(0)
    judge = SelfJudge()
    module = OnlineDPO(
        reward=judge,
        eval_reward=WordRulesReward(),
        model={"name_or_path": "tiny"},
        generation={"max_new_tokens": 3, "temperature": 1.0},
    )
    trainer = _trainer(2)
    trainer.fit(module, _data())
    assert judge.module is module and trainer.global_step == 2
    assert torch.isfinite(trainer.callback_metrics["train/objective/scores"])


@pytest.mark.slow
def test_online_dpo_config_raises_held_out_reward(in_sft_workdir, measured):
    """configs/online_dpo.yaml as shipped from the SFT policy: held-out mean reward rises, pairs
    form, the loss stays finite. Measured with ``LIT_ALIGN_TEST_SEED`` 0 / 1 / 2 (Intel Xeon):
    0.42 -> 0.60 / 0.44 -> 0.66 / 0.23 -> 0.49 (rises 0.18 / 0.22 / 0.27; the bound, 0.08, is
    under half the smallest)."""
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "online_dpo.yaml"),
            "--seed_everything",
            str(LEARNING_SEED),
            "--trainer.enable_checkpointing",
            "false",
            *QUIET_FLAGS,
        ]
    )
    scores = measured("val/objective/scores", metric_rows("val/objective/scores"))
    assert scores[-1] >= scores[0] + 0.08, scores
    assert all(math.isfinite(loss) for loss in metric_rows("train/loss"))
    assert min(metric_rows("train/pairs")) > 0
