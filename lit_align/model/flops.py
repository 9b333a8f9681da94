"""Analytic FLOPs of a step, for throughput and MFU.

Counts the matrix multiplications the hardware executes:

* every linear layer of the decoder, per (padded) token: forward ``2 * in * out``; backward
  ``2 * in * out`` for the input gradient plus ``2 * in * out`` for the weight gradient when the
  weight trains (the familiar 6N per token for full fine-tuning, about 4N under LoRA);
* the LM head, the same, but only for the tokens it is applied to: every token on the
  full-logits path, only the scored response tokens on the chunked path;
* attention scores and values: forward ``4 * T * d_attn`` per layer and token (QK^T and AV over
  the full T x T matrix, as eager attention computes them), backward twice that.

Embedding lookups and element-wise work are not counted; neither is the chunked log-prob
backward's recompute of the LM head (an implementation cost, not model FLOPs).
``tests/test_flops.py`` checks these numbers against ``torch.utils.flop_counter.FlopCounterMode``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class FlopsPerToken:
    """Per-token FLOPs of the decoder's linear layers and of the LM head, and attention shape."""

    body_forward: int
    body_backward: int
    head_forward: int
    head_backward: int
    num_layers: int
    attention_width: int

    def _attention(self, seq_len: int) -> int:
        return 4 * self.num_layers * seq_len * self.attention_width

    def forward(self, tokens: int, seq_len: int, head_tokens: int | None = None) -> int:
        head_tokens = tokens if head_tokens is None else head_tokens
        return tokens * (self.body_forward + self._attention(seq_len)) + head_tokens * self.head_forward

    def forward_backward(self, tokens: int, seq_len: int, head_tokens: int | None = None) -> int:
        head_tokens = tokens if head_tokens is None else head_tokens
        body = tokens * (self.body_forward + self.body_backward + 3 * self._attention(seq_len))
        return body + head_tokens * (self.head_forward + self.head_backward)


def _linear_flops(module: nn.Linear) -> tuple[int, int]:
    flops = 2 * module.in_features * module.out_features
    return flops, flops + (flops if module.weight.requires_grad else 0)


def flops_per_token(model: nn.Module) -> FlopsPerToken:
    """Per-token FLOPs of ``model`` from its linear layers and its config's attention shape."""
    head = model.get_output_embeddings()
    body_forward = body_backward = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and module is not head:
            forward, backward = _linear_flops(module)
            body_forward += forward
            body_backward += backward
    head_forward, head_backward = _linear_flops(head)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return FlopsPerToken(
        body_forward,
        body_backward,
        head_forward,
        head_backward,
        config.num_hidden_layers,
        config.num_attention_heads * head_dim,
    )
