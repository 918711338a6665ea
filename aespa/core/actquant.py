"""Activation fake-quantization for weight-activation runs (W6A6, W4A4, W4A8).

The setting of OmniQuant (§4.1) and QLLM (§5), shared by every weight-activation
method here (RTN, SmoothQuant, OmniQuant, QLLM), as the OmniQuant code does it:

- the input of **every** quantized linear (q, k, v, o, gate/up, down) is fake-quantized
  per token, dynamically, asymmetric min-max (:func:`aespa.core.grid.quantize_activation`);
- inside attention, Q and K before ``Q Kᵀ`` and V before ``P V`` are fake-quantized the
  same way; the softmax output P stays in full precision.
  Where the statistics are taken follows the reference modeling code: for rotary families
  (LLaMA) Q and K are quantized **after RoPE**, in ``[batch, head, token, head_dim]``
  layout, so per (token, head), and V likewise per (token, head); for OPT the quantizers
  sit on the projections' outputs before the head split (Q after its ``1/sqrt(d)``
  factor), so per token over all heads.

Both pieces go in through the adapter: :class:`QuantInputLinear` replaces a block's
linears (``BlockAdapter.set_linear``; same weight and bias parameters, so every method
still sees an ``nn.Linear``), and :class:`QKVQuantizer` is an
:class:`~aespa.core.attention.AttentionHook` ``transform``. They stay installed after
quantization, so the evaluation (``aespa.core.evaluation.perplexity``) runs the quantized
activations too. No modeling file is forked.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from aespa.core.adapters import BlockAdapter
from aespa.core.attention import AttentionHook
from aespa.core.grid import quantize_activation


class QuantInputLinear(nn.Linear):
    """A linear whose input is fake-quantized per token to ``act_bits`` before the product.

    Shares the wrapped linear's ``weight`` and ``bias`` parameters (no copy), so weight
    updates through the adapter or ``ctx.set_weight`` reach it unchanged.
    """

    def __init__(self, linear: nn.Linear, act_bits: int):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_parameter("weight", linear.weight)
        self.register_parameter("bias", linear.bias)
        self.act_bits = act_bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(quantize_activation(x, self.act_bits), self.weight, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", act_bits={self.act_bits}"


class QKVQuantizer:
    """Attention-hook transform: per-token fake quantization of Q, K and V (softmax output
    untouched). ``per_head``: statistics per (token, head) on ``[b, heads, T, d]``;
    otherwise per token over all heads (the heads are gathered back to ``[b, T, heads*d]``)."""

    def __init__(self, act_bits: int, per_head: bool):
        self.act_bits, self.per_head = act_bits, per_head

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.per_head:
            return quantize_activation(x, self.act_bits)
        b, h, t, d = x.shape
        tokens = x.transpose(1, 2).reshape(b, t, h * d)
        return quantize_activation(tokens, self.act_bits).reshape(b, t, h, d).transpose(1, 2)

    def __call__(self, query, key, value):
        return self.quantize(query), self.quantize(key), self.quantize(value)


def install_activation_quantizers(block: BlockAdapter, act_bits: int) -> None:
    """Quantize the inputs of every linear of ``block`` and its Q, K, V to ``act_bits``
    (idempotent: an already wrapped linear only gets its bit width updated)."""
    for role, linear in block.linears().items():
        if isinstance(linear, QuantInputLinear):
            linear.act_bits = act_bits
        else:
            block.set_linear(role, QuantInputLinear(linear, act_bits))
    # rotary families get Q/K after RoPE in head layout; the others before the head split
    block.set_attention_hook(AttentionHook(transform=QKVQuantizer(act_bits, per_head=block.geometry.rotary)))


def remove_activation_quantizers(block: BlockAdapter) -> None:
    """Back to full-precision activations (the plain linears, no attention hook)."""
    for role, linear in block.linears().items():
        if isinstance(linear, QuantInputLinear):
            plain = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              device="meta")
            plain.weight, plain.bias = linear.weight, linear.bias
            block.set_linear(role, plain)
    block.set_attention_hook(None)
