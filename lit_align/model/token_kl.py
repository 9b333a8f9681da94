"""Per-token KL between the reference and the policy over the whole vocabulary, in chunks.

TDPO (:class:`lit_align.methods.TDPO`) needs, at every response position t, the forward KL

    KL_t = KL(pi_ref(.|x, y_<t) || pi(.|x, y_<t)) = sum_v q_v (log q_v - log p_v),

with p = softmax(z) the policy's and q = softmax(r) the reference's next-token distribution,
and its sum over t, the sequential KL D_SeqKL(x, y; pi_ref || pi). That takes the logits of *both*
models at every position: the naive way builds two ``[rows, T, V]`` logits tensors, and autograd
keeps a softmax of the same size for backward.

How it is done here instead (:func:`chunked_token_kl`, a custom autograd Function):

1. The backbone runs each model's decoder once (:meth:`Backbone.hidden_states`) and keeps only
   the hidden states of response positions (prompt and padding never reach an LM head). The
   policy's keep their graph; the reference's are computed without gradients.
2. Forward walks over the positions ``chunk_size`` at a time: for one chunk it multiplies both
   hidden-state blocks by their LM heads (``[chunk, V]`` logits each), takes the two
   log-softmaxes in place, and keeps three numbers per position: KL_t, the policy's log-prob of
   the label and the reference's. The chunk's logits are then dropped. For backward it saves the
   inputs and one log-sum-exp per position and model, nothing of size V.
3. Backward walks over the chunks again and recomputes both chunks' logits (the reference's
   without gradients). With p and q rebuilt from the saved log-sum-exps, the gradient of
   ``g_kl * KL_t + g_lp * log p_label`` with respect to the policy logits is
   ``g_kl (p - q) + g_lp (onehot(label) - p)`` (d KL_t / d z = p - q since sum q = 1); it goes
   through the LM head to the hidden states, the head's weight and bias, chunk by chunk.

Peak extra memory is a few ``chunk_size x V`` buffers (O(chunk x V), not O(T x V)); the cost is
one extra logits matmul per model in backward, as in :mod:`lit_align.model.logprobs`. Softmax
statistics are float32 (float64 for float64 inputs); under autocast, backward repeats each
matmul in the precision the forward used. Values and gradients equal the naive full-logits
computation (tests/test_tdpo.py, float64).

The reference's hidden states come from the frozen copy (``reference: copy``) or from the policy
with its LoRA adapters disabled (``reference: adapter``). ``cached`` keeps only the log-probs of
the data's own tokens and ``none`` has no reference, so neither can give KL over the vocabulary.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from lit_align.data.labels import IGNORE_INDEX, shift_labels
from lit_align.data.packing import padded_layout, response_mask
from lit_align.model.backbone import Backbone
from lit_align.model.logprobs import HeadGradients, SequenceLogps, _accum_dtype
from lit_align.model.sharding import head_parameters

KL_NEEDS = "the reference model's logits over the whole vocabulary at every response position (its per-token KL)"
"""What token-level KL needs of the reference, for the errors of sources that cannot give it."""


class TokenKL(NamedTuple):
    """Per-position outputs of :func:`chunked_token_kl` (0 where the label is -100).

    Attributes:
        kl: KL(pi_ref || pi) over the vocabulary at each position (differentiable).
        logps: the policy's log-prob of each label (differentiable).
        reference_logps: the reference's log-prob of each label (no gradient).
    """

    kl: torch.Tensor
    logps: torch.Tensor
    reference_logps: torch.Tensor


class _ChunkedTokenKL(torch.autograd.Function):
    """KL(softmax(r) || softmax(z)) and label log-probs per row, chunked over rows."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, chunk_size):
        n_rows = hidden.shape[0]
        acc = _accum_dtype(hidden)
        kl = hidden.new_zeros(n_rows, dtype=acc)
        logps = hidden.new_zeros(n_rows, dtype=acc)
        ref_logps = hidden.new_zeros(n_rows, dtype=acc)
        lse_all = hidden.new_zeros(n_rows, dtype=acc)
        ref_lse_all = hidden.new_zeros(n_rows, dtype=acc)
        safe_labels = labels.clamp(min=0)
        matmul_dtype = ref_matmul_dtype = weight.dtype
        for start in range(0, n_rows, chunk_size):
            stop = min(start + chunk_size, n_rows)
            label = safe_labels[start:stop, None]
            raw = F.linear(hidden[start:stop], weight, bias)
            matmul_dtype = raw.dtype  # lower than the weights' under autocast
            logp = raw.to(acc)
            del raw
            lse = torch.logsumexp(logp, dim=-1)
            logp.sub_(lse[:, None])
            raw = F.linear(ref_hidden[start:stop], ref_weight, ref_bias)
            ref_matmul_dtype = raw.dtype
            logq = raw.to(acc)
            del raw
            ref_lse = torch.logsumexp(logq, dim=-1)
            logq.sub_(ref_lse[:, None])
            logps[start:stop] = logp.gather(-1, label).squeeze(-1)
            ref_logps[start:stop] = logq.gather(-1, label).squeeze(-1)
            # sum_v q_v (log q_v - log p_v), reusing the two chunk buffers
            logp.neg_().add_(logq)
            kl[start:stop] = logp.mul_(logq.exp_()).sum(-1)
            lse_all[start:stop] = lse
            ref_lse_all[start:stop] = ref_lse
            del logp, logq
        valid = labels != IGNORE_INDEX
        kl, logps, ref_logps = kl * valid, logps * valid, ref_logps * valid
        ctx.matmul_dtypes = (matmul_dtype, ref_matmul_dtype)
        empty = torch.empty(0, device=hidden.device)
        ctx.save_for_backward(
            hidden,
            weight,
            bias if bias is not None else empty,
            ref_hidden,
            ref_weight,
            ref_bias if ref_bias is not None else empty,
            labels,
            lse_all,
            ref_lse_all,
        )
        ctx.has_bias = (bias is not None, ref_bias is not None)
        ctx.chunk_size = chunk_size
        ctx.mark_non_differentiable(ref_logps)
        return kl, logps, ref_logps

    @staticmethod
    def backward(ctx, grad_kl, grad_logps, _grad_ref_logps):
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lse_all, ref_lse_all = ctx.saved_tensors
        bias = bias if ctx.has_bias[0] else None
        ref_bias = ref_bias if ctx.has_bias[1] else None
        valid = labels != IGNORE_INDEX
        safe_labels = labels.clamp(min=0)
        acc = lse_all.dtype
        g_kl = (grad_kl.to(acc) * valid).contiguous()
        g_lp = (grad_logps.to(acc) * valid).contiguous()
        grads = HeadGradients(ctx.needs_input_grad, hidden, weight, bias, acc)
        mm, ref_mm = ctx.matmul_dtypes
        weight_mm, bias_mm = weight.to(mm), (bias.to(mm) if bias is not None else None)
        ref_weight_mm, ref_bias_mm = ref_weight.to(ref_mm), (ref_bias.to(ref_mm) if ref_bias is not None else None)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            stop = min(start + ctx.chunk_size, hidden.shape[0])
            gk, gl = g_kl[start:stop, None], g_lp[start:stop, None]
            if not (torch.any(gk) or torch.any(gl)):
                continue
            # d(g_kl KL + g_lp log p_label)/dz = g_kl (p - q) + g_lp (onehot - p)
            #                                 = p (g_kl - g_lp) - g_kl q + g_lp onehot
            grad_logits = F.linear(hidden[start:stop].to(mm), weight_mm, bias_mm).to(acc)
            grad_logits.sub_(lse_all[start:stop, None]).exp_().mul_(gk - gl)
            q = F.linear(ref_hidden[start:stop].to(ref_mm), ref_weight_mm, ref_bias_mm).to(acc)
            q.sub_(ref_lse_all[start:stop, None]).exp_().mul_(gk)
            grad_logits.sub_(q)
            del q
            grad_logits.scatter_add_(-1, safe_labels[start:stop, None], gl)
            grads.add(start, stop, grad_logits, hidden, weight_mm)
        return *grads.result(), None, None, None, None, None


def chunked_token_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    reference_hidden: torch.Tensor,
    reference_weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    reference_bias: torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> TokenKL:
    """Per-position KL(pi_ref || pi) over the vocabulary and both label log-probs, never building
    full logits (see the module docstring).

    Args:
        hidden: ``[..., H]`` policy hidden states that predict ``labels`` (already shifted); with grad.
        weight: ``[V, H]`` the policy's LM-head weight.
        reference_hidden: ``[..., H]`` the reference's hidden states at the same positions (no grad).
        reference_weight: ``[V, H]`` the reference's LM-head weight (no grad).
        labels: ``[...]`` token ids; positions equal to -100 give 0 everywhere and no gradient.
        bias: optional ``[V]`` policy LM-head bias.
        reference_bias: optional ``[V]`` reference LM-head bias.
        chunk_size: positions per chunk; peak extra memory is a few ``chunk_size * V`` floats.

    Returns:
        :class:`TokenKL` of ``[...]`` tensors in float32 (float64 for float64 inputs).
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if reference_hidden.shape != hidden.shape:
        raise ValueError(
            f"policy and reference hidden states differ in shape: {tuple(hidden.shape)} vs "
            f"{tuple(reference_hidden.shape)}"
        )
    shape = labels.shape

    def detach(t):
        return None if t is None else t.detach()

    out = _ChunkedTokenKL.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        bias,
        reference_hidden.detach().reshape(-1, hidden.shape[-1]),
        reference_weight.detach(),
        detach(reference_bias),
        labels.reshape(-1),
        chunk_size,
    )
    return TokenKL(*(values.view(shape) for values in out))


class BatchTokenKL(NamedTuple):
    """Per-row results of :func:`batch_token_kl`, in the padded layout (``[R, T]`` tokens).

    Attributes:
        policy: the policy's per-token log-probs of the labels.
        reference: the reference's per-token log-probs (no gradient).
        kl: per-token KL(pi_ref || pi) in ``tokens``; its ``sum`` is D_SeqKL(x, y; pi_ref || pi).
    """

    policy: SequenceLogps
    reference: SequenceLogps
    kl: SequenceLogps


def batch_token_kl(backbone: Backbone, batch: dict[str, torch.Tensor], chunk_size: int | None = None) -> BatchTokenKL:
    """Policy and reference label log-probs and per-token KL(pi_ref || pi) of every row of ``batch``.

    One decoder forward per model; only response positions go through the two LM heads, in
    chunks of ``chunk_size`` positions (default: ``model.logp_chunk_size``, or 1024 when that is
    null). Padded and packed batches both come back in the padded layout.
    """
    backbone.reference_source.require_forward("token-level KL", KL_NEEDS)
    if chunk_size is None:
        chunk_size = backbone.settings.logp_chunk_size or 1024
    labels = shift_labels(batch["labels"])
    scored = labels != IGNORE_INDEX
    hidden = backbone.hidden_states(batch)[scored]
    with torch.no_grad():
        reference_hidden, reference_head = backbone.reference_source.hidden_states(backbone, batch)
        reference_hidden = reference_hidden[scored]
        reference_weight, reference_bias = head_parameters(reference_head, reference_hidden.dtype)
    head = backbone.lm_head(backbone.policy)
    values = chunked_token_kl(
        hidden,
        head.weight,
        reference_hidden,
        reference_weight,
        labels[scored],
        head.bias,
        reference_bias,
        chunk_size=chunk_size,
    )
    mask = response_mask(batch)

    def rows(per_position: torch.Tensor) -> SequenceLogps:
        return SequenceLogps(padded_layout(per_position, batch, scored), mask)

    return BatchTokenKL(rows(values.logps), rows(values.reference_logps), rows(values.kl))
