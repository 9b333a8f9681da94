"""Verifiable rewards (math-verify answers, the think/answer format) and prompt data with
reference answers in the shapes people keep them, and rewards of one's own: plain functions, and
what any reward returns checked by name."""

from __future__ import annotations

import json

import pytest
import torch

from lit_align.errors import SettingError
from lit_align.rewards import MathVerifyReward, RewardFunction, ThinkFormatReward, WeightedRewards, WordRulesReward


def test_math_verify_checks_equivalence_of_the_final_answer():
    reward = MathVerifyReward()
    completions = [
        "6 * 7 = 42, so the answer is \\boxed{42}.",
        "Half of it: \\boxed{\\frac{1}{2}}",
        "I think it is 41.",
        "no answer here",
    ]
    scores = reward(["q"] * 4, completions, ["42", "0.5", "42", "3"])
    assert scores.tolist() == [1.0, 1.0, 0.0, 0.0]


def test_math_verify_reads_a_tagged_answer_and_scores_an_untagged_one_zero():
    reward = MathVerifyReward(answer_tag="answer")
    completions = ["<think>2+2</think><answer>4</answer>", "<think>2+2</think> 4", "<answer>5</answer>"]
    assert reward(["q"] * 3, completions, ["4", "4", "4"]).tolist() == [1.0, 0.0, 0.0]


def test_a_verifiable_reward_without_reference_answers_says_what_the_data_lacks():
    with pytest.raises(SettingError, match="MathVerifyReward: checks completions against reference answers, but"):
        MathVerifyReward()(["q"], ["\\boxed{1}"])


def test_think_format_reward():
    plain, tagged = ThinkFormatReward(), ThinkFormatReward(answer_tag="answer")
    completions = ["<think>a\nb</think> 42", "<think>a</think><answer>42</answer>", "42", "<think></think>42"]
    assert plain(["q"] * 4, completions).tolist() == [1.0, 1.0, 0.0, 0.0]
    assert tagged(["q"] * 4, completions).tolist() == [0.0, 1.0, 0.0, 0.0]


def test_weighted_rewards_pass_answers_only_to_the_rewards_that_take_them():
    combined = WeightedRewards([MathVerifyReward(answer_tag="answer"), ThinkFormatReward()], weights=[1.0, 0.2])
    assert combined.needs_answers
    scores = combined(["q", "q"], ["<think>x</think><answer>7</answer>", "7"], ["7", "7"])
    assert scores.tolist() == pytest.approx([1.2, 0.0])
    assert not WeightedRewards([WordRulesReward()]).needs_answers


@pytest.mark.parametrize(
    "record, columns, prompt, answer",
    [
        ({"prompt": "What is 6*7?", "answer": "42"}, None, "What is 6*7?", "42"),
        (
            {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7 apples.\n#### 7"},
            None,
            "Tom has 3 apples and buys 4. How many?",
            "7",
        ),
        ({"messages": [{"role": "user", "content": "1+1?"}], "solution": "2"}, None, "1+1?", "2"),
        ({"problem": "2+3?", "final": "5"}, {"prompt": "problem", "answer": "final"}, "2+3?", "5"),
    ],
)
def test_prompt_records_with_reference_answers_in_the_usual_shapes(
    tmp_path, tokenizer, record, columns, prompt, answer
):
    from lit_align.data import PromptDataModule

    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps(record) + "\n" + json.dumps(record) + "\n")
    data = PromptDataModule(train=str(path), val=str(path), columns=columns, max_length=256)
    data.tokenizer = tokenizer
    data.setup()
    batch = next(iter(data.val_dataloader()))
    text = batch["prompts"][0] if isinstance(batch["prompts"][0], str) else batch["prompts"][0][-1]["content"]
    assert text == prompt and batch["answers"] == [answer, answer]


def test_prompts_without_answers_give_no_answers(tmp_path, tokenizer):
    from lit_align.data import PromptDataModule

    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "hi"}) + "\n")
    data = PromptDataModule(train=str(path), val=str(path), max_length=64)
    data.tokenizer = tokenizer
    data.setup()
    assert "answers" not in next(iter(data.val_dataloader()))


def test_as_conversation_by_hand():
    from lit_align.data.formats import as_conversation

    user = {"role": "user", "content": "Q?"}
    system = {"role": "system", "content": "S"}
    assert as_conversation("Q?") == "Q?"  # text stays text unless asked
    assert as_conversation("Q?", chat=True) == (user,)
    assert as_conversation("Q?", system_prompt="S") == (system, user)
    assert as_conversation([user], system_prompt="S") == (system, user)
    own = {"role": "system", "content": "mine"}
    assert as_conversation([own, user], system_prompt="S") == (own, user)  # a conversation's own system turn stays


@pytest.mark.parametrize("settings", [{"chat": True}, {"system_prompt": "Think, then answer."}])
def test_text_prompts_of_a_chat_model_go_through_its_template(tmp_path, tokenizer, settings):
    """GSM8K questions with ``chat`` or a ``system_prompt``: the prompt ids are the chat
    template's rendering of [system?, user] with the generation prompt; the reward still gets the
    question as text."""
    from lit_align.data import PromptDataModule

    path = tmp_path / "gsm8k.jsonl"
    path.write_text(json.dumps({"question": "Two plus two?", "answer": "#### 4"}) + "\n")
    data = PromptDataModule(train=str(path), val=str(path), max_length=256, **settings)
    data.tokenizer = tokenizer
    data.setup()
    batch = next(iter(data.val_dataloader()))
    messages = [{"role": "user", "content": "Two plus two?"}]
    if "system_prompt" in settings:
        messages.insert(0, {"role": "system", "content": settings["system_prompt"]})
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = batch["prompt_ids"][0][batch["prompt_mask"][0].bool()]
    assert tokenizer.decode(ids) == expected
    assert batch["prompts"] == ["Two plus two?"] and batch["answers"] == ["4"]


def test_chat_with_a_system_prompt_is_refused_as_saying_nothing_more():
    from lit_align.data import PromptDataModule

    with pytest.raises(SettingError, match="PromptDataModule: chat must be unset with system_prompt, which already"):
        PromptDataModule(train="builtin", chat=True, system_prompt="S")


@pytest.mark.slow
def test_grpo_trains_on_prompt_answers_with_math_verify(in_tmp):
    """Plumbing end to end: a GRPO run on {question, answer} (GSM8K-shaped) prompts scored by
    MathVerifyReward logs its held-out score (the tiny model cannot do arithmetic; the score is
    whatever it is, the point is that answers reach the reward)."""
    from conftest import QUIET_FLAGS

    from lit_align.cli import main

    records = [
        {"question": f"What is {a} + {b}?", "answer": f"{a}+{b}={a + b}\n#### {a + b}"}
        for a in range(4)
        for b in range(4)
    ]
    path = in_tmp / "gsm.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    main(
        [
            "fit",
            "--model=lit_align.methods.GRPO",
            "--model.init_args.reward=lit_align.rewards.MathVerifyReward",
            "--model.init_args.generation={max_new_tokens: 4}",
            "--data=lit_align.data.PromptDataModule",
            f"--data.init_args.train={path}",
            "--data.init_args.batch_size=4",
            "--data.init_args.max_length=64",
            "--trainer.max_steps=2",
            "--trainer.val_check_interval=2",
            "--trainer.limit_val_batches=1",
            *QUIET_FLAGS,
        ]
    )
    from conftest import metric_rows

    scores = metric_rows("val/objective/scores")
    assert len(scores) == 2 and all(0.0 <= s <= 1.0 for s in scores)
    assert torch.isfinite(torch.tensor(metric_rows("train/loss"))).all()


# ---- rewards of one's own: what they return is checked, by name ------------------------------------
class Short(RewardFunction):
    def score(self, prompts, completions):
        return [1.0] * (len(completions) - 1)


class Words(RewardFunction):
    def score(self, prompts, completions):
        return ["good"] * len(completions)


class NaNForB(RewardFunction):
    def score(self, prompts, completions):
        return [float("nan") if completion == "b" else 1.0 for completion in completions]


class NoScore(RewardFunction):
    pass


@pytest.mark.parametrize(
    "reward, message",
    [
        (Short(), "reward test_verifiable.Short returned 2 scores for 3 completions: return one float per completion"),
        (Words(), r"reward test_verifiable.Words returned \['good', 'good', 'good'\], which is not numbers"),
        (
            NaNForB(),
            "reward test_verifiable.NaNForB returned nan for 1 of 3 completions, first for the completion 'b' of the "
            "prompt 'q2': return a finite number",
        ),
    ],
)
def test_a_reward_that_returns_other_than_one_finite_number_per_completion_is_named(reward, message):
    from lit_align.errors import RewardError
    from lit_align.online.rewards import score_completions

    with pytest.raises(RewardError, match=message):
        score_completions(reward, ["q1", "q2", "q3"], ["a", "b", "c"], None)


def test_a_plain_callable_reward_is_checked_too():
    from lit_align.errors import RewardError
    from lit_align.online.rewards import score_completions

    with pytest.raises(RewardError, match="returned 1 scores for 2 completions"):
        score_completions(lambda prompts, completions: [0.5], ["q1", "q2"], ["a", "b"], None)
    assert score_completions(lambda prompts, completions: (0.5, 2), ["q1", "q2"], ["a", "b"], None).tolist() == [0.5, 2]


def test_a_reward_without_score_is_refused_when_the_method_is_built():
    from lit_align.methods import GRPO

    with pytest.raises(SettingError, match=r"GRPO: reward test_verifiable.NoScore does not implement score\(prompts"):
        GRPO(reward=NoScore())
    with pytest.raises(SettingError, match=r"GRPO: eval_reward.rewards\[1\] test_verifiable.NoScore does not"):
        GRPO(reward=WordRulesReward(), eval_reward=WeightedRewards([WordRulesReward(), NoScore()]))


def brevity(prompts, completions):
    return [-float(len(completion)) for completion in completions]


def matches(prompts, completions, answers):
    return [float(completion == answer) for completion, answer in zip(completions, answers, strict=True)]


def test_function_reward_calls_a_plain_function_with_answers_when_asked():
    from lit_align.rewards import FunctionReward

    assert FunctionReward(brevity)(["q", "q"], ["ab", "abcd"]).tolist() == [-2.0, -4.0]
    exact = FunctionReward(matches, needs_answers=True)
    assert exact(["q", "q"], ["7", "8"], ["7", "7"]).tolist() == [1.0, 0.0]
    with pytest.raises(SettingError, match="the prompt data gives none"):
        exact(["q"], ["7"])
    with pytest.raises(SettingError, match="FunctionReward: function must be a function, got 3"):
        FunctionReward(3)
    weighted = WeightedRewards([FunctionReward(brevity), FunctionReward(brevity), WordRulesReward()], [1.0, 2.0, 1.0])
    assert weighted.names == ["brevity_0", "brevity_1", "WordRulesReward"]  # logged as objective/rewards/<name>
