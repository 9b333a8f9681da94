"""Per-token log-probabilities of the labels, computed from hidden states in chunks.

The naive path materialises logits of shape [batch, seq, vocab] (and autograd keeps a softmax of
the same size for backward). :func:`chunked_label_logps` instead multiplies the hidden states by the
output embedding a chunk of tokens at a time, keeps only one number per token (the log-sum-exp) for
backward, and recomputes each chunk's softmax in backward. Peak memory falls from O(N*V) to
O(chunk*V) with the same FLOPs up to one extra logits matmul in backward, and the numbers equal the
naive path's (tested in fp32 to 1e-5, values and gradients). When every row fits in one chunk the
forward's logits are kept until backward and become its gradient buffer (the one chunk*V tensor the
recompute would allocate), which skips that extra matmul; a module that calls the head twice before
one backward holds two such buffers during the second call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lit_align.data.labels import IGNORE_INDEX


class _ChunkedLabelLogps(torch.autograd.Function):
    """log softmax(h @ W^T + b)[label] per row, chunked over rows; -100 labels give 0."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size):
        n_rows = hidden.shape[0]
        acc = _accum_dtype(hidden)
        out = hidden.new_zeros(n_rows, dtype=acc)
        lse_all = hidden.new_zeros(n_rows, dtype=acc)
        valid = labels != IGNORE_INDEX
        safe_labels = labels.clamp(min=0)
        matmul_dtype = weight.dtype
        # one chunk and a backward to come: keep its logits rather than recompute them in backward
        keep_logits = n_rows <= chunk_size and any(ctx.needs_input_grad[:3])
        ctx.kept_logits = None
        for start in range(0, n_rows, chunk_size):
            stop = min(start + chunk_size, n_rows)
            raw = F.linear(hidden[start:stop], weight, bias)
            matmul_dtype = raw.dtype  # lower than the weights' under autocast
            logits = raw.to(acc)
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(-1, safe_labels[start:stop, None]).squeeze(-1)
            out[start:stop] = picked - lse
            lse_all[start:stop] = lse
            if keep_logits:
                ctx.kept_logits = logits
        out = out * valid
        # backward runs outside autocast: it repeats the matmul in the precision the forward used
        ctx.matmul_dtype = matmul_dtype
        ctx.save_for_backward(hidden, weight, bias if bias is not None else torch.empty(0), labels, lse_all)
        ctx.has_bias = bias is not None
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, labels, lse_all = ctx.saved_tensors
        # the kept logits become the gradient buffer (no second chunk-sized tensor at the start of
        # backward, where the activations are all still held); a second backward recomputes them
        kept, ctx.kept_logits = ctx.kept_logits, None
        bias = bias if ctx.has_bias else None
        valid = labels != IGNORE_INDEX
        safe_labels = labels.clamp(min=0)
        acc = lse_all.dtype
        grad_out = (grad_out.to(acc) * valid).contiguous()
        grads = HeadGradients(ctx.needs_input_grad, hidden, weight, bias, acc)
        mm = ctx.matmul_dtype
        weight_mm, bias_mm = weight.to(mm), (bias.to(mm) if bias is not None else None)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            stop = min(start + ctx.chunk_size, hidden.shape[0])
            g = grad_out[start:stop]
            if not torch.any(g):
                continue
            # d(logit_label - lse)/d logits = onehot(label) - softmax, built in place in the
            # freshly computed logits buffer (one chunk-sized tensor, no temporaries)
            if kept is not None:
                grad_logits = kept
            else:
                grad_logits = F.linear(hidden[start:stop].to(mm), weight_mm, bias_mm).to(acc)
            grad_logits.sub_(lse_all[start:stop, None]).exp_().mul_(-g[:, None])
            grad_logits.scatter_add_(-1, safe_labels[start:stop, None], g[:, None])
            grads.add(start, stop, grad_logits, hidden, weight_mm)
        return *grads.result(), None, None


class HeadGradients:
    """Gradients of the hidden states, LM-head weight and bias of a chunked head backward,
    accumulated chunk by chunk from each chunk's gradient w.r.t. its logits (in ``acc`` precision)."""

    def __init__(
        self, needs_input_grad, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, acc: torch.dtype
    ):
        need_h, need_w, need_b = needs_input_grad[:3]
        self.hidden_grad = torch.zeros_like(hidden) if need_h else None
        self.weight_grad = torch.zeros_like(weight, dtype=acc) if need_w else None
        self.bias_grad = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        self.weight, self.bias = weight, bias

    def add(
        self, start: int, stop: int, grad_logits: torch.Tensor, hidden: torch.Tensor, weight_mm: torch.Tensor
    ) -> None:
        if self.hidden_grad is not None:
            self.hidden_grad[start:stop] = (grad_logits.to(weight_mm.dtype) @ weight_mm).to(hidden.dtype)
        if self.weight_grad is not None:
            self.weight_grad += grad_logits.t() @ hidden[start:stop].to(grad_logits.dtype)
        if self.bias_grad is not None:
            self.bias_grad += grad_logits.sum(0)

    def result(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        weight_grad = self.weight_grad.to(self.weight.dtype) if self.weight_grad is not None else None
        bias_grad = self.bias_grad.to(self.bias.dtype) if self.bias_grad is not None else None
        return self.hidden_grad, weight_grad, bias_grad


def _accum_dtype(hidden: torch.Tensor) -> torch.dtype:
    """Softmax statistics are kept in float32 (float64 when the inputs are float64)."""
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


def chunked_label_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Log-probability of each label under ``softmax(hidden @ weight.T + bias)``, never building
    the full logits tensor.

    Args:
        hidden: ``[..., H]`` hidden states that predict ``labels`` (already shifted).
        weight: ``[V, H]`` output embedding (the LM head's weight).
        labels: ``[...]`` token ids; positions equal to -100 get log-prob 0 and no gradient.
        bias: optional ``[V]`` LM-head bias.
        chunk_size: rows (tokens) per chunk; peak extra memory is ``chunk_size * V`` floats.

    Returns:
        ``[...]`` per-token log-probs in float32 (float64 for float64 inputs).
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    shape = labels.shape
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    out = _ChunkedLabelLogps.apply(flat_hidden, weight, bias, flat_labels, chunk_size)
    # no view when the shape is already flat: an FSDP2 unit that returns a view (the sharded LM
    # head's registered log-prob method) warns that an in-place op on it would skip its hooks
    return out if out.shape == shape else out.view(shape)


def naive_label_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Reference path: full log-softmax over materialised logits (used in tests and benchmarks)."""
    valid = labels != IGNORE_INDEX
    logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return logps * valid


@dataclass
class SequenceLogps:
    """Log-probs of the response tokens of each row.

    Attributes:
        tokens: ``[B, T]`` per-token log-probs aligned with the labels (0 off the response).
        mask: ``[B, T]`` True on response tokens.
        sum: ``[B]`` summed log-prob of each response, log pi(y|x).
        count: ``[B]`` number of response tokens |y|.
    """

    tokens: torch.Tensor
    mask: torch.Tensor

    @property
    def sum(self) -> torch.Tensor:
        return self.tokens.sum(-1)

    @property
    def count(self) -> torch.Tensor:
        return self.mask.sum(-1)

    @property
    def mean(self) -> torch.Tensor:
        """Length-normalised log-prob, log pi(y|x) / |y|."""
        return self.sum / self.count.clamp(min=1)

    def split(self) -> tuple["SequenceLogps", "SequenceLogps"]:
        """(first half, second half) of the rows: chosen and rejected of a concatenated batch."""
        half = self.tokens.shape[0] // 2
        return SequenceLogps(self.tokens[:half], self.mask[:half]), SequenceLogps(self.tokens[half:], self.mask[half:])
