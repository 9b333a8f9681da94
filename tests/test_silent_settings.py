"""Settings a method or data module would silently ignore are errors when it is built, with the fix
named; ``lit-align test`` evaluates on a test source of its own (or says that it uses the
validation split); ``lit-align predict``, which no method implements, is not a command."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import lightning
import pytest
from conftest import quiet_trainer

import lit_align.methods.alignment as alignment_module
from lit_align.cli import main
from lit_align.data import PreferenceDataModule, PromptDataModule, WordRulesTask
from lit_align.errors import SettingError
from lit_align.methods import DPO, GRPO, PPO, REINFORCE, TRPO, OnlineDPO
from lit_align.online.rewards import WordRulesReward

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
QUIET = {"enable_progress_bar": False, "enable_model_summary": False}


@pytest.fixture
def no_model_loading(monkeypatch):
    """Building a backbone (loading a model) fails the test: the refusals come before it."""

    def load(*args, **kwargs):
        raise AssertionError("a model was loaded before the setting was refused")

    monkeypatch.setattr(alignment_module, "Backbone", load)


# ---- methods: the refused settings and their messages ---------------------------------------------
@pytest.mark.parametrize(
    "build, message",
    [
        (
            lambda: GRPO(kl={"estimator": "k2"}),
            "GRPO: kl.estimator must be k3 or unset, got 'k2': GRPO's KL term in the loss is always the k3 "
            "estimator (DeepSeekMath, eq. 4)",
        ),
        (
            lambda: TRPO(max_grad_norm=1.0),
            "TRPO: max_grad_norm must be unset, got 1.0: TRPO clips no gradient, the trust region max_kl bounds "
            "its step",
        ),
        (
            lambda: TRPO(optimizer={"lr": 1e-3, "schedule": "linear"}),
            "TRPO: optimizer must be unset, got lr=0.001, schedule='linear': TRPO has no AdamW and no "
            "learning-rate schedule, its natural-gradient step is sized by max_kl and the line search",
        ),
        (
            lambda: TRPO(optimizer={"betas": [0.8, 0.99]}),
            "TRPO: optimizer must be unset, got betas=[0.8, 0.99]: TRPO has no AdamW and no learning-rate "
            "schedule, its natural-gradient step is sized by max_kl and the line search",
        ),
        (
            lambda: TRPO(epochs=2),
            "TRPO: epochs must be 1 and minibatch_size unset (TRPO takes one step on the whole rollout), got 2 "
            "and None",
        ),
        (
            lambda: OnlineDPO(kl={"beta": 0.2}),
            "OnlineDPO: kl.beta must be unset, got 0.2: OnlineDPO has no KL penalty, DPO's beta is its KL control "
            "(set beta instead)",
        ),
        (
            lambda: OnlineDPO(kl={"target": 6.0}),
            "OnlineDPO: kl.target must be unset, got 6.0: OnlineDPO has no KL penalty, DPO's beta is its KL "
            "control (set beta instead)",
        ),
        (
            lambda: OnlineDPO(kl={"factor": 3.0}),
            "OnlineDPO: kl.factor must be unset, got 3.0: OnlineDPO has no KL penalty, DPO's beta is its KL "
            "control (set beta instead)",
        ),
        (
            lambda: PPO(kl={"factor": 3.0}),
            "PPO: kl.factor must be unset without kl.target, got 3.0: only the adaptive KL controller uses it, "
            "and kl.target turns that on (unset: fixed kl.beta)",
        ),
        (
            lambda: GRPO(kl={"increase_above": 2.0}),
            "GRPO: kl.increase_above must be unset without kl.target, got 2.0: only the adaptive KL controller "
            "uses it, and kl.target turns that on (unset: fixed kl.beta)",
        ),
        (
            lambda: REINFORCE(baseline="batch_mean", baseline_momentum=0.5),
            "REINFORCE: baseline_momentum must be unset with baseline=batch_mean, got 0.5: only the "
            "moving_average baseline uses it",
        ),
    ],
    ids=[
        "grpo-kl-estimator",
        "trpo-max-grad-norm",
        "trpo-optimizer",
        "trpo-optimizer-betas",
        "trpo-epochs",
        "online-dpo-kl-beta",
        "online-dpo-kl-target",
        "online-dpo-kl-factor",
        "ppo-kl-factor-without-target",
        "grpo-kl-increase-above-without-target",
        "reinforce-momentum-with-batch-mean",
    ],
)
def test_a_silently_ignored_method_setting_is_refused_before_the_model_is_loaded(build, message, no_model_loading):
    with pytest.raises(SettingError, match="^" + re.escape(message) + "$"):
        build()


def test_a_refused_setting_still_reports_its_range_first(no_model_loading):
    """A value out of range is named by its range, not by the refusal of the setting."""
    with pytest.raises(SettingError, match=re.escape("TRPO: max_grad_norm must be > 0, got 0")):
        TRPO(max_grad_norm=0)


def test_what_the_methods_use_is_accepted():
    """GRPO's own estimator and the default; TRPO without clipping or optimizer by default; the
    estimator of OnlineDPO's logged KL; the adaptive settings together with kl.target."""
    assert GRPO(kl={"estimator": "k3"}).kl_settings.estimator == "k3"
    assert GRPO().kl_settings.estimator == "k1"
    trpo = TRPO()
    assert trpo.max_grad_norm is None and trpo.hparams["optimizer"] is None
    assert OnlineDPO(kl={"estimator": "k3"}).kl_settings.estimator == "k3"
    assert PPO(kl={"target": 6.0, "factor": 3.0}).kl_controller.adaptive
    assert REINFORCE(baseline_momentum=0.5).running_return is not None


def test_online_dpo_reports_the_rlhf_reward_with_dpo_beta(tmp_path):
    """objective/beta and objective/rlhf_reward (score - beta KL) use DPO's beta, the KL weight of
    the objective online DPO optimises; objective/kl is still logged."""
    lightning.seed_everything(0)
    module = OnlineDPO(reward=WordRulesReward(), beta=0.3, generation={"max_new_tokens": 3, "temperature": 1.0})
    data = PromptDataModule(task=WordRulesTask(num_train=8, num_val=2), batch_size=4, max_length=32, use_cache=False)
    logger = lightning.pytorch.loggers.CSVLogger(tmp_path)
    trainer = quiet_trainer(max_steps=1, logger=logger, log_every_n_steps=1, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    metrics = trainer.logged_metrics
    assert float(metrics["train/objective/beta"]) == pytest.approx(0.3)
    expected = float(metrics["train/objective/scores"]) - 0.3 * float(metrics["train/objective/kl"])
    assert float(metrics["train/objective/rlhf_reward"]) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize(
    "build, message",
    [
        (
            lambda: PPO(reward=WordRulesReward()),
            "PPO: data.init_args.ptx_train is set, but ptx_coef is 0, so the ptx batches would be read and never "
            "trained on: set model.init_args.ptx_coef > 0 (PPO-ptx) or remove ptx_train",
        ),
        (
            lambda: GRPO(reward=WordRulesReward()),
            "GRPO: data.init_args.ptx_train is set, but GRPO does not train on ptx batches (PPO-ptx, ptx_coef, "
            "is PPO's): remove ptx_train",
        ),
    ],
    ids=["ppo-without-ptx-coef", "grpo"],
)
def test_ptx_batches_no_method_trains_on_are_refused_when_fit_starts(build, message):
    data = PromptDataModule(
        task=WordRulesTask(num_train=8, num_val=2), batch_size=4, ptx_train="builtin", use_cache=False
    )
    trainer = quiet_trainer(max_steps=1)
    with pytest.raises(SettingError, match="^" + re.escape(message) + "$"):
        trainer.fit(build(), datamodule=data)


# ---- data modules -----------------------------------------------------------------------------------
def _pairs(path: Path, count: int, tag: str) -> Path:
    path.write_text(
        "".join(
            json.dumps({"prompt": f"Q {tag}{i}: ", "chosen": f"good {i}", "rejected": f"bad {i}"}) + "\n"
            for i in range(count)
        )
    )
    return path


@pytest.mark.parametrize(
    "build, message",
    [
        (
            lambda: PreferenceDataModule(test_split="test"),
            "PreferenceDataModule: test_split must be unset without test, got 'test': it names the split to read "
            "from the test source (set test too)",
        ),
        (
            lambda: PromptDataModule(val_split="validation"),
            "PromptDataModule: val_split must be unset without val, got 'validation': it names the split to read "
            "from the val source (set val too)",
        ),
    ],
    ids=["test-split", "val-split"],
)
def test_the_split_of_a_source_that_is_not_set_is_refused(build, message):
    with pytest.raises(SettingError, match="^" + re.escape(message) + "$"):
        build()


class CountTestPairs(lightning.Callback):
    def __init__(self):
        self.pairs = 0

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.pairs += batch["input_ids"].shape[0] // 2  # chosen and rejected rows


def _test_run(data: PreferenceDataModule) -> int:
    """Pairs ``trainer.test`` evaluates DPO on."""
    counter = CountTestPairs()
    trainer = lightning.Trainer(logger=False, callbacks=[counter], inference_mode=False, **QUIET)
    trainer.test(DPO(), datamodule=data)
    return counter.pairs


def test_trainer_test_iterates_the_test_source(tmp_path):
    train, val, test = _pairs(tmp_path / "t.jsonl", 6, "t"), _pairs(tmp_path / "v.jsonl", 3, "v"), tmp_path / "x.jsonl"
    data = PreferenceDataModule(train=str(train), val=str(val), test=str(_pairs(test, 5, "x")), eval_batch_size=2)
    assert _test_run(data) == 5
    assert data.sources["test"] == str(test) and len(data.datasets["test"]) == 5
    cached = PreferenceDataModule(train=str(train), val=str(val), test=str(test), eval_batch_size=2)
    assert _test_run(cached) == 5  # read back from the tokenized cache


def test_without_a_test_source_testing_uses_the_validation_split_and_says_so(tmp_path, caplog):
    train, val = _pairs(tmp_path / "t.jsonl", 6, "t"), _pairs(tmp_path / "v.jsonl", 3, "v")
    data = PreferenceDataModule(train=str(train), val=str(val), eval_batch_size=2)
    with caplog.at_level(logging.WARNING, logger="lit_align.data.datamodule"):
        assert _test_run(data) == 3
        data.test_dataloader()
    warnings = [record.getMessage() for record in caplog.records if "data.init_args.test" in record.getMessage()]
    assert warnings == [
        f"no data.init_args.test source: testing on the validation split ({val}, 3 examples); set "
        "data.init_args.test to test on data of its own"
    ]


def test_the_test_source_is_part_of_the_tokenized_cache_key(tmp_path, tokenizer):
    train, test = _pairs(tmp_path / "t.jsonl", 6, "t"), _pairs(tmp_path / "x.jsonl", 2, "x")

    def key(**settings) -> str:
        data = PreferenceDataModule(train=str(train), **settings)
        data.tokenizer = tokenizer
        return data.cache_key()

    without, with_test = key(), key(test=str(test))
    assert without != with_test
    _pairs(test, 3, "x")  # the same path, other content
    assert key(test=str(test)) != with_test
    assert key(test=str(test), test_split="other") != key(test=str(test))


# ---- the CLI -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config, flags, message, key",
    [
        (
            "trpo",
            ["--model.init_args.max_grad_norm", "1.0"],
            "TRPO: max_grad_norm must be unset, got 1.0: TRPO clips no gradient, the trust region max_kl bounds "
            "its step",
            "model.init_args.max_grad_norm",
        ),
        (
            "trpo",
            ["--model.init_args.optimizer.lr", "0.001"],
            "TRPO: optimizer must be unset, got lr=0.001: TRPO has no AdamW and no learning-rate schedule, its "
            "natural-gradient step is sized by max_kl and the line search",
            "model.init_args.optimizer",
        ),
        (
            "grpo",
            ["--model.init_args.kl.estimator", "k2"],
            "GRPO: kl.estimator must be k3 or unset, got 'k2': GRPO's KL term in the loss is always the k3 "
            "estimator (DeepSeekMath, eq. 4)",
            "model.init_args.kl.estimator",
        ),
        (
            "online_dpo",
            ["--model.init_args.kl.beta", "0.2"],
            "OnlineDPO: kl.beta must be unset, got 0.2: OnlineDPO has no KL penalty, DPO's beta is its KL control "
            "(set beta instead)",
            "model.init_args.kl.beta",
        ),
    ],
    ids=["trpo-max-grad-norm", "trpo-optimizer", "grpo-kl-estimator", "online-dpo-kl-beta"],
)
def test_cli_names_the_ignored_setting_in_one_line(config, flags, message, key, in_tmp):
    """Refused before the model (outputs/sft, absent here) is loaded."""
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(CONFIGS / f"{config}.yaml"), *flags])
    assert str(stop.value.code) == (
        f"lit-align fit: {message}\nhint: change {key} (in the YAML, or --{key} on the command line); "
        "LIT_ALIGN_DEBUG=1 shows the traceback"
    )
    assert not Path("runs").exists()


def test_predict_is_not_listed_and_not_a_command(in_tmp, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code in (0, None)
    out = capsys.readouterr().out
    assert "{fit,validate,test}" in out and "predict" not in out
    with pytest.raises(SystemExit) as stop:
        main(["predict", "--config", str(CONFIGS / "dpo.yaml")])
    assert str(stop.value.code) == (
        "lit-align predict: no such command: lit-align methods have no predict_step (the commands are fit, "
        "validate, test, export, convert-pairs, generate, eval and plot)\n"
        "hint: to generate with a trained policy: lit-align generate --model runs/.../last.ckpt --prompt TEXT "
        "(or --prompts FILE)"
    )


def test_help_names_every_command_and_a_misspelt_one_gets_the_closest(in_tmp, capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert out.startswith("usage: lit-align ")
    assert "export, convert-pairs, generate, eval and plot (lit-align COMMAND --help for each)" in out
    every = (
        "the commands are fit, validate, test, export, convert-pairs, generate, eval, plot (lit-align COMMAND --help)"
    )
    for words, expected in [
        (["fitt"], ["lit-align: error: no such command: fitt", f"hint: did you mean fit? {every}"]),
        (["evall", "--model", "x"], ["lit-align: error: no such command: evall", f"hint: did you mean eval? {every}"]),
        ([], ["lit-align: error: no command given", f"hint: {every}"]),
    ]:
        with pytest.raises(SystemExit) as stop:
            main(words)
        assert stop.value.code == 2
        assert capsys.readouterr().err.strip().split("\n") == expected  # no usage before it
