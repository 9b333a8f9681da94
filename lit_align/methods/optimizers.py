"""The optimizers ``optimizer.name`` chooses from: a table of constructors, each taking the
trainable parameters and :class:`lit_align.settings.OptimizerSettings`.

torch's AdamW (plain or fused) and bitsandbytes' 8-bit and paged AdamW are used as they are; the
8-bit ones keep both Adam moments in 8 bits with block-wise scales (Dettmers et al. 2022), about a
quarter of AdamW's state memory. bitsandbytes is optional (``pip install 'lit-align[qlora]'``)
and imported only when one of its optimizers is chosen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from lit_align.errors import SettingError
from lit_align.settings import OptimizerName, OptimizerSettings

PAGED = ("paged_adamw", "paged_adamw_8bit")
"""Optimizers whose state is paged between GPU and CPU memory: CUDA only (on CPU bitsandbytes
falls back to the plain ones, so the choice would do nothing)."""


def _adam_options(settings: OptimizerSettings) -> dict:
    betas = tuple(settings.betas)
    return {"lr": settings.lr, "betas": betas, "eps": settings.eps, "weight_decay": settings.weight_decay}


def _torch_adamw(params, settings: OptimizerSettings) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, **_adam_options(settings))


def _torch_adamw_fused(params, settings: OptimizerSettings) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, fused=True, **_adam_options(settings))


def _bitsandbytes(class_name: str) -> Callable[..., torch.optim.Optimizer]:
    def build(params, settings: OptimizerSettings) -> torch.optim.Optimizer:
        try:
            import bitsandbytes.optim
        except ImportError:
            raise SettingError(
                None,
                "optimizer.name",
                f"optimizer.name={settings.name} needs bitsandbytes: pip install 'lit-align[qlora]'",
            ) from None
        return getattr(bitsandbytes.optim, class_name)(params, **_adam_options(settings))

    return build


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": _torch_adamw,
    "adamw_fused": _torch_adamw_fused,
    "adamw_8bit": _bitsandbytes("AdamW8bit"),
    "paged_adamw": _bitsandbytes("PagedAdamW"),
    "paged_adamw_8bit": _bitsandbytes("PagedAdamW8bit"),
}
"""``optimizer.name`` -> constructor(params, settings)."""


def build_optimizer(
    params: Iterable[torch.nn.Parameter], settings: OptimizerSettings, device: torch.device
) -> torch.optim.Optimizer:
    """The optimizer ``settings.name`` names, over ``params`` on ``device``."""
    name: OptimizerName = settings.name
    if name in PAGED and device.type != "cuda":
        raise SettingError(
            None,
            "optimizer.name",
            f"optimizer.name={name} pages optimizer state out of GPU memory, and this run is on {device.type}, where "
            "bitsandbytes falls back to the unpaged optimizer: use adamw_8bit or adamw",
        )
    return OPTIMIZERS[name](list(params), settings)
