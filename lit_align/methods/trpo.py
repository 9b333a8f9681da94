"""Trust Region Policy Optimization on language-model rollouts (Schulman et al. 2015)."""

from __future__ import annotations

from typing import Annotated, Optional

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.utils import parameters_to_vector

from lit_align.errors import NonFiniteLossError, SettingError
from lit_align.losses.policy_gradient import leave_one_out_advantages
from lit_align.losses.trpo import (
    LineSearchResult,
    backtracking_line_search,
    categorical_kl,
    conjugate_gradient,
    fisher_vector_product,
    flat,
    trpo_surrogate,
    trust_region_step_size,
)
from lit_align.methods.on_policy import PolicyPass
from lit_align.methods.policy_gradient import SequencePolicyGradient
from lit_align.online.rollout import Rollout
from lit_align.settings import Count, NonNegative, OptimizerSettings, Positive, Range, as_settings, changed_fields


class TRPO(SequencePolicyGradient):
    """Trust Region Policy Optimization (Schulman et al. 2015, eq. 14 and appendix C), critic-free.

    One update per rollout. Advantage of every token of completion i: the KL-penalised return
    R_i = score_i - beta sum_t KL_it minus the rollout's mean return, or minus the mean of the
    other samples of its prompt (leave-one-out) when ``samples_per_prompt`` >= 2. Surrogate
    L(theta) = mean over completion tokens of r_t A_i. The step: s = (F + damping I)^-1 g by
    ``cg_iterations`` of conjugate gradient on Fisher-vector products (F = Hessian of the mean
    KL(pi_old || pi_theta) over completion tokens, exact over the vocabulary, by double
    backprop), scaled by sqrt(2 max_kl / s^T F s), then halved (``backtrack_factor``) up to
    ``max_backtracks`` times until L improves and the measured mean KL <= ``max_kl``; if no
    candidate passes, the parameters are restored. No Adam: the parameters are written in place.

    Steps: ``configure_optimizers`` returns None (Lightning logs that it runs "with no
    optimizer"); the natural-gradient step runs as the closure of Lightning's placeholder
    optimizer, so each rollout counts one optimizer step and ``trainer.max_steps`` is the number
    of rollouts (= TRPO updates).

    Size limit: every trainable parameter is one flat float32 vector (several copies: gradient,
    CG vectors, theta_old, the step), each step runs about ``cg_iterations`` + 2 double-backward
    passes plus up to ``max_backtracks`` forwards, and the old logits of every completion token
    are kept ([tokens, vocab] floats). Fine for tiny models or LoRA adapters; not for full
    fine-tuning of billion-parameter models. Single device only (gradients come from
    ``torch.autograd.grad``, which DDP does not all-reduce); keep fp32 (``32-true``). Attention
    must support double backward: ``eager`` or ``sdpa`` (run with its math kernel for the pass
    the Fisher-vector products differentiate), not ``flash_attention_2``.

    Args:
        max_kl: delta, the trust region: bound on the mean per-token KL(pi_old || pi_new).
        cg_iterations: conjugate-gradient iterations (Fisher-vector products) per step.
        damping: added to F's diagonal (F + damping I) for a stable solve.
        max_backtracks: line-search candidates at most (fractions 1, 1/2, 1/4, ...).
        backtrack_factor: shrink factor of the line search.
        max_grad_norm: must stay unset: no gradient is clipped, the trust region bounds the step.
        optimizer: must stay unset: there is no AdamW and no learning-rate schedule.
        (everything else: :class:`lit_align.methods.on_policy.OnPolicyModule`; ``epochs`` must be 1
        and ``minibatch_size`` unset (one step on the whole rollout).)
    """

    def __init__(
        self,
        *args,
        max_kl: Positive = 0.01,
        cg_iterations: Count = 10,
        damping: NonNegative = 0.1,
        max_backtracks: Count = 10,
        backtrack_factor: Annotated[float, Range(0, 1, low_open=True, high_open=True)] = 0.5,
        max_grad_norm: Optional[Positive] = None,
        optimizer: Optional[OptimizerSettings] = None,
        **kwargs,
    ):
        super().__init__(*args, max_grad_norm=max_grad_norm, optimizer=optimizer, **kwargs)
        self.max_kl, self.cg_iterations, self.damping = max_kl, cg_iterations, damping
        self.max_backtracks, self.backtrack_factor = max_backtracks, backtrack_factor
        self.last_step: LineSearchResult | None = None
        """Line-search outcome of the latest update (accepted, fraction, steps, surrogate, kl)."""

    def check_settings(self) -> None:
        """Also refuse what TRPO's one natural-gradient step per rollout does not use: several
        epochs or minibatches, gradient clipping, an optimizer."""
        super().check_settings()
        h = self.hparams
        epochs, minibatch_size = h.get("epochs", 1), h.get("minibatch_size")
        if epochs != 1 or minibatch_size is not None:
            raise SettingError(
                "TRPO",
                "epochs",
                f"must be 1 and minibatch_size unset (TRPO takes one step on the whole rollout), "
                f"got {epochs} and {minibatch_size}",
            )
        if h.get("max_grad_norm") is not None:
            raise SettingError(
                "TRPO",
                "max_grad_norm",
                f"must be unset, got {h['max_grad_norm']!r}: TRPO clips no gradient, the trust region max_kl "
                "bounds its step",
            )
        if h.get("optimizer") is not None:
            raise SettingError(
                "TRPO",
                "optimizer",
                f"must be unset, got {changed_fields(as_settings(h['optimizer'], OptimizerSettings))}: TRPO has no "
                "AdamW and no learning-rate schedule, its natural-gradient step is sized by max_kl and the line search",
            )

    def sequence_advantages(self, returns: torch.Tensor, rollout: Rollout) -> torch.Tensor:
        if self.samples_per_prompt >= 2:
            return leave_one_out_advantages(returns, self.samples_per_prompt)
        return returns - returns.mean()

    def loss(self, part: Rollout, current: PolicyPass) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The negative surrogate -L(theta) (what a first-order method would minimise)."""
        surrogate = trpo_surrogate(current.logps.tokens, part.old_logps, part.advantages, part.mask)
        return -surrogate, {"loss/policy": -surrogate.detach()}

    def configure_optimizers(self):
        return None

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.trainer.world_size > 1:
            raise SettingError(
                None,
                "trainer.devices",
                "TRPO runs on one device: its gradients (torch.autograd.grad) are not all-reduced across processes",
            )

    def completion_logits(self, current: PolicyPass) -> torch.Tensor:
        """``[M, V]`` logits at the M completion positions of a pass."""
        return self.backbone.lm_head(self.backbone.policy)(current.hidden[current.logps.mask])

    def updates_once(self, rows: int) -> bool:
        """False: the natural-gradient step runs its own forwards (math attention kernel, for the
        double backward), so the sampling pass stays separate."""
        return False

    def optimise(
        self, part: Rollout, ptx: dict[str, torch.Tensor] | None = None, current: PolicyPass | None = None
    ) -> None:
        """The TRPO update, run as one (counted) step of Lightning's placeholder optimizer."""
        self.optimizers().step(closure=lambda: self.natural_gradient_step(part))

    def natural_gradient_step(self, part: Rollout) -> LineSearchResult:
        params = [p for p in self.backbone.policy.parameters() if p.requires_grad]
        with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no double backward
            current = self.forward_rollout(part.batch)
        logits = self.completion_logits(current)
        old_logits = logits.detach()
        surrogate = trpo_surrogate(current.logps.tokens, part.old_logps, part.advantages, part.mask)
        if not torch.isfinite(surrogate):
            raise NonFiniteLossError(f"TRPO: non-finite surrogate {float(surrogate)} at step {self.global_step}")
        gradient = flat(torch.autograd.grad(surrogate, params, retain_graph=True, allow_unused=True), params)
        fvp = fisher_vector_product(categorical_kl(old_logits, logits).mean(), params, self.damping)
        direction = conjugate_gradient(fvp, gradient, self.cg_iterations)
        fisher_direction = fvp(direction) - self.damping * direction  # F s, undamped: the KL's own curvature
        full_step = trust_region_step_size(direction, fisher_direction, self.max_kl) * direction
        del fvp, current, logits  # free the double-backward graph before the line search
        old_surrogate, old_params = float(surrogate.detach()), parameters_to_vector(params).detach().float().clone()

        @torch.no_grad()
        def evaluate(fraction: float) -> tuple[float, float]:
            assign_(params, old_params + fraction * full_step)
            trial = self.forward_rollout(part.batch)
            value = trpo_surrogate(trial.logps.tokens, part.old_logps, part.advantages, part.mask)
            return float(value), float(categorical_kl(old_logits, self.completion_logits(trial)).mean())

        if bool(full_step.any()) and bool(torch.isfinite(full_step).all()):
            result = backtracking_line_search(
                evaluate, old_surrogate, self.max_kl, self.max_backtracks, self.backtrack_factor
            )
        else:  # zero gradient (e.g. every advantage 0) or no usable curvature: nothing to step along
            result = LineSearchResult(False, 0.0, 0, old_surrogate, 0.0)
        if not result.accepted:
            assign_(params, old_params)
        self.last_step = result
        metrics = {
            "loss": -result.surrogate,
            "loss/policy": -result.surrogate,
            "policy/kl": result.kl,
            "policy/step_accepted": float(result.accepted),
            "policy/line_search_steps": float(result.steps),
            "policy/step_fraction": result.fraction,
            "policy/expected_improvement": float(gradient @ full_step) * result.fraction,
            "policy/surrogate_improvement": result.surrogate - old_surrogate,
        }
        self.log_metrics(
            "train",
            {name: torch.tensor([value], device=self.device) for name, value in metrics.items()},
            batch_size=part.size,
        )
        self.log_metrics("train", {"advantages": part.extra["advantage"]}, batch_size=part.size)
        return result


@torch.no_grad()
def assign_(params: list[torch.Tensor], vector: torch.Tensor) -> None:
    """Copy the flat ``vector`` into ``params`` in place (each keeps its storage and dtype;
    the inverse of :func:`torch.nn.utils.parameters_to_vector`)."""
    offset = 0
    for param in params:
        param.copy_(vector[offset : offset + param.numel()].view_as(param))
        offset += param.numel()
