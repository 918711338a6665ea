"""SmoothQuant (Xiao et al., ICML 2023): migrate the activation outliers into the weights,
then round — the weight-activation reference row of the OmniQuant/QLLM tables.

Per block:

1. ``max_t |X_{t,j}|`` for the input of every norm-fed group of linears (attn-norm →
   q, k, v; mlp-norm → fc1 | gate, up), from the full-precision block on the
   full-precision stream.
2. Migration scale per channel (Eq. 4): ``s_j = max|X_j|^α / max|W_{:,j}|^(1-α)``, the
   weight maximum over **all** consumers of that input (q, k, v concatenated; gate+up),
   clamped to >= 1e-5 — as ``smoothquant/smooth.py`` does.
3. Fold: norm gain (and bias) divided by s, consumer columns multiplied by s
   (``aespa.core.transforms``). out_proj/o and fc2/down are not smoothed.
4. Weights: per-channel (or group-wise) min-max RTN on the shared grid; activations:
   per-token dynamic asymmetric min-max on every linear input and on Q, K, V
   (``aespa.core.actquant``), softmax output in full precision — the setting in which
   OmniQuant (§4.1) and QLLM (§5) reproduce SmoothQuant at W6A6/W4A4.

Deviations: the official code calibrates on 512 Pile documents and quantizes W8A8 with
symmetric abs-max; here the statistics come from the run's calibration set and the
quantizers are the shared asymmetric ones of the W6A6/W4A4 tables.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from aespa.core.actquant import install_activation_quantizers
from aespa.core.grid import minmax_grid
from aespa.core.method import Method, register
from aespa.core.options import option
from aespa.core.pipeline import BlockContext
from aespa.core.transforms import (
    ChannelStatistics,
    norm_fed_groups,
    refuse_residual_fed,
    scale_norm_inputs,
    smoothing_scale,
)


@register("smoothquant")
class SmoothQuant(Method):
    needs_fp_stream = True
    supports_act_quant = True

    @dataclass(frozen=True)
    class Options:
        alpha: float = option(0.5, "migration strength (reference default; its README uses 0.85 for LLaMA-2)",
                              low=0, high=1)

    def check(self, model) -> None:
        """The smoothing scales fold into the norms before q/k/v and fc1: a family without them is refused."""
        super().check(model)
        refuse_residual_fed(model.block(0), "smoothquant", "for weight-activation runs there use rtn or "
                                                           "omniquant with method.let=false")

    def quantize_block(self, ctx: BlockContext) -> None:
        block = ctx.block
        groups = norm_fed_groups(block)
        with ctx.phase("statistics"):
            stats = ChannelStatistics()
            ctx.observe(ctx.fp_inputs, on_input=stats.hooks([g.roles[0] for g in groups]))
        with ctx.phase("smooth"), torch.no_grad():
            scales = {}
            for g in groups:
                w_max = torch.stack([block.linear(r).weight.float().abs().amax(dim=0) for r in g.roles]).amax(dim=0)
                scales[g.feeder] = smoothing_scale(stats.absmax[g.roles[0]], w_max, self.options.alpha)
            scale_norm_inputs(block, scales)
        with ctx.phase("round"):
            for role, linear in block.linears().items():
                w = linear.weight.data.float()
                grid = minmax_grid(w, self.spec.bits, self.spec.sym, self.spec.group_size)
                ctx.set_weight(role, grid.fake_quantize(w), grid)
        if not self.spec.weight_only:
            install_activation_quantizers(block, self.spec.act_bits)
