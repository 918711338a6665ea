"""Running a decoder block over calibration windows, plain or with hooks.

``run_block`` applies a block to every window in mini-batches (the pipeline's propagation
and evaluation). ``observe_block`` is the one way a method looks inside a block while it
runs: callbacks on the inputs or outputs of some linears (by role) and on attention
internals, optionally with replaced parameters (``torch.func.functional_call``) and
transformed linear inputs. With ``stop`` the forward pass of each mini-batch ends right
after the last callback that was asked for (in forward order), so collecting the
statistics of q/k/v does not pay for the MLP. Hessian accumulation, aespa's statistics,
the channel statistics of SmoothQuant/OmniQuant and QLLM's probes all go through it.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from aespa.core.adapters import BlockAdapter
from aespa.core.attention import AttentionHook


def to_device(obj, device, dtype: torch.dtype | None = None) -> Any:
    """Tensors inside ``obj`` (nested tuples, lists, dicts) moved to ``device``; floating
    tensors also cast to ``dtype`` when given."""
    if torch.is_tensor(obj):
        if dtype is not None and obj.is_floating_point():
            return obj.to(device=device, dtype=dtype)
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device, dtype) for k, v in obj.items()}
    return obj


def block_output(out) -> torch.Tensor:
    """The hidden states a decoder block returns (blocks return a tuple or a tensor)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def run_block(module: nn.Module, x: torch.Tensor, kwargs: dict, device, dtype, batch_size: int = 8,
              store_device=None) -> torch.Tensor:
    """The block applied to every sample of ``x`` ``[n, T, d]``, in mini-batches; the outputs
    are stored on ``store_device`` (default: ``x``'s) in ``x``'s dtype."""
    store_device = store_device or x.device
    kw = to_device(kwargs, device, dtype)
    out = None  # filled in place: the new stream costs one copy, not a list of batches and their concatenation
    for i in range(0, x.shape[0], batch_size):
        y = block_output(module(x[i : i + batch_size].to(device=device, dtype=dtype), **kw))
        if out is None:
            out = torch.empty((x.shape[0], *y.shape[1:]), dtype=x.dtype, device=store_device)
        out[i : i + y.shape[0]].copy_(y)
    return out


class _Observed(Exception):
    """Raised by the last callback asked for: the rest of the forward pass is not needed."""


def _forward_order(block: BlockAdapter, on_input, on_output, attention: AttentionHook | None) -> list[tuple]:
    """The callbacks' positions in the block's forward pass: a linear's input, then its
    output; attention internals after q/k/v and before o."""
    order = {role: i for i, role in enumerate(block.linears())}
    points = [(order[r], "input", r) for r in on_input] + [(order[r] + 0.5, "output", r) for r in on_output]
    if attention is not None and attention.observe is not None:
        points.append((order["o"] - 0.25, "attention", None))
    return sorted(points, key=lambda p: p[0])


@torch.no_grad()
def observe_block(block: BlockAdapter, inputs: torch.Tensor, kwargs: dict, *, device, dtype, batch_size: int = 8,
                  on_input: Mapping[str, Callable[[torch.Tensor], None]] | None = None,
                  on_output: Mapping[str, Callable[[torch.Tensor], None]] | None = None,
                  attention: AttentionHook | None = None, stop: bool = True, params: dict | None = None,
                  input_maps: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None
                  ) -> torch.Tensor | None:
    """Run ``block`` over ``inputs`` ``[n, T, d]`` in mini-batches with callbacks.

    - ``on_input[role](x)`` / ``on_output[role](y)``: the input / output of a linear, per
      mini-batch (after ``input_maps``, which replace a linear's input by ``fn(x)``);
    - ``attention``: an :class:`~aespa.core.attention.AttentionHook` on the block's attention
      for the duration of the pass (its ``observe`` gets post-RoPE Q/K, V and, with
      ``needs_probs``, the attention probabilities);
    - ``params``: parameters replaced by name for this pass (``functional_call``);
    - ``stop``: end each mini-batch's pass after the last callback (returns None); otherwise
      run the whole block and return its outputs (on ``inputs``' device and dtype).
    """
    on_input, on_output, input_maps = dict(on_input or {}), dict(on_output or {}), dict(input_maps or {})
    points = _forward_order(block, on_input, on_output, attention)
    last = points[-1] if stop and points else None

    def stopping(fn, point):
        def call(*args):
            fn(*args)
            if point == last:
                raise _Observed
        return call

    handles = [block.linear(r).register_forward_pre_hook(lambda m, args, fn=fn: (fn(args[0]), *args[1:]))
               for r, fn in input_maps.items()]
    for point in points:
        _, kind, role = point
        if kind == "input":
            callback = stopping(on_input[role], point)
            handles.append(block.linear(role).register_forward_pre_hook(lambda m, args, cb=callback: cb(args[0])))
        elif kind == "output":
            callback = stopping(on_output[role], point)
            handles.append(block.linear(role).register_forward_hook(lambda m, args, out, cb=callback: cb(out)))
    if attention is not None:
        hook = attention
        if attention.observe is not None:
            point = next(p for p in points if p[1] == "attention")
            hook = AttentionHook(attention.transform, stopping(attention.observe, point), attention.needs_probs,
                                 attention.extra)
        previous = getattr(block.attention, "_ptq_hook", None)
        block.set_attention_hook(hook)
    kw = to_device(kwargs, device, dtype)
    outputs = []
    try:
        for i in range(0, inputs.shape[0], batch_size):
            x = inputs[i : i + batch_size].to(device=device, dtype=dtype)
            try:
                out = functional_call(block.module, params, (x,), kw) if params else block.module(x, **kw)
            except _Observed:
                continue
            if not stop:
                outputs.append(block_output(out).to(device=inputs.device, dtype=inputs.dtype))
    finally:
        for h in handles:
            h.remove()
        if attention is not None:
            block.set_attention_hook(previous)
    return torch.cat(outputs) if not stop else None
