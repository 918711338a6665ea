"""The residual statistics of GPTAQ (Li et al., 2025) and of TurboBoA's feature 2 (Kim et
al., ICLR 2026): how far the quantized model's layer inputs have drifted from the
full-precision model's.

A layer should map the quantized model's input ``x_q`` to what the full-precision model
computes from its own input ``x_fp``: minimising ``E‖Q x_q − W x_fp‖²`` instead of
``E‖(Q − W) x_q‖²`` adds the cross term ``−2 tr(W D ΔWᵀ)`` to the layer objective, with

    D = 2 E[(x_fp − x_q) x_qᵀ]   (``[in, in]``, the ``2 E[·]`` convention of the Hessians)

which the sweeps scale by ``α`` (GPTAQ's heuristic, 0.25). For the value projection under
aespa's block-wise value objective the inputs are the attention-weighted ones, per head:
``2 E[(A_fp X_fp − A_q X_q)_h (A_q X_q)_hᵀ]``, averaged over the query heads that share a
key/value head (as the value Hessian).

One pass per mini-batch of windows over each stream: the full-precision stream
(``ctx.fp_inputs``) through the block with its full-precision weights (``fp_params``
replaces the weights of linears already quantized, for methods that quantize a block in
steps), then the quantized stream (``ctx.inputs``) through the block as it is. The value
term keeps the full-precision pass's attention-weighted inputs ``[windows, heads, T, in]``
until the quantized pass of the same windows, so its mini-batches hold at most
``VALUE_BUDGET_BYTES`` of them (one window at least).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from aespa.core.attention import AttentionHook
from aespa.core.hessian import RunningSecondMoment
from aespa.core.observe import observe_block

if TYPE_CHECKING:
    from aespa.core.pipeline import BlockContext

VALUE_BUDGET_BYTES = 2**28


@dataclass
class ResidualStatistics:
    inputs: dict[str, torch.Tensor]  # role -> 2 E[(x_fp − x_q) x_qᵀ] [in, in]
    value: torch.Tensor | None = None  # [kv_heads, in, in], attention-weighted (module docstring)
    tokens: int = 0


@torch.no_grad()
def collect_residual_statistics(ctx: BlockContext, roles: Iterable[str], *, value: bool = False,
                                fp_params: dict[str, torch.Tensor] | None = None) -> ResidualStatistics:
    """``D`` of the inputs of the linears ``roles`` of ``ctx.block`` (module docstring); with
    ``value`` also the attention-weighted one of the value projection (``"v"`` must be one of
    ``roles``). Needs the full-precision stream (``ctx.fp_inputs``)."""
    if ctx.fp_inputs is None:
        raise ValueError("the residual statistics need the full-precision stream (the method's needs_fp_stream)")
    block = ctx.block
    roles = list(roles)
    source: dict[str, str] = {}  # role -> the first role of its group among `roles` (the hooked one)
    for group in block.groups:
        members = [r for r in group.roles if r in roles]
        for r in members:
            source[r] = members[0]
    if value and "v" not in source:
        raise ValueError("the value residual needs 'v' among the roles")
    hooked = sorted(set(source.values()))
    moments = {r: RunningSecondMoment() for r in hooked}
    value_moment = RunningSecondMoment()
    kv_heads = block.geometry.num_kv_heads
    step = ctx.batch_size
    if value:
        per_window = block.geometry.num_heads * ctx.inputs.shape[1] * ctx.inputs.shape[2] * 4
        step = max(1, min(step, VALUE_BUDGET_BYTES // per_window))
    fp: dict[str, torch.Tensor] = {}

    def keep_fp(role):
        def hook(x):
            fp[role] = x.detach().float().clone()
        return hook

    def keep_fp_value(query, key, _value, probs):
        fp["value"] = probs.float() @ fp[source["v"]][:, None]  # A_h X: [b, heads, T, d]

    quantized_value_input: list[torch.Tensor] = []

    def accumulate(role):
        def hook(x):
            x = x.detach().float()
            moments[role].add(fp[role] - x, x)
            if value and role == source["v"]:
                quantized_value_input[:] = [x]
        return hook

    def accumulate_value(query, key, _value, probs):
        weighted = probs.float() @ quantized_value_input[0][:, None]  # [b, heads, T, d]
        delta = fp["value"] - weighted
        b, heads, tokens, d = weighted.shape
        by_kv = lambda t: t.reshape(b, kv_heads, heads // kv_heads, tokens, d).transpose(0, 1).reshape(kv_heads, -1, d)
        value_moment.add(by_kv(delta), by_kv(weighted), leading=1)

    options = dict(device=ctx.device, dtype=ctx.dtype, batch_size=step)
    for i in range(0, ctx.inputs.shape[0], step):
        fp.clear()
        observe_block(block, ctx.fp_inputs[i:i + step], ctx.kwargs, params=fp_params,
                      on_input={r: keep_fp(r) for r in hooked},
                      attention=AttentionHook(observe=keep_fp_value, needs_probs=True) if value else None, **options)
        observe_block(block, ctx.inputs[i:i + step], ctx.kwargs, on_input={r: accumulate(r) for r in hooked},
                      attention=AttentionHook(observe=accumulate_value, needs_probs=True) if value else None, **options)
    stats = ResidualStatistics({r: 2 * moments[source[r]].mean for r in roles}, tokens=moments[hooked[0]].tokens)
    if value:
        stats.value = 2 * value_moment.mean
    return stats
