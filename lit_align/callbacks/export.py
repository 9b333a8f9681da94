"""Export the trained model as a Hugging Face folder when training ends (configured in YAML)."""

from __future__ import annotations

from pathlib import Path

from lightning import Callback, Trainer

from lit_align.methods.alignment import AlignmentModule


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
    """

    def __init__(self, output_dir: str = "outputs/export", adapter: bool = True, merged: bool = True):
        self.output_dir, self.adapter, self.merged = Path(output_dir), adapter, merged

    def on_fit_end(self, trainer: Trainer, pl_module: AlignmentModule) -> None:
        if not trainer.is_global_zero:
            return
        if not pl_module.backbone.is_peft or not pl_module.exports_lora_adapter:
            pl_module.export_hf(self.output_dir)
            return
        if self.adapter:
            pl_module.export_hf(self.output_dir / "adapter", merge_lora=False)
        if self.merged:
            pl_module.export_hf(self.output_dir / "merged", merge_lora=True)
