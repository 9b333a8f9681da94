"""``lit-align generate`` and ``lit-align eval``: results a person can see, from a checkpoint and
from its export, and their errors, one message line each."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import QUIET_FLAGS, metrics_table

import lit_align.commands.evaluate as evaluate_command
from lit_align.cli import main
from lit_align.commands.models import load_policy
from lit_align.data.tasks import WordRulesTask

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
HELD_OUT_PAIRS = 32


def checkpoint_of(run: Path) -> Path:
    """The one checkpoint of a run folder (``runs/lightning_logs/version_0/checkpoints/``)."""
    (path,) = (run / "runs" / "lightning_logs" / "version_0" / "checkpoints").glob("*.ckpt")
    return path


def export_with_config(checkpoint: Path, folder: Path, capsys) -> Path:
    """``lit-align export`` of ``checkpoint`` to ``folder``, with its run's config.yaml copied in."""
    main(["export", "--ckpt_path", str(checkpoint), "--output_dir", str(folder)])
    shutil.copy(checkpoint.parents[1] / "config.yaml", folder / "config.yaml")
    capsys.readouterr()
    return folder


def generated(argv: list[str], capsys) -> list[dict]:
    """The JSONL lines ``lit-align generate`` writes on stdout."""
    main(["generate", *argv])
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def evaluated(argv: list[str], capsys) -> dict[str, float]:
    """The table ``lit-align eval`` prints, as {metric: value}."""
    main(["eval", *argv])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert rows[0] == ["metric", "value"], rows
    return {name: float(value) for name, value in rows[1:]}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


# ---- generate ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_generate_answers_held_out_prompts_from_a_checkpoint_and_its_export(sft_run, in_tmp, capsys):
    checkpoint = checkpoint_of(sft_run)
    prompts = [record["prompt"] for record in WordRulesTask(rules=("first",)).split("val")[:10]]
    assert prompts[0].startswith("First letter of ") and prompts[0].endswith(":\n")
    flags = [flag for prompt in prompts for flag in ("--prompt", prompt)]
    rows = generated(["--model", str(checkpoint), *flags], capsys)
    assert [row["prompt"] for row in rows] == prompts
    correct = [WordRulesTask.is_correct(row["prompt"], row["completion"]) for row in rows]
    assert sum(correct) >= 7, rows  # greedy answers of configs/sft.yaml: 80-90% right
    export = export_with_config(checkpoint, in_tmp / "export", capsys)
    assert generated(["--model", str(export), *flags], capsys) == rows
    # what generates is in eval mode (no dropout), whether a checkpoint or an export
    assert not any(load_policy(str(source)).model.training for source in (checkpoint, export))


def test_generate_reads_jsonl_and_txt_prompt_files_and_writes_stdout_or_a_file(in_tmp, capsys):
    chat = [{"role": "user", "content": "Write in capitals: cab"}]
    jsonl = write_jsonl(
        in_tmp / "prompts.jsonl",
        [{"prompt": "Reverse: abc\n"}, {"prompt": chat}, {"messages": [*chat, {"role": "assistant", "content": "X"}]}],
    )
    options = ["--model", "tiny", "--max_new_tokens", "4", "--batch_size", "2"]
    rows_of_messages = rows = generated([*options, "--prompts", str(jsonl)], capsys)
    assert [row["prompt"] for row in rows] == ["Reverse: abc\n", chat, chat]  # the reply is left out
    assert rows[1]["completion"] == rows[2]["completion"]  # the same prompt, rendered by the chat template
    assert all(isinstance(row["completion"], str) for row in rows)

    text = in_tmp / "prompts.txt"
    text.write_text("Reverse: abc\n\nFirst letter of xyz:\n")
    rows = generated([*options, "--prompts", str(text)], capsys)
    assert [row["prompt"] for row in rows] == ["Reverse: abc", "First letter of xyz:"]

    output = in_tmp / "out" / "completions.jsonl"
    main(["generate", *options, "--prompts", str(text), "--output", str(output)])
    assert capsys.readouterr().out == ""
    assert [json.loads(line) for line in output.read_text().splitlines()] == rows

    # --chat: a text prompt goes through the chat template as a user message; its line shows the text
    (row,) = generated([*options, "--chat", "--prompt", "Write in capitals: cab"], capsys)
    assert row == {"prompt": "Write in capitals: cab", "completion": rows_of_messages[1]["completion"]}

    # --system_prompt: the same as a [system, user] conversation given in the file
    conversation = [{"role": "system", "content": "Be brief."}, *chat]
    (as_messages,) = generated(
        [*options, "--prompts", str(write_jsonl(in_tmp / "c.jsonl", [{"prompt": conversation}]))], capsys
    )
    (row,) = generated([*options, "--system_prompt", "Be brief.", "--prompt", "Write in capitals: cab"], capsys)
    assert row == {"prompt": "Write in capitals: cab", "completion": as_messages["completion"]}


def test_empty_completions_of_text_prompts_point_to_chat(in_tmp, capsys, monkeypatch):
    from lit_align.commands import generate

    monkeypatch.setattr(generate, "complete", lambda *args, **kwargs: ["", "an answer"])
    main(["generate", "--model", "tiny", "--prompt", "What is it?", "--prompt", "And this?"])
    note = "note: 1 of 2 completions are empty (the model ended at once); for a chat model, --chat sends"
    assert note in capsys.readouterr().err
    main(["generate", "--model", "tiny", "--prompt", "What is it?", "--prompt", "And this?", "--chat"])
    assert "note:" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--prompts", "missing.jsonl"], "missing.jsonl: file not found"),
        (["--prompts", "missing.txt"], "missing.txt: file not found"),
        (["--prompts", "bad.jsonl"], "bad.jsonl, record 1: line 2 is not valid JSON ("),
        (["--prompts", "fields.jsonl"], "fields.jsonl, record 1, field 'prompt': missing: a prompt is read from a"),
        ([], "give the prompts either with --prompt TEXT (repeatable) or with --prompts FILE\nhint: "),
        (["--prompt", "a", "--prompts", "fields.jsonl"], "or with --prompts FILE, not both\nhint: "),
        (["--prompt", "a", "--max_new_tokens", "0"], "max_new_tokens must be >= 1, got 0\nhint: change --max_new"),
    ],
)
def test_generate_input_errors_are_one_message(flags, message, in_tmp):
    (in_tmp / "bad.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
    write_jsonl(in_tmp / "fields.jsonl", [{"prompt": "a"}, {"text": "b"}])
    with pytest.raises(SystemExit) as stop:
        main(["generate", "--model", "tiny", *flags])
    text = str(stop.value.code)
    assert text.startswith("lit-align generate: ") and message in text, text
    assert len(text.splitlines()) == 2  # the message, then the hint


# ---- eval ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_eval_of_a_dpo_checkpoint_and_its_export_is_what_validate_reports(dpo_run, in_tmp, capsys):
    checkpoint, pairs = checkpoint_of(dpo_run), dpo_run / "pairs.jsonl"
    output = in_tmp / "metrics.json"
    metrics = evaluated(["--model", str(checkpoint), "--data", str(pairs), "--output", str(output)], capsys)
    assert metrics["val/rewards/accuracies"] >= 0.75, metrics
    assert metrics["val/rewards/margins"] > 0
    written = json.loads(output.read_text())
    assert written.keys() == metrics.keys()
    assert all(abs(written[name] - value) < 1e-4 for name, value in metrics.items())

    main(
        [
            "validate",
            "--config",
            str(checkpoint.parents[1] / "config.yaml"),
            "--ckpt_path",
            str(checkpoint),
            "--data.init_args.val",
            str(pairs),
            "--trainer.logger.init_args.save_dir",
            "validate",
            *QUIET_FLAGS,
        ]
    )
    (validated,) = metrics_table(in_tmp / "validate")
    for name in ("val/rewards/accuracies", "val/rewards/margins", "val/loss"):
        assert float(validated[name]) == pytest.approx(written[name], abs=1e-5), name

    export = export_with_config(checkpoint, in_tmp / "export", capsys)
    from_export = evaluated(["--model", str(export), "--data", str(pairs)], capsys)
    assert from_export.keys() == metrics.keys()
    for name, value in from_export.items():
        assert value == pytest.approx(written[name], abs=1e-4), name


@pytest.mark.slow
def test_eval_scores_greedy_completions_with_a_reward_and_a_baseline(dpo_run, in_tmp, capsys):
    common = ["--model", str(checkpoint_of(dpo_run)), "--data", str(dpo_run / "pairs.jsonl"), "--max_new_tokens", "8"]
    reward = ["--reward", "lit_align.rewards.WordRulesReward"]
    alone = evaluated([*common, *reward], capsys)
    assert list(alone) == ["mean_score"] and 0 <= alone["mean_score"] <= 1
    compared = evaluated([*common, *reward, "--baseline", "tiny"], capsys)
    assert list(compared) == ["mean_score", "baseline_mean_score", "win_rate"]
    assert compared["mean_score"] == pytest.approx(alone["mean_score"], abs=1e-4)  # greedy: the same completions
    assert 0 <= compared["win_rate"] <= 1 and 0 <= compared["baseline_mean_score"] <= 1


ANSWER_REWARDS = """
from lit_align.rewards import RewardFunction


class AnswerLength(RewardFunction):
    needs_answers = True

    def score(self, prompts, completions, answers):
        return [float(len(answer)) if prompt.startswith("Q") else -100.0 for prompt, answer in zip(prompts, answers)]


def quarter(prompts, completions):
    return [0.25] * len(completions)
"""


def test_eval_gives_verifiable_rewards_the_reference_answers_and_takes_plain_functions(in_tmp, capsys, monkeypatch):
    """GSM8K-shaped records (``question``, ``answer`` ending in ``#### <answer>``) and a
    ``solution`` record: the reward gets the questions as prompts and the final answers ("7",
    "12", "abc": mean length 2 by hand); a plain function is a reward too; a record without an
    answer is named before anything is generated."""
    (in_tmp / "answer_rewards.py").write_text(ANSWER_REWARDS)
    monkeypatch.syspath_prepend(str(in_tmp))
    records = [
        {"question": "Q1?", "answer": "Three and four.\n#### 7"},
        {"question": "Q2?", "answer": "#### 12"},
        {"question": "Q3?", "solution": "abc"},
    ]
    data = str(write_jsonl(in_tmp / "gsm8k.jsonl", records))
    common = ["--model", "tiny", "--data", data, "--max_new_tokens", "2"]
    assert evaluated([*common, "--reward", "answer_rewards.AnswerLength"], capsys) == {"mean_score": 2.0}
    assert evaluated([*common, "--reward", "answer_rewards.quarter"], capsys) == {"mean_score": 0.25}
    rendered = []  # --system_prompt: what eval tokenizes is the [system, user] conversation
    tokenize = evaluate_command.tokenize_prompts
    monkeypatch.setattr(evaluate_command, "tokenize_prompts", lambda p, *a: rendered.append(p) or tokenize(p, *a))
    assert (
        evaluated([*common, "--reward", "answer_rewards.AnswerLength", "--system_prompt", "S"], capsys)["mean_score"]
        == 2.0
    )
    assert rendered[0][0] == ({"role": "system", "content": "S"}, {"role": "user", "content": "Q1?"})
    write_jsonl(in_tmp / "gsm8k.jsonl", [*records, {"question": "Q4?"}])
    with pytest.raises(SystemExit) as stop:
        main(["eval", *common, "--reward", "lit_align.rewards.MathVerifyReward"])
    assert "gsm8k.jsonl, record 3, field 'answer': has no reference answer, which" in str(stop.value.code)
    assert "Generating" not in capsys.readouterr().err


@pytest.mark.slow
def test_eval_errors_are_one_message(sft_policy, in_tmp):
    pairs = write_jsonl(in_tmp / "pairs.jsonl", WordRulesTask().split("val")[:2])
    bare = in_tmp / "bare"  # an export without the config.yaml exports carry
    shutil.copytree(sft_policy, bare)
    (bare / "config.yaml").unlink()
    cases = [
        (["--model", str(bare)], f"{str(bare)!r} has no config.yaml: the method and data settings"),
        (["--model", "missing-run/last.ckpt"], "checkpoint 'missing-run/last.ckpt' does not exist"),
        (["--model", str(bare), "--reward", "no_such_module.Reward"], "--reward: 'no_such_module.Reward' cannot"),
        (["--model", str(bare), "--baseline", "tiny"], "--baseline compares generated completions"),
        (["--model", str(sft_policy), "--system_prompt", "S"], "--system_prompt renders the prompts of generated"),
    ]
    for flags, message in cases:
        with pytest.raises(SystemExit) as stop:
            main(["eval", "--data", str(pairs), *flags])
        text = str(stop.value.code)
        assert re.match(r"lit-align eval: .*\n(hint: .*|\(LIT_ALIGN_DEBUG=1 shows the traceback\))$", text), text
        assert message in text, text


def test_a_data_module_can_build_its_held_out_split_alone(in_tmp, tokenizer):
    from lit_align.data import PreferenceDataModule

    pairs = write_jsonl(in_tmp / "pairs.jsonl", WordRulesTask().split("val")[:4])
    data = PreferenceDataModule(train="gone/train.jsonl", val=str(pairs), max_length=64)
    data.held_out_only = True  # the training file is never read: it need not exist
    data.tokenizer = tokenizer
    data.setup()
    assert list(data.datasets) == ["val"] and len(data.datasets["val"]) == 4
    whole = PreferenceDataModule(train="builtin", val=str(pairs), max_length=64)
    whole.tokenizer = tokenizer
    alone = PreferenceDataModule(train="builtin", val=str(pairs), max_length=64)
    alone.tokenizer, alone.held_out_only = tokenizer, True
    assert whole.cache_key() != alone.cache_key()


HH = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"


@pytest.mark.skipif(not HH.exists(), reason="../shared/data holds the HH test split")
def test_prompts_of_preference_pairs_without_a_prompt_field_are_their_shared_start(capsys):
    """Anthropic HH's whole transcripts: each prompt is the conversation up to the last shared
    "\\n\\nAssistant:", as the preference data module splits it; the 4 records whose chosen reply is
    empty are skipped as training skips them, with a note, and the others keep their record numbers."""
    import gzip

    from lit_align.commands.prompts import read_prompts_and_answers

    prompts, answers, records = read_prompts_and_answers(str(HH))
    assert len(prompts) == 2312 - 4 and set(answers) == {None}
    assert records[84:87] == [84, 85, 87]  # record 86's chosen reply is empty
    note = capsys.readouterr().err
    assert "note: skipped 4 records" in note and "record 86, field 'chosen': is empty" in note
    assert all(prompt.startswith("\n\nHuman: ") and prompt.endswith("\n\nAssistant:") for prompt in prompts)
    with gzip.open(HH, "rt", encoding="utf-8") as handle:
        first = json.loads(handle.readline())
    marker = "\n\nAssistant:"  # the first record's last turn: everything up to its final marker
    assert prompts[0] == first["chosen"][: first["chosen"].rindex(marker) + len(marker)]
