"""Export the policy as a Hugging Face folder when training ends (configured in YAML)."""

from __future__ import annotations

from pathlib import Path

from lightning import Callback, LightningModule, Trainer

from lit_align.export import export_policy


class ExportHF(Callback):
    """Save the trained policy + tokenizer at the end of ``fit``.

    Without LoRA the model goes to ``output_dir``. With LoRA, ``output_dir/adapter`` gets the
    adapter (if ``adapter``) and ``output_dir/merged`` the merged model (if ``merged``).

    Args:
        output_dir: destination folder.
        adapter: with LoRA, save the adapter-only folder.
        merged: with LoRA, save the adapter merged into the base weights.
    """

    def __init__(self, output_dir: str = "outputs/export", adapter: bool = True, merged: bool = True):
        self.output_dir, self.adapter, self.merged = Path(output_dir), adapter, merged

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        backbone = pl_module.backbone
        if not backbone.is_peft:
            export_policy(backbone, self.output_dir)
            return
        if self.adapter:
            export_policy(backbone, self.output_dir / "adapter", merge_lora=False)
        if self.merged:
            export_policy(backbone, self.output_dir / "merged", merge_lora=True)
