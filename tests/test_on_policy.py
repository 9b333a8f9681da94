"""The SFT -> on-policy pipeline end to end: rollouts laid out for training, SFT data, and each
on-policy method raising the mean reward on held-out prompts of the built-in task."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import lightning
import pytest
import torch
from conftest import LEARNING_SEED, QUIET_FLAGS, metric_rows, metrics_table, quiet_trainer

from lit_align.cli import main
from lit_align.data import DataError, PromptDataModule, SFTDataModule, WordRulesTask
from lit_align.data.labels import IGNORE_INDEX
from lit_align.errors import SettingError
from lit_align.methods import A2C, GRPO, PPO, REINFORCE, OnlineDPO
from lit_align.methods.running import RunningMoments
from lit_align.model.tiny import build_tiny_tokenizer
from lit_align.online.rewards import RewardFunction, WordRulesReward
from lit_align.online.rollout import completion_batch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
ON_POLICY_CONFIGS = ["reinforce", "rloo", "grpo", "ppo", "a2c"]
REASONING_CONFIGS = ["grpo_arithmetic", "grpo_dapo", "grpo_dr", "grpo_gspo", "grpo_cispo", "reinforce_pp"]


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


def test_completion_batch_ends_at_any_end_of_turn_token():
    """Two stop ids (EOS=2 and a template's end of turn, 6): each row ends at the first of either."""
    sequences = torch.tensor([[7, 9, 6, 2, 5], [7, 3, 2, 6, 4], [7, 3, 4, 4, 4]])
    prompt_mask = torch.tensor([[1], [1], [1]])
    batch, ended = completion_batch(sequences, prompt_mask, eos_id=[2, 6], pad_id=0)
    N = IGNORE_INDEX
    assert batch["labels"].tolist() == [[N, 9, 6, N, N], [N, 3, 2, N, N], [N, 3, 4, 4, 4]]
    assert ended.tolist() == [True, True, False]


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
    decoded = [
        data.tokenizer.decode(example["completion"], skip_special_tokens=True) for example in data.datasets["train"]
    ]
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
    for ids, mask, text in zip(batch["prompt_ids"], batch["prompt_mask"], batch["prompts"], strict=True):
        assert data.tokenizer.decode(ids[mask.bool()]) == text


def test_on_policy_methods_name_what_is_missing():
    with pytest.raises(ValueError, match="PPO: model.reference cannot be cached for on-policy methods"):
        PPO(model={"reference": "cached"})
    with pytest.raises(ValueError, match="GRPO: samples_per_prompt must be >= 2, got 1"):
        GRPO(samples_per_prompt=1)
    data = PromptDataModule(task=WordRulesTask(num_train=4, num_val=2), batch_size=2, use_cache=False)
    trainer = quiet_trainer(max_steps=1)
    with pytest.raises(ValueError, match="needs a reward"):
        trainer.fit(PPO(), datamodule=data)
    with pytest.raises(ValueError, match=r"PPO: ptx_coef needs ``ptx`` batches.*PromptDataModule provides none"):
        trainer.fit(PPO(reward=WordRulesReward(), ptx_coef=0.5), datamodule=data)
    assert WordRulesReward()(["First letter of abc:\n"], ["a"]).tolist() == [1.0]
    with pytest.raises(ValueError, match="1 prompts but 2 completions"):
        WordRulesReward()(["First letter of abc:\n"], ["a", "b"])


@pytest.mark.slow
@pytest.mark.parametrize("method", ON_POLICY_CONFIGS)
def test_each_on_policy_method_raises_held_out_reward(method, in_sft_workdir, measured):
    """Mean reward of sampled completions on 200 held-out prompts, validated before fit and at
    the end, rises clearly from the SFT policy (configs as shipped, run through the CLI).

    Measured with ``LIT_ALIGN_TEST_SEED`` 0 / 1 / 2 (Intel Xeon), first -> last:
    reinforce 0.37 -> 0.55 / 0.47 -> 0.68 / 0.24 -> 0.44 (rises 0.18 / 0.21 / 0.20)
    rloo      0.42 -> 0.71 / 0.44 -> 0.69 / 0.23 -> 0.59 (0.29 / 0.25 / 0.37)
    grpo      0.42 -> 0.66 / 0.44 -> 0.71 / 0.23 -> 0.59 (0.24 / 0.27 / 0.37)
    ppo       0.36 -> 0.71 / 0.40 -> 0.78 / 0.26 -> 0.71 (0.35 / 0.37 / 0.46)
    a2c       0.33 -> 0.63 / 0.49 -> 0.74 / 0.24 -> 0.41 (0.31 / 0.25 / 0.18)
    (a2c at lr 3e-4 rose to 0.45 at seed 2 and collapsed to 0.08 by the last validation; 2e-4 now.)
    The bound, 0.08, is under half the smallest rise."""
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / f"{method}.yaml"),
            "--seed_everything",
            str(LEARNING_SEED),
            "--trainer.enable_checkpointing",
            "false",
            *QUIET_FLAGS,
        ]
    )
    scores = measured("val/objective/scores", metric_rows("val/objective/scores"))
    assert scores[-1] >= scores[0] + 0.08, scores
    assert all(torch.isfinite(torch.tensor(metric_rows("train/loss"))))


@pytest.mark.slow
@pytest.mark.parametrize("config", REASONING_CONFIGS)
def test_each_grpo_refinement_raises_held_out_exact_match_on_the_reasoning_task(
    config, in_sft_arithmetic_workdir, measured
):
    """The built-in arithmetic task: held-out exact match, the mean over 400 unseen prompts of the
    fraction of 4 sampled answers (temperature 1) that are exactly right (mean@4), validated before
    fit and after the last of 152 rollouts, rises from the SFT policy (configs as shipped, run through the CLI).

    Measured at ``LIT_ALIGN_TEST_SEED`` 0 / 1 / 2 (Intel Xeon; the seed also initialises the tiny
    model), first -> last (docs/methods.md): grpo_arithmetic 0.446 -> 0.742 / 0.281 -> 0.401 /
    0.343 -> 0.363, grpo_dapo 0.446 -> 0.729 / 0.281 -> 0.368 / 0.343 -> 0.375, grpo_dr 0.446 ->
    0.747 / 0.281 -> 0.374 / 0.343 -> 0.403, grpo_gspo 0.446 -> 0.714 / 0.281 -> 0.394 / 0.343 ->
    0.444, grpo_cispo 0.446 -> 0.740 / 0.281 -> 0.366 / 0.343 -> 0.377, reinforce_pp 0.446 -> 0.739
    / 0.281 -> 0.399 / 0.343 -> 0.387. The bound, 0.06, is under every rise at seeds 0 and 1 (the
    smallest 0.085, CISPO at seed 1) and three standard deviations of a rise's sampling noise at 4
    samples per prompt (at most 0.018); from seed 2 four of the six rise less (0.02-0.044: the
    training prompts' score rises as at seed 1, the held-out one barely; a cosine decay of the rate
    leaves three under and costs 0.065-0.10 at seed 0; docs/methods.md). CI runs seed 0, where every
    rise is 0.26 or more."""
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / f"{config}.yaml"),
            "--seed_everything",
            str(LEARNING_SEED),
            "--trainer.enable_checkpointing",
            "false",
            *QUIET_FLAGS,
        ]
    )
    scores = measured("val/objective/scores", metric_rows("val/objective/scores"))
    assert scores[-1] >= scores[0] + 0.06, scores
    assert all(torch.isfinite(torch.tensor(metric_rows("train/loss"))))


def _template_texts(names: list[str], foods: list[str]) -> list[dict[str, str]]:
    return [{"text": f"{name} eats {food} daily."} for name in names for food in foods]


def _demonstration_nll(module: PPO, data: SFTDataModule) -> float:
    module.eval()
    with torch.no_grad():
        batch = next(iter(data.val_dataloader()))
        logps = module.backbone.logps(batch)
        return float(-(logps.tokens * logps.mask).sum() / logps.mask.sum())


@pytest.mark.slow
def test_ppo_ptx_term_lowers_nll_of_held_out_demonstrations(sft_policy, tmp_path, measured):
    """PPO-ptx (InstructGPT eq. 2): the same short PPO run with ptx_coef 1 versus 0, the ptx
    batches being template sentences; on sentences of the template never trained on, the NLL of
    the ptx run's policy ends clearly below the plain PPO run's, and ``loss/ptx`` is logged.
    Measured with ``LIT_ALIGN_TEST_SEED`` 0 / 1 / 2: NLL 6.72 vs 4.17 / 6.84 vs 4.06 / 6.92 vs 4.08
    (gaps 2.55 / 2.78 / 2.84; the bound is 1)."""
    train, held_out = tmp_path / "ptx.jsonl", tmp_path / "ptx_val.jsonl"
    train.write_text(
        "\n".join(json.dumps(r) for r in _template_texts(["Ann", "Bob", "Cy", "Dee"], ["rice", "figs", "kale", "corn"]))
    )
    held_out.write_text("\n".join(json.dumps(r) for r in _template_texts(["Eve", "Flo"], ["rice", "plums"])))
    evaluation = SFTDataModule(train=str(held_out), val=str(held_out), max_length=32, batch_size=8, use_cache=False)
    evaluation.tokenizer = build_tiny_tokenizer()
    evaluation.setup()
    nll = {}
    for coef in (0.0, 1.0):
        lightning.seed_everything(LEARNING_SEED)
        module = PPO(
            reward=WordRulesReward(),
            ptx_coef=coef,
            epochs=2,
            minibatch_size=8,
            generation={"max_new_tokens": 4, "temperature": 0.7},
            model={"name_or_path": str(sft_policy)},
            optimizer={"lr": 1e-4, "warmup_ratio": 0.0, "schedule": "constant_with_warmup"},
        )
        data = PromptDataModule(
            task=WordRulesTask(num_train=64, num_val=8, rules=("first",)),
            batch_size=8,
            max_length=32,
            ptx_train=str(train) if coef else None,
            ptx_batch_size=8,
            use_cache=False,
        )
        assert data.provides_ptx == bool(coef)
        logger = lightning.pytorch.loggers.CSVLogger(tmp_path / f"logs{coef}")
        trainer = quiet_trainer(max_steps=40, logger=logger, log_every_n_steps=1, limit_val_batches=0)
        trainer.fit(module, datamodule=data)
        nll[coef] = _demonstration_nll(module, evaluation)
        if coef:
            (metrics,) = Path(logger.log_dir).glob("metrics.csv")
            with open(metrics) as handle:
                ptx_losses = [
                    float(row["train/loss/ptx"]) for row in csv.DictReader(handle) if row.get("train/loss/ptx")
                ]
            assert len(ptx_losses) >= 15 and ptx_losses[-1] < ptx_losses[0], ptx_losses
    measured("held-out NLL without / with ptx", [nll[0.0], nll[1.0]])
    assert nll[1.0] < nll[0.0] - 1.0, nll


@pytest.mark.slow
def test_sft_reward_model_ppo_pipeline_through_the_cli(in_sft_workdir, measured):
    """The pipeline in docs/methods.md: a reward model trained from the SFT policy on the first-letter
    rule (configs/reward.yaml + pipeline overlay), then PPO against it (configs/ppo.yaml +
    overlay: scores standardised by the first rollout's, KL beta 0.1). The reward model ranks
    held-out pairs well; on the same 200 held-out prompts before and after PPO, the learned
    reward of the policy's completions rises and so does the verifier's score.

    Measured with ``LIT_ALIGN_TEST_SEED`` 0-5 (each seeds SFT, reward model and PPO), AMD EPYC:
    seed  RM accuracy  learned reward (rise)   verifier (rise)
    0     0.98         -0.14 -> 1.72 (+1.86)   0.36 -> 0.68 (+0.32)
    1     0.985         0.31 -> 1.82 (+1.51)   0.40 -> 0.74 (+0.34)
    2     0.96         -0.31 -> 1.67 (+1.98)   0.26 -> 0.58 (+0.33)
    3     0.98         -0.30 -> 1.66 (+1.96)   0.31 -> 0.65 (+0.34)
    4     0.975         0.13 -> 1.71 (+1.58)   0.43 -> 0.68 (+0.25)
    5     0.945         0.35 -> 1.59 (+1.24)   0.55 -> 0.77 (+0.22)
    (scores after rollout 150; fit now ends validated after rollout 152: seed 0 on this machine's
    CI, -0.14 -> 1.81 and 0.36 -> 0.725.)
    The bounds are about half the smallest rise. With ppo.yaml's own KL instead (beta 0.01 on
    raw scores) and the same reward models, seeds 0 and 1 drifted 17-19 nats from the reference:
    the learned reward climbed to 2.7 while the verifier fell to 0.06 / 0.10 (reward
    over-optimisation); seed 2 went 0.26 -> 0.51 at 2.4 nats."""
    seed = ["--seed_everything", str(LEARNING_SEED)]
    pipeline = CONFIGS / "pipeline"
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "reward.yaml"),
            "--config",
            str(pipeline / "reward_from_sft.yaml"),
            *seed,
            "--trainer.enable_checkpointing",
            "false",
            *QUIET_FLAGS,
        ]
    )
    accuracies = measured("reward model val/accuracy", metric_rows("val/accuracy"))
    assert accuracies[0] == 0.5 and accuracies[-1] >= 0.9, accuracies
    assert (Path("outputs") / "reward" / "config.json").is_file()
    Path("runs").rename("reward_runs")  # the PPO run's metrics are read from runs/ next
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "ppo.yaml"),
            "--config",
            str(pipeline / "ppo_with_reward_model.yaml"),
            *seed,
            "--trainer.enable_checkpointing",
            "false",
            *QUIET_FLAGS,
        ]
    )
    learned = measured(
        "val/objective/train_reward_scores", metric_rows("val/objective/train_reward_scores")
    )  # before fit, every 50 rollouts and after the 152nd, which ends fit (600 optimizer steps)
    verifier = measured("val/objective/scores", metric_rows("val/objective/scores"))
    assert len(learned) == len(verifier) == 5, (learned, verifier)
    assert learned[-1] >= learned[0] + 0.6, learned
    assert verifier[-1] >= verifier[0] + 0.1, verifier


def test_running_moments_merge_batches_exactly():
    """Mean and (population) variance of 100 values folded in as batches of 10, 30 and 60 equal
    those of all 100 at once."""
    values = torch.randn(100, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3 + 2
    moments = RunningMoments()
    for part in values.split([10, 30, 60]):
        moments.update(part.sum(), (part**2).sum(), part.numel())
    assert int(moments.count) == 100
    torch.testing.assert_close(moments.mean, values.mean())
    torch.testing.assert_close(moments.var, values.var(unbiased=False))


@pytest.mark.parametrize("mode", ["initial", "running"])
def test_reward_normalization_standardises_with_the_first_or_every_rollout(mode):
    """``initial``: the first rollout's scores (1, 2, 3, 4) fix mean 2.5 and std sqrt(1.25); a
    later (5, 6) becomes (2.5, 3.5) / sqrt(1.25). ``running``: (5, 6) joins them: mean 3.5, variance
    35/12. A first rollout of equal scores fixes nothing under ``initial``."""
    module = PPO(reward=WordRulesReward(), reward_normalization=mode)
    if mode == "initial":
        assert module.normalise_scores(torch.tensor([7.0, 7.0])).tolist() == [0.0, 0.0]
        module.score_moments = RunningMoments()  # start again: equal scores must not have fixed anything either way
    first = module.normalise_scores(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    torch.testing.assert_close(first, (torch.tensor([1.0, 2.0, 3.0, 4.0]) - 2.5) / 1.25**0.5)
    later = module.normalise_scores(torch.tensor([5.0, 6.0]))
    mean, var = (2.5, 1.25) if mode == "initial" else (3.5, 35 / 12)
    torch.testing.assert_close(later, (torch.tensor([5.0, 6.0]) - mean) / var**0.5)
    assert PPO(reward=WordRulesReward()).normalise_scores(torch.tensor([1.0, 5.0])).tolist() == [1.0, 5.0]


def test_reward_normalization_is_refused_where_it_changes_nothing():
    with pytest.raises(SettingError, match=r"PPO: reward_normalization must be one of initial, running, got 'whiten'"):
        PPO(reward_normalization="whiten")
    with pytest.raises(SettingError, match="GRPO: reward_normalization must be unset with scale_rewards=group") as no:
        GRPO(reward_normalization="initial")
    assert "set scale_rewards none (Dr. GRPO)" in no.value.hint
    with pytest.raises(SettingError, match="GRPO: reward_normalization must be unset with scale_rewards=batch"):
        GRPO(reward_normalization="initial", scale_rewards="batch")
    with pytest.raises(
        SettingError, match="OnlineDPO: reward_normalization must be unset: .* only the scores' order matters"
    ):
        OnlineDPO(reward_normalization="running")
    assert GRPO(reward_normalization="running", scale_rewards="none").reward_normalization == "running"


def test_training_logs_raw_scores_and_held_out_training_reward_next_to_eval_reward():
    """With ``eval_reward`` set, held-out completions are scored by both rewards
    (``val/objective/scores``: the verifier; ``val/objective/train_reward_scores``: the training
    reward); under ``reward_normalization`` the logged training scores stay raw (completion
    lengths of 1 to 3 characters here, not standardised values)."""
    module = REINFORCE(
        reward=LengthReward(),
        eval_reward=WordRulesReward(),
        reward_normalization="running",
        generation={"max_new_tokens": 3, "temperature": 1.0},
        model={"reference": "copy"},
    )
    data = PromptDataModule(
        task=WordRulesTask(num_train=8, num_val=4, rules=("first",)), batch_size=4, max_length=32, use_cache=False
    )
    trainer = quiet_trainer(max_steps=2, limit_val_batches=1, num_sanity_val_steps=0, val_check_interval=2)
    trainer.fit(module, datamodule=data)
    metrics = trainer.callback_metrics
    assert 0.0 <= float(metrics["val/objective/scores"]) <= 1.0
    assert 0.0 <= float(metrics["val/objective/train_reward_scores"]) <= 3.0
    assert 0.0 <= float(metrics["train/objective/scores"]) <= 3.0
    assert int(module.score_moments.count) == 8  # 2 steps x 4 prompts, every score folded in
    logged_std = float(metrics["train/reward_normalization/std"])  # the statistics the scores were standardised by
    assert logged_std == pytest.approx(float(module.score_moments.std), abs=1e-6)


class LengthReward(RewardFunction):
    """Longer completions score higher: varied rewards even from an untrained policy."""

    def score(self, prompts, completions):
        return [float(len(completion)) for completion in completions]


@pytest.mark.parametrize("method", [GRPO, A2C])
def test_one_update_per_rollout_reuses_the_sampling_pass_with_the_same_result(method, monkeypatch):
    """One epoch, one minibatch: the update's forward (with gradients) also gives the sampling
    log-probs and values, instead of a second forward. The weights after the step equal those of
    the two-forward route (same samples; only the rows' summation order differs: measured 0 for
    GRPO, 1.4e-6 at most for A2C, against a step of 1e-3). Rewards: completion length, so an
    untrained policy's samples differ in score."""
    weights = {}
    for reuse in (True, False):
        monkeypatch.setattr(method, "updates_once", lambda self, rows, reuse=reuse: reuse and self.epochs == 1)
        lightning.seed_everything(0)
        module = method(
            reward=LengthReward(),
            generation={"max_new_tokens": 3, "temperature": 1.0},
            model={"reference": "copy"},
            optimizer={"lr": 1e-3, "warmup_ratio": 0.0},
            **({"samples_per_prompt": 2} if method is GRPO else {}),
        )
        initial = torch.cat([p.detach().flatten().clone() for p in module.parameters() if p.requires_grad])
        calls = []
        forward = module.forward_rollout
        monkeypatch.setattr(
            module, "forward_rollout", lambda batch, calls=calls, forward=forward: calls.append(1) or forward(batch)
        )
        data = PromptDataModule(
            task=WordRulesTask(num_train=8, num_val=2, rules=("first",)), batch_size=4, max_length=32, use_cache=False
        )
        trainer = quiet_trainer(max_steps=1, limit_val_batches=0)
        trainer.fit(module, datamodule=data)
        assert len(calls) == (1 if reuse else 2)
        weights[reuse] = torch.cat([p.detach().flatten() for p in module.parameters() if p.requires_grad])
    update, difference = (weights[False] - initial).abs(), (weights[True] - weights[False]).abs()
    assert update.mean() > 5e-4  # the step did move the weights (Adam's first step: about lr each)
    assert difference.max() < 1e-5, difference.max()


def _grpo_training(folder: Path, policy: Path, *flags: str) -> list[tuple[float, float]]:
    """(train/loss, train/objective/scores) per step of a 4-step GRPO run from ``policy``, run in ``folder``."""
    folder.mkdir()
    os.chdir(folder)  # the test's monkeypatch.chdir puts the working directory back
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "grpo.yaml"),
            "--model.init_args.model.name_or_path",
            str(policy),
            "--trainer.max_steps",
            "4",
            "--trainer.log_every_n_steps",
            "1",
            "--data.init_args.batch_size",
            "4",
            "--validate_before_fit",
            "false",
            *QUIET_FLAGS,
            *flags,
        ]
    )
    rows = [row for row in metrics_table() if row.get("train/loss")]
    return [(float(row["train/loss"]), float(row["train/objective/scores"])) for row in rows]


def test_validation_and_resuming_leave_the_training_samples_as_they_were(tmp_path, monkeypatch, sft_policy):
    """On-policy validation samples from the same random generators as training: validating every
    step or every second one gives the same training rollouts (losses and scores, exactly), and a
    run resumed from the step-2 checkpoint (saved by the validation there) repeats steps 3-4."""
    monkeypatch.chdir(tmp_path)
    every_2 = _grpo_training(
        tmp_path / "every_2",
        sft_policy,
        "--trainer.val_check_interval",
        "2",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.save_top_k",
        "-1",
        "--trainer.callbacks.dirpath",
        "checkpoints",
    )
    every_1 = _grpo_training(
        tmp_path / "every_1", sft_policy, "--trainer.val_check_interval", "1", "--trainer.limit_val_batches", "1"
    )
    assert len(every_2) == 4 and len({score for _, score in every_2}) > 1
    assert every_1 == every_2
    checkpoint = tmp_path / "every_2" / "checkpoints" / "epoch=0-step=2.ckpt"
    resumed = _grpo_training(
        tmp_path / "resumed", sft_policy, "--trainer.val_check_interval", "2", "--ckpt_path", str(checkpoint)
    )
    assert resumed == every_2[2:]
