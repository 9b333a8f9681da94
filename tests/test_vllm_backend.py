"""The ``vllm`` generation backend against the policy it samples for (runs where vllm is installed:
CI's vLLM environment, ``.ci/run``; skipped elsewhere).

vLLM's CPU attention needs a head dimension of at least 32, so the tiny model here is 128 wide
with 4 heads. The engine's log-probs of its own samples are compared with the trainer's after
each update: equal (to float rounding) only if the weights it sampled with were the policy's."""

from __future__ import annotations

import copy
import gc
import os
import subprocess
import sys
from pathlib import Path

import lightning
import pytest
import torch
from conftest import QUIET_FLAGS, quiet_trainer, run_ddp_script

pytest.importorskip("vllm", reason="the vllm backend's tests run in CI's vLLM environment (.ci/run)")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from lit_align.cli import main  # noqa: E402
from lit_align.data import PromptDataModule, WordRulesTask  # noqa: E402
from lit_align.methods import GRPO  # noqa: E402
from lit_align.online.rewards import RewardFunction  # noqa: E402
from lit_align.online.vllm_engine import engine_weights  # noqa: E402

pytestmark = pytest.mark.vllm
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
WIDE_TINY = {"tiny": {"hidden_size": 128, "num_heads": 4, "intermediate_size": 256}}
ENGINE = {"kv_cache_gib": 1, "max_model_len": 128}


@pytest.fixture(autouse=True)
def collect_engines():
    """The engines a test built are freed before the next test (each holds its KV cache, 1 GiB
    here; the suite outgrew the machine's memory without it)."""
    yield
    gc.collect()


class LengthReward(RewardFunction):
    def score(self, prompts, completions):
        return [float(len(completion)) for completion in completions]


def fit_and_watch(model: dict, steps: int = 3, engine: dict = ENGINE, **settings):
    """A GRPO fit on the vllm backend; every rollout it logged, the policy before training."""
    lightning.seed_everything(0)
    module = GRPO(
        reward=LengthReward(),
        samples_per_prompt=4,
        minibatch_size=8,
        generation={"max_new_tokens": 8, "temperature": 1.0, "backend": "vllm", "vllm": engine},
        model=model,
        optimizer={"lr": 3e-2, "warmup_ratio": 0.0},
        **settings,
    )
    initial = copy.deepcopy(module.backbone.policy)
    seen = []
    log_rollout = module.log_rollout
    module.log_rollout = lambda stage, rollout, *a, **k: seen.append(rollout) or log_rollout(stage, rollout, *a, **k)
    data = PromptDataModule(
        task=WordRulesTask(num_train=8, num_val=2, rules=("first",)), batch_size=4, max_length=32, use_cache=False
    )
    trainer = quiet_trainer(max_steps=steps, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    return module, seen, initial


def largest_gap(rollout) -> float:
    return float((rollout.sampler_logps - rollout.old_logps)[rollout.mask].abs().max())


TIED = {"tiny": {**WIDE_TINY["tiny"], "tie_word_embeddings": True}}


@pytest.mark.parametrize(
    "model",
    [WIDE_TINY, {**WIDE_TINY, "lora": {"r": 8, "alpha": 16}}, TIED, {**TIED, "lora": {"r": 8, "alpha": 16}}],
    ids=["full", "lora", "tied-full", "tied-lora"],
)
def test_engine_samples_with_the_policys_weights_after_each_update(model):
    """Each rollout's engine log-probs equal the trainer's recomputed ones (fp32: 1e-4), after
    updates (lr 3e-2) that moved the policy's log-probs of the same tokens by far more. With the LM
    head tied to the embeddings (SmolLM2's layout) too: vLLM's CPU head kept its dummy weights
    until the head was pushed under its own name."""
    module, seen, initial = fit_and_watch(model, steps=6)
    rollouts = seen[-2:]  # after 2 rollouts of 2 updates each
    assert len(seen) == 3 and all(r.sampler_logps is not None and r.mask.sum() > 8 for r in rollouts)
    for rollout in rollouts:
        assert largest_gap(rollout) < 1e-4, largest_gap(rollout)
    last = seen[-1]
    with torch.no_grad():
        logits = initial(input_ids=last.batch["input_ids"], attention_mask=last.batch["attention_mask"]).logits
    labels = torch.roll(last.batch["input_ids"], -1, 1)
    before = logits.log_softmax(-1).gather(-1, labels[..., None])[..., 0]
    moved = float((before - last.old_logps)[last.mask].abs().max())
    assert moved > 100 * max(largest_gap(last), 1e-6), moved


def test_a_bfloat16_engine_samples_with_the_fp32_policys_weights_rounded():
    """``generation.vllm.dtype: bfloat16`` under an fp32 policy: after each update the engine's
    log-probs follow the trainer's to bf16 rounding (gap under 0.1 nat while the updates moved
    them by more than 1) and not exactly (over 1e-4: the engine did run in bf16), and the
    mismatch is logged."""
    module, seen, initial = fit_and_watch(WIDE_TINY, steps=6, engine={**ENGINE, "dtype": "bfloat16"})
    assert next(module.backbone.policy.parameters()).dtype == torch.float32
    gaps = [largest_gap(rollout) for rollout in seen[-2:]]
    print("bf16 engine, largest gaps", gaps)
    assert all(1e-4 < gap < 0.1 for gap in gaps), gaps
    last = seen[-1]
    with torch.no_grad():
        logits = initial(input_ids=last.batch["input_ids"], attention_mask=last.batch["attention_mask"]).logits
    labels = torch.roll(last.batch["input_ids"], -1, 1)
    before = logits.log_softmax(-1).gather(-1, labels[..., None])[..., 0]
    assert float((before - last.old_logps)[last.mask].abs().max()) > 1.0


def test_peft_names_become_the_plain_model_names_and_only_wrapped_layers_move():
    """The first push carries every weight under its Hugging Face name; later pushes of a LoRA
    policy only the layers LoRA wraps (merged)."""
    module = GRPO(reward=LengthReward(), samples_per_prompt=2, model={**WIDE_TINY, "lora": {"r": 4}})
    policy = module.backbone.policy
    plain = {name for name, _ in module.backbone.policy.get_base_model().named_parameters()}
    everything = dict(engine_weights(policy, everything=True))
    assert set(everything) == {name.replace(".base_layer.", ".") for name in plain if "lora_" not in name}
    changing = dict(engine_weights(policy, everything=False))
    assert changing and all(name.endswith("proj.weight") for name in changing)
    assert "model.embed_tokens.weight" not in changing


def test_greedy_held_out_evaluation_matches_hf():
    """Greedy completions of held-out prompts are the same from the engine as from ``generate``."""
    scores = {}
    for backend in ("hf", "vllm"):
        lightning.seed_everything(0)
        extra = {"vllm": ENGINE} if backend == "vllm" else {}
        module = GRPO(
            reward=LengthReward(),
            samples_per_prompt=2,
            generation={"max_new_tokens": 8, "backend": backend, **extra},
            model=WIDE_TINY,
        )
        data = PromptDataModule(
            task=WordRulesTask(num_train=4, num_val=4, rules=("first",)), batch_size=4, max_length=32, use_cache=False
        )
        module.held_out_samples = []
        quiet_trainer().validate(module, datamodule=data)
        scores[backend] = [sample["completion"] for sample in module.held_out_samples]
    assert scores["hf"] == scores["vllm"]


def test_heads_too_small_for_vllms_cpu_attention_are_refused_with_the_fix():
    """The default tiny model's heads have 16 dimensions: one message naming the setting and the fix."""
    from lit_align.errors import SettingError

    module = GRPO(reward=LengthReward(), samples_per_prompt=2, generation={"backend": "vllm", "max_new_tokens": 2})
    data = PromptDataModule(task=WordRulesTask(num_train=2, num_val=2), batch_size=2, max_length=32, use_cache=False)
    with pytest.raises(SettingError, match=r"at least 32 dimensions.*have 16.*hidden_size: 128, num_heads: 4"):
        quiet_trainer(max_steps=1, limit_val_batches=0).fit(module, datamodule=data)


ON_POLICY_CONFIGS = [
    *("reinforce", "rloo", "grpo", "ppo", "a2c", "trpo", "online_dpo"),
    *("grpo_arithmetic", "grpo_dapo", "grpo_dr", "grpo_gspo", "grpo_cispo", "reinforce_pp"),
]


@pytest.mark.slow
@pytest.mark.parametrize("config", ON_POLICY_CONFIGS)
def test_on_policy_configs_run_on_the_vllm_backend(config, tmp_path, monkeypatch):
    """Each on-policy config trains two rollouts and validates with ``backend: vllm`` (its own
    model swapped for the wide tiny one, which vLLM's CPU attention takes)."""
    monkeypatch.chdir(tmp_path)
    main(
        [
            "fit",
            f"--config={CONFIGS / (config + '.yaml')}",
            "--model.init_args.model.name_or_path=tiny",
            "--model.init_args.model.tiny={hidden_size: 128, num_heads: 4, intermediate_size: 256}",
            "--model.init_args.generation.backend=vllm",
            "--model.init_args.generation.vllm={kv_cache_gib: 1, max_model_len: 256}",
            "--trainer.max_steps=2",
            "--trainer.log_every_n_steps=1",
            "--trainer.limit_val_batches=1",
            "--trainer.val_check_interval=1",
            "--samples=0",
            *QUIET_FLAGS,
        ]
    )
    (metrics,) = tmp_path.rglob("metrics.csv")
    text = metrics.read_text()
    assert "rollout/mismatch_kl" in text and "val/objective/scores" in text


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "weights"), [("ddp", "full"), ("fsdp2", "full"), ("fsdp2", "lora")])
def test_each_process_drives_its_own_engine_under_ddp_and_fsdp2(tmp_path, strategy, weights):
    """Two processes, one engine each (``external_launcher``): under DDP both sample with the
    averaged weights after every update; under FSDP2 with the shards of every process gathered for
    each push (full fine-tuning, and LoRA merged on the gathered copies): see
    ``tests/scripts/ddp_vllm_backend.py``."""
    result = run_ddp_script("ddp_vllm_backend.py", tmp_path, strategy, weights)
    assert result.returncode == 0 and "OK 3 rollouts" in result.stdout, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]  # vLLM's teardown at exit included


@pytest.mark.slow
def test_the_docs_command_runs_quietly_and_exits_without_a_traceback(tmp_path):
    """docs/rollouts.md's command (shortened to 2 steps), in a process of its own so its exit runs:
    vLLM's teardown of its process group once raised at every exit, after training had finished;
    and vLLM once logged three lines at every weight push."""
    command = [
        *(sys.executable, "-m", "lit_align.cli", "fit", f"--config={CONFIGS / 'grpo.yaml'}"),
        *("--model.init_args.generation.backend", "vllm", "--model.init_args.model.name_or_path", "tiny"),
        *("--model.init_args.model.tiny", "{hidden_size: 128, num_heads: 4}", "--trainer.max_steps=2"),
    ]
    path = os.pathsep.join(filter(None, [str(CONFIGS.parent), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    env.pop("VLLM_LOGGING_LEVEL", None)  # as a user's shell has it (an engine in this process sets it)
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "run folder:" in result.stdout, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    # nothing at each weight push: vLLM's INFO lines are off, its rotary-cache warning dropped
    output = result.stdout + result.stderr
    assert "Successfully reset prefix cache" not in output and "Failed to load weights" not in output, output[-3000:]
