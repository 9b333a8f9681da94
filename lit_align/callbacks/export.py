"""Export the trained model as a Hugging Face folder when training ends (configured in YAML)."""

from __future__ import annotations

from pathlib import Path

from lightning import Callback, Trainer

from lit_align.errors import SettingError
from lit_align.methods.alignment import AlignmentModule
from lit_align.runtime.atomic import unwritable


class ExportHF(Callback):
    """Save the trained model + tokenizer at the end of ``fit`` through the module's
    :meth:`~lit_align.methods.AlignmentModule.export_hf` (a policy: a causal LM; a reward model:
    a sequence classifier).

    Without LoRA the model goes to ``output_dir``. With LoRA, ``output_dir/adapter`` gets the
    adapter (if ``adapter``) and ``output_dir/merged`` the merged model (if ``merged``); a module
    whose exports are always full models (the reward model: LoRA merged) writes ``output_dir``.

    Args:
        output_dir: destination folder.
        adapter: with LoRA, save the adapter-only folder.
        merged: with LoRA, save the adapter merged into the base weights.

    Under FSDP the parameters are gathered from all processes first (one full copy, on process 0
    only), so a sharded run exports one consolidated folder. Under FSDP2
    (:class:`lit_align.runtime.strategies.FSDP2Strategy`) the parameters are sharded tensors that
    ``save_pretrained`` cannot write: process 0 builds the module again, unsharded, from its
    hyper-parameters, loads the gathered weights and exports that.
    """

    def __init__(self, output_dir: str = "outputs/export", adapter: bool = True, merged: bool = True):
        self.output_dir, self.adapter, self.merged = Path(output_dir), adapter, merged

    def setup(self, trainer: Trainer, pl_module: AlignmentModule, stage: str) -> None:
        """Before training: the export folder can be written (else the export would fail only
        once training is done)."""
        problem = unwritable(self.output_dir) if stage == "fit" and trainer.is_global_zero else None
        if problem:
            raise SettingError(
                "ExportHF",
                "output_dir",
                f"{str(self.output_dir)!r} cannot be written ({problem}), so the export at the end "
                "of fit would fail; choose a folder you can write",
            )

    def on_fit_end(self, trainer: Trainer, pl_module: AlignmentModule) -> None:
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        if isinstance(trainer.strategy, FSDPStrategy):  # gather the shards (every process takes part); process 0 writes
            from torch.distributed.fsdp import FullyShardedDataParallel

            with FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False, rank0_only=True):
                if trainer.is_global_zero:
                    self.export(pl_module)
            trainer.strategy.barrier("export")
        elif isinstance(trainer.strategy, ModelParallelStrategy):  # FSDP2: every process gathers, process 0 writes
            full = _full_state_dict(pl_module)
            if trainer.is_global_zero:
                self.export(_unsharded_copy(pl_module, full))
            trainer.strategy.barrier("export")
        elif trainer.is_global_zero:
            self.export(pl_module)

    def export(self, pl_module: AlignmentModule) -> None:
        """Write the folder(s) this callback is configured for."""
        if not pl_module.backbone.is_peft or not pl_module.exports_lora_adapter:
            pl_module.export_hf(self.output_dir)
            return
        if self.adapter:
            pl_module.export_hf(self.output_dir / "adapter", merge_lora=False)
        if self.merged:
            pl_module.export_hf(self.output_dir / "merged", merge_lora=True)


def _full_state_dict(module: AlignmentModule) -> dict:
    """The module's state dict with every FSDP2 shard gathered (a collective: every process calls
    it); full tensors on process 0's CPU, nothing elsewhere."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _unsharded_copy(module: AlignmentModule, state_dict: dict) -> AlignmentModule:
    """A new, unsharded module of the same class and hyper-parameters holding ``state_dict`` (as
    ``lit-align export`` rebuilds one from a checkpoint)."""
    # the CLI records its own keys beside the arguments (``_class_path``): not arguments
    copy = type(module)(**{name: value for name, value in module.hparams.items() if not name.startswith("_")})
    copy.load_state_dict(state_dict)
    return copy
