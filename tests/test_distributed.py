"""Scale-out: DDP and FSDP (2 CPU processes, gloo) reproduce a 1-process run with the same global
batch, FSDP units never mix frozen and trainable parameters, and on-policy methods under FSDP2
reproduce one process (or DDP)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_ddp_script
from transformers import GPT2Config, GPT2LMHeadModel

from lit_align.methods import DPO, PPO
from lit_align.runtime.strategies import (
    _mixes_frozen_and_trainable,
    _own_parameters,
    decoder_layer_classes,
    plan_fsdp_units,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
EXPORT = ["--trainer.callbacks+=lit_align.callbacks.ExportHF", "--trainer.callbacks.output_dir", "exported"]
"""CLI flags of an ExportHF callback writing ``exported`` at the end of fit."""
EVERY_3_STEPS_CHECKPOINTS = [
    "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
    "--trainer.callbacks.every_n_train_steps",
    "3",
    "--trainer.callbacks.save_top_k",
    "-1",
    "--trainer.callbacks.dirpath",
    "checkpoints",
]
"""CLI flags of a ModelCheckpoint keeping a checkpoint every 3 steps in ``checkpoints``."""


def _mixed_units(module: torch.nn.Module) -> list[str]:
    units = plan_fsdp_units(module)
    ids = {id(u) for u in units}
    return [type(u).__name__ for u in [*units, module] if _mixes_frozen_and_trainable(_own_parameters(u, ids))]


def test_decoder_layer_class_is_read_from_the_model():
    assert [cls.__name__ for cls in decoder_layer_classes(DPO().backbone.policy)] == ["LlamaDecoderLayer"]
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    assert [cls.__name__ for cls in decoder_layer_classes(gpt2)] == ["GPT2Block"]
    with pytest.raises(ValueError, match="no decoder layer class found"):
        decoder_layer_classes(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    "settings", [{"lora": {"r": 4}, "reference": "adapter"}, {"lora": {"r": 4}, "reference": "copy"}]
)
def test_lora_units_never_mix_frozen_and_trainable_parameters(settings):
    """LoRA: the trainable lora_A/lora_B leaves are units of their own inside each (frozen)
    decoder layer; a copy reference's decoder stack is a unit of its own."""
    module = DPO(model=settings)
    assert _mixed_units(module) == []
    units = plan_fsdp_units(module)
    trainable = [u for u in units if all(p.requires_grad for p in u.parameters())]
    assert trainable and all(type(u).__name__ == "Linear" for u in trainable)
    assert _mixed_units(PPO(model=settings)) == []  # the value head too


def test_full_fine_tuning_with_a_copy_reference_keeps_the_reference_in_frozen_units():
    """Full fine-tuning with a frozen copy: the reference's decoder stack and its (untied) LM head
    are units of their own, every policy weight is trainable, so no unit mixes the two."""
    module = DPO()
    assert _mixed_units(module) == []
    units = plan_fsdp_units(module)
    assert module.backbone.reference.lm_head in units and module.backbone.reference.get_decoder() in units
    assert module.backbone.policy.lm_head not in units  # read directly by the chunked log-probs: stays in the root


def _run(
    tmp_path: Path, name: str, config: str, *args: str, checkpoints: bool = False, expect_error: str = ""
) -> dict[str, list[float]]:
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LIT_ALIGN_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable,
        "-m",
        "lit_align.cli",
        "fit",
        "--config",
        str(CONFIGS / config),
        "--trainer.max_steps",
        "6",
        "--trainer.val_check_interval",
        "3",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.enable_checkpointing",
        str(checkpoints).lower(),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--validate_before_fit",
        "false",
        "--trainer.accelerator",
        "cpu",
        *args,
    ]
    result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    if expect_error:
        assert result.returncode != 0 and expect_error in result.stderr, result.stderr[-3000:]
        return {}
    assert result.returncode == 0, result.stderr[-3000:]
    path = max(
        (folder / "runs").rglob("metrics.csv"), key=lambda p: p.stat().st_mtime
    )  # a resumed run logs to a new version
    rows = list(csv.DictReader(open(path)))
    keys = ("train/loss", "val/rewards/accuracies", "train/rewards/accuracies", "val/objective/scores")
    return {key: [float(r[key]) for r in rows if r.get(key)] for key in keys}


@pytest.mark.slow
@pytest.mark.parametrize("config", ["dpo.yaml", "orpo.yaml", "tdpo.yaml"])
def test_ddp_and_fsdp_on_two_processes_reproduce_one_process(tmp_path, config):
    """DPO, ORPO and TDPO (whose frozen reference LM head, a unit of its own under FSDP, is read
    whole inside the step). Global batch 16: 1 process x 16 vs 2 processes x 8 under DDP and under FSDP (fp32). The
    per-step training loss (reduced over both processes) agrees to 1e-5; held-out accuracy (sums
    and counts reduced over processes, 200 examples) is the same number."""
    single = _run(tmp_path, "single", config, "--trainer.devices", "1", "--data.init_args.batch_size", "16")
    ddp = _run(
        tmp_path,
        "ddp",
        config,
        "--config",
        str(CONFIGS / "strategies" / "ddp.yaml"),
        "--trainer.devices",
        "2",
        "--data.init_args.batch_size",
        "8",
    )
    fsdp = _run(
        tmp_path,
        "fsdp",
        config,
        "--config",
        str(CONFIGS / "strategies" / "fsdp_cpu.yaml"),
        "--data.init_args.batch_size",
        "8",
    )
    assert len(single["train/loss"]) == 6 and len(single["val/rewards/accuracies"]) == 2
    for run in (ddp, fsdp):
        torch.testing.assert_close(
            torch.tensor(run["train/loss"]), torch.tensor(single["train/loss"]), rtol=0, atol=1e-5
        )
        assert run["val/rewards/accuracies"] == single["val/rewards/accuracies"]
        assert run["train/rewards/accuracies"] == single["train/rewards/accuracies"]


def test_qlora_needs_one_storage_dtype_per_unit():
    """QLoRA under FSDP: 4-bit weights packed as uint8 next to float32 norms cannot share a flat
    parameter; the check names the settings to change. With quant_storage = compute dtype = model
    dtype every unit has one dtype."""
    pytest.importorskip("bitsandbytes")
    from lit_align.runtime.strategies import check_unit_dtypes

    module = DPO(model={"lora": {"r": 4}, "quantization": {}, "reference": "adapter"})
    with pytest.raises(ValueError, match=r"uint8.*set model.quantization.quant_storage"):
        check_unit_dtypes(module, plan_fsdp_units(module))
    module = DPO(model={"lora": {"r": 4}, "quantization": {"quant_storage": "float32"}, "reference": "adapter"})
    check_unit_dtypes(module, plan_fsdp_units(module))


@pytest.mark.slow
def test_fsdp_sharded_checkpoints_resume_and_export_one_consolidated_folder(tmp_path):
    """FSDP on 2 processes with sharded checkpoints every 3 steps: the ExportHF callback writes
    one consolidated folder equal to a 1-process run's (same global batch); ``lit-align export``
    of the last sharded checkpoint folder writes the same weights; resuming from the step-3
    folder reproduces steps 4-6."""
    from safetensors.torch import load_file

    from lit_align.cli import main
    from lit_align.runtime.checkpoints import read_checkpoint

    fsdp = ["--config", str(CONFIGS / "strategies" / "fsdp_cpu.yaml"), "--data.init_args.batch_size", "8"]
    single = _run(
        tmp_path, "single", "dpo.yaml", "--trainer.devices", "1", "--data.init_args.batch_size", "16", *EXPORT
    )
    sharded = _run(tmp_path, "fsdp", "dpo.yaml", *fsdp, *EXPORT, *EVERY_3_STEPS_CHECKPOINTS, checkpoints=True)
    torch.testing.assert_close(
        torch.tensor(sharded["train/loss"]), torch.tensor(single["train/loss"]), rtol=0, atol=1e-5
    )
    weights = {name: load_file(tmp_path / name / "exported" / "model.safetensors") for name in ("single", "fsdp")}
    assert weights["single"].keys() == weights["fsdp"].keys()
    for key, value in weights["single"].items():
        torch.testing.assert_close(weights["fsdp"][key], value, rtol=0, atol=1e-4)
    folders = sorted((tmp_path / "fsdp" / "checkpoints").iterdir())
    assert [f.name for f in folders] == ["epoch=0-step=3.ckpt", "epoch=0-step=6.ckpt"] and all(
        f.is_dir() for f in folders
    )
    main(["export", "--ckpt_path", str(folders[-1]), "--output_dir", str(tmp_path / "from_shards")])
    consolidated = load_file(tmp_path / "from_shards" / "model.safetensors")
    assert all(torch.equal(consolidated[key], value) for key, value in weights["fsdp"].items())
    whole = read_checkpoint(str(folders[-1]), weights_only=False)  # consolidated in memory
    assert whole["global_step"] == 6 and whole["lit_align_class"] == "lit_align.methods.dpo:DPO"
    assert "policy" in " ".join(whole["state_dict"]) and whole["optimizer_states"]
    resumed = _run(tmp_path, "fsdp", "dpo.yaml", *fsdp, "--ckpt_path", str(folders[0]))
    torch.testing.assert_close(
        torch.tensor(resumed["train/loss"]), torch.tensor(sharded["train/loss"][3:]), rtol=0, atol=1e-6
    )


@pytest.mark.slow
def test_lora_under_fsdp_with_activation_checkpointing_reproduces_one_process(tmp_path):
    """LoRA with the adapter reference (trainable lora_A/lora_B leaves as units of their own) and
    activation checkpointing of the policy's layers, 2 FSDP processes x 8 vs 1 process x 16."""
    lora = ["--model.init_args.model.lora", "{r: 4}", "--model.init_args.model.reference", "adapter"]
    single = _run(tmp_path, "single", "dpo.yaml", *lora, "--trainer.devices", "1", "--data.init_args.batch_size", "16")
    fsdp = _run(
        tmp_path,
        "fsdp",
        "dpo.yaml",
        *lora,
        "--config",
        str(CONFIGS / "strategies" / "fsdp_cpu.yaml"),
        "--trainer.strategy.init_args.checkpoint_layers",
        "true",
        "--data.init_args.batch_size",
        "8",
    )
    assert len(single["train/loss"]) == 6
    torch.testing.assert_close(torch.tensor(fsdp["train/loss"]), torch.tensor(single["train/loss"]), rtol=0, atol=1e-5)
    assert fsdp["val/rewards/accuracies"] == single["val/rewards/accuracies"]


@pytest.mark.slow
def test_on_policy_methods_run_under_ddp_and_fsdp2_and_refuse_fsdp1(tmp_path, sft_policy):
    """GRPO (several manual optimizer steps per training_step, generation in the step) trains on
    2 DDP processes and on 2 FSDP2 processes (``configs/strategies/fsdp2_cpu.yaml``); under FSDP1
    it stops before training with a message naming FSDP2Strategy instead."""
    policy = [
        "--model.init_args.model.name_or_path",
        str(sft_policy),
        "--data.init_args.batch_size",
        "8",
        "--trainer.max_steps",
        "4",
        "--trainer.val_check_interval",
        "2",
    ]
    ddp = _run(
        tmp_path,
        "ddp",
        "grpo.yaml",
        *policy,
        "--config",
        str(CONFIGS / "strategies" / "ddp.yaml"),
        "--trainer.devices",
        "2",
    )
    fsdp2 = _run(tmp_path, "fsdp2", "grpo.yaml", *policy, "--config", str(CONFIGS / "strategies" / "fsdp2_cpu.yaml"))
    for run in (ddp, fsdp2):
        assert len(run["train/loss"]) >= 1 and all(0.0 <= v <= 1.0 for v in run["val/objective/scores"])
    _run(
        tmp_path,
        "fsdp",
        "grpo.yaml",
        *policy,
        "--config",
        str(CONFIGS / "strategies" / "fsdp_cpu.yaml"),
        expect_error="use lit_align.runtime.strategies.FSDP2Strategy",
    )


@pytest.mark.slow
def test_fsdp2_checkpoints_resume_exactly_and_export_one_consolidated_folder(tmp_path, sft_policy):
    """GRPO on 2 FSDP2 processes (sampling as usual, each process its own RNG) with checkpoints
    every 3 steps (distributed checkpoint folders): the ExportHF callback writes one folder
    (gathered shards) whose weights ``lit-align export`` of the last folder reproduces exactly and
    which differ from the starting policy; resuming from the step-3 folder reproduces the losses of
    steps 4-6 (the per-process RNG states come back with it)."""
    from safetensors.torch import load_file

    from lit_align.cli import main
    from lit_align.runtime.checkpoints import read_checkpoint

    fsdp2 = [
        "--config",
        str(CONFIGS / "strategies" / "fsdp2_cpu.yaml"),
        "--model.init_args.model.name_or_path",
        str(sft_policy),
        "--data.init_args.batch_size",
        "8",
    ]
    whole = _run(tmp_path, "fsdp2", "grpo.yaml", *fsdp2, *EXPORT, *EVERY_3_STEPS_CHECKPOINTS, checkpoints=True)
    assert len(whole["train/loss"]) == 6 and len({round(v, 5) for v in whole["train/loss"]}) > 3
    folders = sorted((tmp_path / "fsdp2" / "checkpoints").iterdir())
    assert [f.name for f in folders] == ["epoch=0-step=3.ckpt", "epoch=0-step=6.ckpt"] and all(
        f.is_dir() for f in folders
    )
    exported = load_file(tmp_path / "fsdp2" / "exported" / "model.safetensors")
    main(["export", "--ckpt_path", str(folders[-1]), "--output_dir", str(tmp_path / "from_shards")])
    consolidated = load_file(tmp_path / "from_shards" / "model.safetensors")
    start = load_file(sft_policy / "model.safetensors")
    assert exported.keys() == consolidated.keys() == start.keys()
    assert all(torch.equal(consolidated[key], value) for key, value in exported.items())
    assert max(float((exported[key] - start[key]).abs().max()) for key in start) > 1e-4
    checkpoint = read_checkpoint(str(folders[-1]), weights_only=False)  # consolidated in memory
    assert checkpoint["global_step"] == 6 and checkpoint["lit_align_class"] == "lit_align.methods.grpo:GRPO"
    resumed = _run(tmp_path, "fsdp2", "grpo.yaml", *fsdp2, "--ckpt_path", str(folders[0]))
    torch.testing.assert_close(
        torch.tensor(resumed["train/loss"]), torch.tensor(whole["train/loss"][3:]), rtol=0, atol=1e-6
    )


@pytest.mark.slow
def test_fsdp_bf16_mixed_precision_tracks_fp32(tmp_path):
    """trainer.precision bf16-mixed under FSDP (FSDP's MixedPrecision: bf16 compute and
    communication, fp32 master weights): the loss curve stays within 5e-3 of fp32 on one process
    (measured 4e-4) and differs from it (bf16 did run)."""
    single = _run(tmp_path, "single", "dpo.yaml", "--trainer.devices", "1", "--data.init_args.batch_size", "16")
    mixed = _run(
        tmp_path,
        "bf16",
        "dpo.yaml",
        "--config",
        str(CONFIGS / "strategies" / "fsdp_cpu.yaml"),
        "--trainer.precision",
        "bf16-mixed",
        "--data.init_args.batch_size",
        "8",
    )
    difference = (torch.tensor(mixed["train/loss"]) - torch.tensor(single["train/loss"])).abs()
    assert len(difference) == 6 and difference.max() < 5e-3 and difference.max() > 1e-6, difference


def _on_policy_run(folder: Path, mode: str, method: str) -> dict:
    result = run_ddp_script("fsdp_on_policy.py", folder, mode, method)
    assert result.returncode == 0, result.stderr[-3000:]
    # no sharded unit (LM head log-probs, value head) returns a view: FSDP2 warns an in-place op would skip its hooks
    assert "returned a view tensor" not in result.stderr, result.stderr[-3000:]
    return json.loads((folder / f"{method}_{mode}.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "against"),
    [("grpo", "single"), ("grpo_tied", "single"), ("grpo_lora", "single"), ("a2c", "ddp")],
)
def test_on_policy_methods_under_fsdp2_reproduce_the_unsharded_run(tmp_path, method, against):
    """Two FSDP2 processes x 4 prompts against one process x 8 (GRPO: sequence means, the same
    rows on either side) or two DDP processes (A2C, whose token-mean losses are per process by
    design): every training loss to 1e-5 over 3 rollouts of 2 epochs each (two backward passes per
    step, with a frozen reference copy, an LM head tied to the embeddings, LoRA, a value head), and
    the same held-out score from greedy generation with the sharded policy
    (``tests/scripts/fsdp_on_policy.py``; measured: 6e-8, tied 1.4e-7)."""
    sharded = _on_policy_run(tmp_path, "fsdp", method)
    unsharded = _on_policy_run(tmp_path, against, method)
    assert len(sharded["losses"]) == 6 and len({round(v, 4) for v in unsharded["losses"]}) > 3
    torch.testing.assert_close(torch.tensor(sharded["losses"]), torch.tensor(unsharded["losses"]), rtol=0, atol=1e-5)
    assert sharded["val"] == unsharded["val"]


def test_a_gloo_process_group_is_destroyed_before_the_interpreter_finalises(tmp_path):
    """Lightning destroys only an NCCL group at exit; a gloo group left to the interpreter's
    finalisation can abort a finished run (exit status -6, seen in CI). A fit under DDP (one
    process, gloo) leaves the group in place for the user but registers its destruction: the
    check registered before fit, run after every later exit handler, finds it gone."""
    done = run_ddp_script("process_group_at_exit.py", tmp_path / "cache")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "process group after fit: gloo" in done.stdout, done.stdout
    assert done.stdout.rstrip().endswith("process group at exit: False"), done.stdout
