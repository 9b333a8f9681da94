"""Analytic FLOPs of a step, for throughput and MFU.

Counts the matrix multiplications the hardware executes, per padded token:

* every linear layer (including the LM head): forward ``2 * in * out``; backward ``2 * in * out``
  for the input gradient plus ``2 * in * out`` for the weight gradient when the weight trains
  (so the familiar 6N per token for full fine-tuning and about 4N under LoRA);
* attention scores and values: forward ``4 * T * d_attn`` per layer (QK^T and AV over the full
  T x T matrix, as eager attention computes them), backward twice that.

Embedding lookups and element-wise work are not counted; the chunked log-prob backward's extra
recompute of the LM head (``2 * H * V`` per token) is an implementation cost, not model FLOPs.
``tests/test_flops.py`` checks these numbers against ``torch.utils.flop_counter.FlopCounterMode``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class FlopsPerToken:
    """Linear-layer FLOPs per token of one forward and one backward, and attention shape."""

    linear_forward: int
    linear_backward: int
    num_layers: int
    attention_width: int

    def forward(self, tokens: int, seq_len: int) -> int:
        return tokens * (self.linear_forward + 4 * self.num_layers * seq_len * self.attention_width)

    def forward_backward(self, tokens: int, seq_len: int) -> int:
        attention = 4 * self.num_layers * seq_len * self.attention_width
        return tokens * (self.linear_forward + self.linear_backward + 3 * attention)


def flops_per_token(model: nn.Module) -> FlopsPerToken:
    """Per-token FLOPs of ``model`` from its linear layers and its config's attention shape."""
    forward = backward = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            flops = 2 * module.in_features * module.out_features
            forward += flops
            backward += flops + (flops if module.weight.requires_grad else 0)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return FlopsPerToken(forward, backward, config.num_hidden_layers, config.num_attention_heads * head_dim)
