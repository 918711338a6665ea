"""Access to attention internals, and rotary embeddings.

The ``ptq`` attention function is registered with transformers (``register_attention``)
and used for every model this project loads. It computes exactly what the eager
reference computes; a method that needs what happens inside attention (post-RoPE
queries and keys, values, attention probabilities) or wants to change it (Q/K/V
fake-quantization) attaches an :class:`AttentionHook` to a block's attention module
through the family adapter, never by forking a modeling file.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as the LLaMA family applies it (rotate-half convention)."""
    return x * cos + rotate_half(x) * sin


def rotation_matrices(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``R_t`` for every position t, ``[T, d, d]``, with ``apply_rotary(x)_t = R_t x_t``."""
    cos, sin = cos.reshape(-1, cos.shape[-1]), sin.reshape(-1, sin.shape[-1])
    d = cos.shape[-1]
    eye = torch.eye(d, dtype=cos.dtype, device=cos.device)
    # columns of R_t are the images of the basis vectors
    return apply_rotary(eye[None, :, :], cos[:, None, :], sin[:, None, :]).transpose(1, 2)


@dataclass
class AttentionHook:
    """What a method may do inside attention, per call of one block's attention.

    ``transform(query, key, value)`` may return replaced tensors (e.g. fake-quantized);
    ``observe(query, key, value, probs)`` receives the query *without* the 1/sqrt(d)
    factor, post-RoPE queries/keys ``[b, heads|kv_heads, T, d]`` and, when
    ``needs_probs``, the attention probabilities ``[b, heads, T, T]`` (causal mask applied).
    """

    transform: Callable | None = None
    observe: Callable | None = None
    needs_probs: bool = False
    extra: dict = field(default_factory=dict)


def _repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    return x if n == 1 else x.repeat_interleave(n, dim=1)


def ptq_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs) -> tuple:
    """Eager attention with access for methods; identical numerics to the eager reference."""
    hook: AttentionHook | None = getattr(module, "_ptq_hook", None)
    if scaling is None:
        scaling = module.scaling
    if hook is not None and hook.transform is not None:
        query, key, value = hook.transform(query, key, value)
    n_rep = query.shape[1] // key.shape[1]
    k, v = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    if hook is None or (hook.observe is None and not hook.needs_probs):
        out = torch.nn.functional.scaled_dot_product_attention(
            query, k, v, attn_mask=None if attention_mask is None else attention_mask[:, :, :, : k.shape[-2]],
            scale=scaling, is_causal=attention_mask is None and query.shape[2] > 1)
        return out.transpose(1, 2).contiguous(), None
    scores = torch.matmul(query, k.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : k.shape[-2]]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if hook.observe is not None:
        hook.observe(query / getattr(module, "_ptq_query_prescale", 1.0), key, value, probs)
    out = torch.matmul(probs, v)
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> str:
    """Register the ``ptq`` attention function (and its dense causal mask) with transformers."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register("ptq", ptq_attention)
    AttentionMaskInterface.register("ptq", eager_mask)
    return "ptq"
