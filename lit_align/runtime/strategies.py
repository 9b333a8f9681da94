"""FSDP for alignment modules: Lightning's ``FSDPStrategy`` with units planned from the model.

A method module holds a policy and often a frozen reference copy, LoRA adapters or a value head.
FSDP flattens the parameters of each wrapped unit into one flat parameter; a unit that mixes frozen
and trainable parameters keeps gradient memory for its frozen part. :func:`plan_fsdp_units` picks
the units so that never happens:

* every decoder layer (the classes the loaded model names in ``_no_split_modules``: read from the
  model, not hard-coded to Llama);
* a frozen model (the reference copy): its decoder stack (embeddings, layers, final norm) and,
  when not tied to the embeddings, its LM head (read through :func:`lit_align.model.sharding.gathered`,
  since the chunked log-prob path reads head weights directly instead of calling the head);
* inside any unit that would still mix frozen and trainable parameters, each trainable leaf module
  (LoRA's ``lora_A``/``lora_B``, a value head) as a unit of its own; LM heads are left out of
  this: the policy's stays in the root unit, which is gathered for the whole step.

A frozen head tied to its embeddings stays in the root (a warning says the root then mixes frozen
and trainable weights).

:class:`FSDPStrategy` applies that plan, optionally checkpoints the policy's decoder layers'
activations, and also runs on CPU (``device_id=torch.device("cpu")``, gloo), which Lightning's
stock strategy refuses: use it to debug sharding on a laptop and in tests.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torchmetrics import Metric

from lit_align.errors import SettingError
from lit_align.runtime.lightning_internals import FSDPStrategyBase, setup_activation_checkpointing

log = logging.getLogger(__name__)


def decoder_layer_classes(model: nn.Module) -> tuple[type[nn.Module], ...]:
    """Classes of the decoder layers of every Hugging Face model inside ``model``, from the
    models' own ``_no_split_modules``."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    classes = {type(module) for module in model.modules() if type(module).__name__ in names}
    if not classes:
        raise SettingError(
            None,
            "trainer.strategy",
            f"FSDPStrategy: no decoder layer class found in {type(model).__name__} (no Hugging Face model with "
            "_no_split_modules); pass auto_wrap_policy explicitly",
        )
    return tuple(sorted(classes, key=lambda cls: cls.__name__))


def _frozen_models(model: nn.Module) -> list[nn.Module]:
    """Outermost Hugging Face models inside ``model`` whose parameters are all frozen."""
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        params = list(module.parameters())
        if hasattr(module, "get_decoder") and params and not any(p.requires_grad for p in params):
            found.append(module)
            return
        for child in module.children():
            visit(child)

    visit(model)
    return found


def _own_parameters(module: nn.Module, units: set[int]) -> list[nn.Parameter]:
    """Parameters of ``module`` outside the planned units nested in it."""
    params = list(module.parameters(recurse=False))
    for child in module.children():
        if id(child) not in units:
            params.extend(_own_parameters(child, units))
    return params


def _trainable_leaves(module: nn.Module, units: set[int]) -> list[nn.Module]:
    leaves = []
    for child in module.children():
        if id(child) in units:
            continue
        own = list(child.parameters(recurse=False))
        if not list(child.children()) and own and all(p.requires_grad for p in own):
            leaves.append(child)
        else:
            leaves.extend(_trainable_leaves(child, units))
    return leaves


def plan_fsdp_units(model: nn.Module) -> list[nn.Module]:
    """Modules to wrap as FSDP units (``model`` itself is the root unit) so that no unit mixes
    frozen and trainable parameters (see the module docstring)."""
    layers = decoder_layer_classes(model)
    units = [m for m in model.modules() if isinstance(m, layers)]
    for frozen in _frozen_models(model):
        units.append(frozen.get_decoder())
        head = frozen.get_output_embeddings()
        if head is not None and head.weight is not frozen.get_input_embeddings().weight:
            units.append(head)  # read through lit_align.model.sharding.gathered
    heads = {
        id(m.get_output_embeddings())
        for m in model.modules()
        if hasattr(m, "get_output_embeddings") and m.get_output_embeddings() is not None
    }
    ids = {id(m) for m in units}
    for unit in [*units, model]:
        if _mixes_frozen_and_trainable(_own_parameters(unit, ids)):
            leaves = [leaf for leaf in _trainable_leaves(unit, ids) if id(leaf) not in heads]
            units.extend(leaves)
            ids.update(id(m) for m in leaves)
    for unit in [*units, model]:
        if _mixes_frozen_and_trainable(_own_parameters(unit, ids)):
            log.warning(
                "FSDP unit %s mixes frozen and trainable parameters (e.g. a reference LM head next to the policy's in "
                "the root): "
                "the frozen part's shard keeps gradient memory",
                type(unit).__name__,
            )
    return units


def _mixes_frozen_and_trainable(params: list[nn.Parameter]) -> bool:
    return len({p.requires_grad for p in params}) > 1


def check_unit_dtypes(model: nn.Module, units: list[nn.Module]) -> None:
    """Raise if a unit holds parameters of more than one dtype (FSDP flattens each unit into one
    tensor). The usual cause is QLoRA: 4-bit weights are packed in ``quant_storage`` (uint8 by
    default) while norms and embeddings keep the model dtype."""
    ids = {id(u) for u in units}
    for unit in [*units, model]:
        dtypes = {p.dtype for p in _own_parameters(unit, ids)}
        if len(dtypes) > 1:
            hint = (
                (
                    "; with QLoRA set model.quantization.quant_storage, quantization.compute_dtype and model.dtype to "
                    "one dtype "
                    "(e.g. bfloat16)"
                )
                if torch.uint8 in dtypes
                else ""
            )
            raise SettingError(
                None,
                "model.quantization",
                f"FSDPStrategy: unit {type(unit).__name__} holds parameters of dtypes "
                f"{sorted(str(d) for d in dtypes)}, "
                f"but FSDP flattens a unit into one tensor of one dtype{hint}",
            )


class FSDPStrategy(FSDPStrategyBase):
    """Lightning's FSDP strategy (every argument of it applies: ``sharding_strategy``,
    ``state_dict_type: sharded``, ``cpu_offload``, ...) with alignment-aware defaults.

    Args:
        plan_units: wrap the units :func:`plan_fsdp_units` picks (decoder layers read from the
            loaded model; frozen and trainable parameters never share a unit). Ignored when
            ``auto_wrap_policy`` is given.
        checkpoint_layers: activation checkpointing of the policy's decoder layers (recompute in
            backward instead of storing; frozen reference layers run without gradients anyway).
        state_dict_type: ``sharded`` (default here: each process writes its shards into a
            checkpoint folder) or ``full`` (one file gathered on process 0; GPU only: on CPU
            torch 2.13's full-state-dict gather crashes).
        **kwargs: :class:`lightning.pytorch.strategies.FSDPStrategy` arguments.

    Checkpoints default to ``state_dict_type: sharded`` (a folder of shards per checkpoint, each
    process writing its own; resume with ``--ckpt_path``; ``lit-align export`` consolidates one).
    On CPU (``trainer.accelerator: cpu``) the model is wrapped with ``device_id=cpu`` and the
    process group uses gloo: slow, but the same sharding, checkpoints and numerics as on GPUs.
    """

    strategy_name = "lit_align_fsdp"

    def __init__(
        self,
        plan_units: bool = True,
        checkpoint_layers: bool = False,
        state_dict_type: Literal["full", "sharded"] = "sharded",
        **kwargs: Any,
    ):
        super().__init__(state_dict_type=state_dict_type, **kwargs)
        self.plan_units, self.checkpoint_layers = plan_units, checkpoint_layers

    def wrap_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import CustomPolicy

        already_wrapped = any(isinstance(m, FullyShardedDataParallel) for m in model.modules())
        if self.plan_units and "auto_wrap_policy" not in self.kwargs and not already_wrapped:
            units = plan_fsdp_units(model)
            check_unit_dtypes(model, units)
            unit_ids = {id(m) for m in units}
            self.kwargs["auto_wrap_policy"] = CustomPolicy(lambda module: id(module) in unit_ids)
        if self.checkpoint_layers and not self.activation_checkpointing_kwargs:
            layers = decoder_layer_classes(model)
            frozen = {id(m) for f in _frozen_models(model) for m in f.modules()}
            policy_layer_ids = {id(m) for m in model.modules() if isinstance(m, layers) and id(m) not in frozen}
            self.activation_checkpointing_kwargs = {"check_fn": lambda module: id(module) in policy_layer_ids}
        if self.root_device.type != "cpu":
            return super().wrap_model(model)
        if already_wrapped:  # e.g. fit after validate: the units exist, only the root is wrapped again
            self.kwargs.pop("auto_wrap_policy", None)
        model = FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )
        for metric in (m for m in model.modules() if isinstance(m, Metric)):
            metric.to(self.root_device)  # FSDP leaves modules without parameters where they are; Lightning moves them
        setup_activation_checkpointing(model, self.activation_checkpointing_kwargs)
        return model


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 (``torch.distributed.fsdp.fully_shard``) through Lightning's ``ModelParallelStrategy``,
    data parallel only (one mesh dimension over every process): the strategy of the on-policy
    methods.

    Why not :class:`FSDPStrategy` (FSDP1) for them: Lightning wraps the whole LightningModule as
    FSDP1's root and runs ``training_step`` inside the root's forward; an on-policy step takes its
    backward passes there (manual optimisation, one per minibatch), and FSDP1's root flat
    parameter refuses a backward before its forward returned. FSDP2 shards each parameter on its
    own and runs hooks per module, so any number of forward/backward pairs inside a step work, a
    unit may mix frozen and trainable parameters (LoRA), and nothing is flattened.

    The module shards itself in ``configure_model``
    (:func:`lit_align.model.sharding.fully_shard_on_policy`). Runs on CPU with gloo (tests) as on
    GPUs. Checkpoints are Lightning's distributed checkpoint folders.
    """

    strategy_name = "lit_align_fsdp2"

    def __init__(self, **kwargs: Any):
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, **kwargs)

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def setup(self, trainer) -> None:
        module = self.lightning_module
        if not hasattr(module, "policy_version"):
            raise SettingError(
                None,
                "trainer.strategy",
                f"FSDP2Strategy runs the on-policy methods; {type(module).__name__} is not one: use "
                "lit_align.runtime.strategies.FSDPStrategy (configs/strategies/fsdp.yaml)",
            )
        super().setup(trainer)
