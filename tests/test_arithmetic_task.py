"""The built-in reasoning task (multi-step arithmetic): records checked against an independent
evaluator, worked solutions and slips derived by hand, its exact verifier, and how each data
regime (SFT, prompts with answers, pairs, lists) and the CLI read it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import LEARNING_SEED, QUIET_FLAGS, metric_rows

from lit_align.cli import main
from lit_align.data import ArithmeticTask, PromptDataModule, SFTDataModule, WordRulesTask
from lit_align.data.arithmetic_task import parse_prompt, worked_solution
from lit_align.errors import SettingError
from lit_align.rewards import ArithmeticReward, ExactAnswerReward, MathVerifyReward

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _evaluate(expression: str) -> int:
    """An independent evaluator: Python's own arithmetic on the expression."""
    assert re.fullmatch(r"[0-9+-]+", expression)
    return eval(expression)  # noqa: S307 (digits and +/- only, checked above)


def test_worked_solution_and_a_slip_by_hand():
    assert worked_solution("7+5-3") == "7+5=12\n12-3=9\nAnswer: 9"
    # a slip of +2 at step 0: 7+5 "=14", then 14-3=11 computed correctly from the wrong value
    assert worked_solution("7+5-3", slip_step=0, slip=2) == "7+5=14\n14-3=11\nAnswer: 11"
    assert worked_solution("7+5-3", slip_step=1, slip=-1) == "7+5=12\n12-3=8\nAnswer: 8"


def test_records_are_right_against_an_independent_evaluator_and_rejected_ones_wrong():
    task = ArithmeticTask(num_train=300, num_val=100, seed=5, steps=3, max_operand=9)
    train, val = task.split("train"), task.split("val")
    assert (len(train), len(val)) == (300, 100)
    assert train == ArithmeticTask(num_train=300, num_val=100, seed=5, steps=3).split("train")
    assert not {r["prompt"] for r in val} & {r["prompt"] for r in train}  # held-out prompts are unseen
    for record in train + val:
        expression = parse_prompt(record["prompt"])
        numbers = [int(n) for n in re.findall(r"\d+", expression)]
        assert len(numbers) == 4 and all(1 <= n <= 9 for n in numbers)
        assert record["answer"] == str(_evaluate(expression))
        steps = record["chosen"].split("\n")
        assert len(steps) == 4 and steps[-1] == f"Answer: {record['answer']}"
        for line in steps[:-1]:  # every step is true arithmetic and never negative
            left, result = line.split("=")
            assert _evaluate(left) == int(result) >= 0
        assert ArithmeticTask.is_correct(record["prompt"], record["chosen"])
        assert not ArithmeticTask.is_correct(record["prompt"], record["rejected"])
        # the slip's step: the lines before it are right, the score counts them out of 4 lines
        right = next(i for i, (a, b) in enumerate(zip(steps, record["rejected"].split("\n"), strict=True)) if a != b)
        assert record["score_rejected"] == pytest.approx(right / 4)


def test_score_grades_the_lines_right_before_the_first_wrong_one():
    prompt = "Compute 7+5-3\n"
    assert ArithmeticTask.score(prompt, "7+5=12\n12-3=9\nAnswer: 9") == 1.0
    assert ArithmeticTask.score(prompt, "  Answer: 9 ") == 1.0  # the verifier reads the final answer only
    assert ArithmeticTask.score(prompt, "7+5=12\n12-3=8\nAnswer: 8") == pytest.approx(1 / 3)
    assert ArithmeticTask.score(prompt, "7+5=13\n12-3=9\nAnswer: 10") == 0.0
    assert ArithmeticTask.score(prompt, "") == 0.0


def test_ranked_lists_fall_with_the_step_of_the_slip():
    records = ArithmeticTask(num_train=20, num_val=5, steps=3).ranked("val", list_size=4)
    for record in records:
        assert len(record["responses"]) == 4
        # a slip at step k leaves k of the 4 lines right: slips at steps 2, 1, 0
        assert record["scores"] == [1.0, 0.5, 0.25, 0.0]
    assert len(ArithmeticTask(num_train=20, num_val=5, steps=1).ranked("val", 4)[0]["responses"]) == 2


def test_settings_are_checked():
    with pytest.raises(SettingError, match="steps"):
        ArithmeticTask(steps=0)
    with pytest.raises(SettingError, match="max_operand"):
        ArithmeticTask(max_operand=1)
    with pytest.raises(SettingError, match="num_val.*raise steps or max_operand"):
        ArithmeticTask(num_train=50, num_val=200, steps=1, max_operand=3).split("val")
    with pytest.raises(ValueError, match="not a prompt of the arithmetic task"):
        parse_prompt("Reverse: abc\n")


def test_exact_answer_reward_reads_the_last_marked_line():
    reward = ExactAnswerReward()
    completions = [
        "7+5=12\n12-3=9\nAnswer: 9",
        "Answer: 8\nAnswer: 9\n",  # the last answer counts
        "**Answer:** 9.",  # Markdown bold and a full stop around it are forgiven
        "Answer: 9.0",  # exact: not the same text
        "9",  # no marker
        "Answer: 19",
    ]
    scores = reward(["p"] * 6, completions, ["9"] * 6)
    assert scores.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert ExactAnswerReward(marker="####")(["p"], ["so #### 72"], ["72"]).tolist() == [1.0]
    with pytest.raises(SettingError, match="marker"):
        ExactAnswerReward(marker=" ")


def test_arithmetic_reward_parses_the_prompt_graded_or_exact():
    prompts = ["Compute 7+5-3\n"] * 3
    completions = ["7+5=12\n12-3=8\nAnswer: 8", "Answer: 9", "7+5=12\n12-3=9\nAnswer: 9"]
    assert ArithmeticReward()(prompts, completions).tolist() == pytest.approx([1 / 3, 1.0, 1.0])
    assert ArithmeticReward(graded=False)(prompts, completions).tolist() == [0.0, 1.0, 1.0]


def test_math_verify_reads_the_worked_solutions_too():
    pytest.importorskip("math_verify")
    records = ArithmeticTask(num_train=10, num_val=10).split("val")
    prompts, answers = [r["prompt"] for r in records], [r["answer"] for r in records]
    assert MathVerifyReward()(prompts, [r["chosen"] for r in records], answers).tolist() == [1.0] * 10
    assert MathVerifyReward()(prompts, [r["rejected"] for r in records], answers).tolist() == [0.0] * 10


def test_prompt_batches_carry_the_reference_answers(tokenizer):
    data = PromptDataModule(task=ArithmeticTask(num_train=8, num_val=4), batch_size=4, max_length=32)
    data.tokenizer = tokenizer
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    records = ArithmeticTask(num_train=8, num_val=4).split("val")
    assert batch["answers"] == [r["answer"] for r in records]
    assert batch["prompts"] == [r["prompt"] for r in records]


def test_sft_trains_on_the_worked_solutions(tokenizer):
    data = SFTDataModule(task=ArithmeticTask(num_train=4, num_val=2), max_length=64)
    data.tokenizer = tokenizer
    data.setup("fit")
    example = data.datasets["train"][0]
    record = ArithmeticTask(num_train=4, num_val=2).split("train")[0]
    completion = tokenizer.decode(example["completion"], skip_special_tokens=True)
    assert completion == record["chosen"]


def test_the_cli_picks_the_task_by_kind_and_defaults_to_word_rules(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / "sft_arithmetic.yaml"), "--print_config"])
    printed = capsys.readouterr().out
    assert "kind: arithmetic" in printed and "max_operand: 9" in printed
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / "sft.yaml"), "--print_config"])
    printed = capsys.readouterr().out
    assert "kind: word_rules" in printed and "rules:" in printed
    assert isinstance(PromptDataModule().task, WordRulesTask)


def test_prompts_without_answers_are_refused_before_training(tmp_path, sft_policy):
    """A reward that checks answers, prompt data without them: exit status 1 and one message
    naming the file, the record and the field, before the first rollout (no checkpoint)."""
    from test_bad_settings import _lit_align

    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "Compute 1+2\n", "answer": "3"}) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    result = _lit_align(
        "fit",
        "--config",
        str(CONFIGS / "grpo_arithmetic.yaml"),
        "--model.init_args.model.name_or_path",
        str(sft_policy),
        "--data.init_args.train",
        str(path),
        "--data.init_args.val",
        str(path),
        *QUIET_FLAGS,
        cwd=tmp_path,
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert (
        f"lit-align fit: {path}, record 1, field 'answer': has no reference answer, which ExactAnswerReward "
        "checks completions against (1 of 2 train records have none)" in result.stderr
    ), result.stderr
    assert not list(tmp_path.rglob("*.ckpt"))


def _greedy_exact_match(samples_file: Path) -> float:
    """Fraction of the held-out prompts in a Samples file whose (greedy) completion is exactly right."""
    rows = [json.loads(line) for line in samples_file.read_text().splitlines()]
    return sum(ArithmeticTask.is_correct(row["prompt"], row["completion"]) for row in rows) / len(rows)


@pytest.mark.slow
def test_dpop_on_correct_versus_slip_pairs_learns_the_held_out_preference_and_keeps_the_answers(
    in_sft_arithmetic_workdir, measured
):
    """configs/dpop_arithmetic.yaml as shipped (150 steps of 32 pairs from the arithmetic SFT policy):
    on 200 held-out pairs the implicit reward prefers the correct solution more often (0.5 at the
    start, policy = reference), the correct solutions' log-probability does not fall (DPOP's
    penalty: plain DPO's falls, -1.17 -> -5.02 at seed 0), and greedy answers to the same held-out
    prompts stay right (plain DPO's fell, 0.865 -> 0.395).

    Measured at ``LIT_ALIGN_TEST_SEED`` 0 / 1 / 2 (Intel Xeon), first -> last: accuracy 0.50 ->
    0.80 / 0.725 / 0.72, log pi(chosen) -1.17 -> -0.93 / -1.99 -> -1.78 / -1.68 -> -1.48, greedy
    exact match 0.865 -> 0.900 / 0.545 -> 0.545 / 0.710 -> 0.740. The accuracy bound, +0.15, is
    under the smallest rise (0.22); exact match may dip by 0.05 (two standard errors at 200
    prompts)."""
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "dpop_arithmetic.yaml"),
            "--seed_everything",
            str(LEARNING_SEED),
            "--trainer.enable_checkpointing",
            "false",
            *QUIET_FLAGS,
            "--samples",
            "200",
        ]
    )
    accuracies = measured("val/rewards/accuracies", metric_rows("val/rewards/accuracies"))
    chosen = measured("val/logps/chosen", metric_rows("val/logps/chosen"))
    samples = sorted(Path("runs").rglob("samples/step_*.jsonl"), key=lambda path: int(path.stem.split("_")[1]))
    exact = measured("greedy exact match", [_greedy_exact_match(path) for path in samples])
    assert len(exact) == len(accuracies) == 4, (exact, accuracies)
    assert accuracies[-1] >= accuracies[0] + 0.15, accuracies
    assert chosen[-1] >= chosen[0], chosen
    assert exact[-1] >= exact[0] - 0.05, exact
