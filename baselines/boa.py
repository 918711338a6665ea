"""BoA and TurboBoA: attention-aware quantization without backpropagation.

- **BoA** (Kim et al., "Attention-aware Post-training Quantization without
  Backpropagation", ICML 2025, arXiv 2406.13474): GPTQ's integer assignment with error
  compensation, but the query and key projections are quantized under the attention-aware
  Kronecker Hessian ``G_h ⊗ H`` of each head — ``G`` the key covariance ``2E[k kᵀ]`` for the
  query projection, the query covariance ``2E[q qᵀ]`` for the key projection (post-RoPE,
  rotated back and averaged over positions) — one out-channel (row) at a time, every row's
  error compensated along its own columns and along the head's later rows
  (:mod:`aespa.core.kronecker`). The value projection uses aespa's attention-weighted Hessian
  ``2E[(A_h X)(A_h X)ᵀ]`` per key/value head (``block_v``); the other linears are GPTQ under
  ``2E[x xᵀ]``. Grids: the clip search of :mod:`aespa.core.clip_search` on the original weights.
- **TurboBoA** (Kim et al., "Faster and Exact Attention-aware Quantization without
  Backpropagation", ICLR 2026, arXiv 2602.04929): (1) ``n_quant_rows`` rows of a head
  quantized at once with the closed-form compensation of the later rows (Prop. 3.1); (2) the
  error of the inputs left by earlier quantized blocks, GPTAQ's residual term
  ``α·2E[(x_fp − x_q) x_qᵀ]`` (``consider_dx``, ``alpha``; :mod:`aespa.core.residual`) in the
  column updates and in the row compensation (Prop. 3.2), and in the GPTQ layers; (3) the
  grid of every block of rows recomputed from its compensated weights (``adaptive_qparam``)
  and, the integers frozen, the scales refined by closed-form coordinate descent
  (``refine_qparam``, ``n_iters``, Prop. 3.3; :mod:`aespa.core.scale_refine`).

Both are one algorithm with different defaults (as the reference code, where BoA is
``--n_quant_rows 1`` without the other features): ``method=boa`` and ``method=turboboa``.

Per decoder block: one pass of the unquantized block over the quantized-stream inputs
gives every statistic (aespa's :func:`aespa.statistics.collect_block_statistics`; no
second statistics pass); with ``consider_dx``, one more pass of each stream gives the
residual term; then every linear is quantized from these statistics (later linears of the
block do not see the earlier ones' quantization, as the reference). Damping: ``percdamp``
times the mean diagonal on every input Hessian (per head for the value Hessian) and every
row covariance; dead input channels get ``dead_value`` on the diagonal and a zero weight
column (and a zero column of the residual term).

The two-stage group-scale optimisation (Kim et al., arXiv 2602.02126) is part of both:
stage 1 is ``qparam=hessian`` (each group's grid minimises its own Hessian-weighted
error), stage 2 is ``refine_qparam`` (per channel or per group, with the residual term
when ``consider_dx``).

Grouped-query attention, as the reference: the value Hessian and the query covariance
(objectives of the shared key/value heads) are the means over the query heads of each
key/value head, the key covariance (objective of the query heads) is each key/value
head's covariance repeated for its query heads; the residual term of the value projection
is averaged the same way.

Deviations from the reference code (SamsungLabs/TurboBoA), stated:
- ``adaptive_qparam=false`` keeps the grids found on the original weights for the whole
  solve, which is what the option says (in the release the grid of each block of rows is
  recomputed either way, so the option has no effect there). BoA's default is the fixed
  grid, TurboBoA's the adaptive one.
- ``refine_qparam`` also refines group-wise grids (the release refines per-channel grids
  only); a scale whose 1-D minimiser is not positive is kept.
- ``n_quant_rows`` above the head dimension is refused (the release clips it); it can only
  be checked once the model's configuration is read, so it is refused when the run checks
  the model, before any block is quantized.
- ``refine_qparam`` with ``bits=16`` (nothing to refine) is refused.
- ``block_v`` defaults to true for both (the release's flag is off by default; its README
  and reported results use it). ``act_order_col`` is ignored with group-wise grids (as the
  release).
- Statistics are accumulated over mini-batches of windows (the same running means up to
  float rounding); the column sweeps use lazy batch updates of ``blocksize`` columns (the
  same arithmetic up to float rounding); act-order sorts are stable.
- A clip search's initial best score is +inf (the release starts from 1e10 and so keeps
  the min-max grid for rows whose every score is above 1e10).
- ``percdamp`` is a knob (the release fixes 1 % of the mean diagonal, the default here). If a
  Cholesky factorisation fails, damping is raised ×10 (up to 3 times) and the record gets a
  note; the release adds 1 % of the mean diagonal until it succeeds.
- The row covariances of OPT are those of the query/key outputs with their biases, as the
  release. The attention probabilities are those of the causal attention the model
  computes (the ``ptq`` attention function); the release's OPT loader does not ask for
  eager attention, and with newer transformers its pass that reads the probabilities then
  runs without the causal mask.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from aespa.core.adapters import ModelAdapter
from aespa.core.clip_search import QPARAM_MODES, search_grid
from aespa.core.errors import UserError
from aespa.core.grid import Grid
from aespa.core.hessian import add_damping, prepare_hessian, zero_dead_columns
from aespa.core.kronecker import kronecker_sweep
from aespa.core.method import Footprint, Method, QuantSpec, hessian_footprint, register
from aespa.core.options import option
from aespa.core.pipeline import BlockContext
from aespa.core.residual import collect_residual_statistics
from aespa.core.scale_refine import refine_grid
from aespa.core.sweep import gptq_sweep
from aespa.statistics import collect_block_statistics


@register("boa")
class BoA(Method):
    """BoA (Kim et al., ICML 2025): GPTQ with attention-aware Kronecker Hessians for the query
    and key projections, rows compensated one by one; TurboBoA's features as switches."""

    @dataclass(frozen=True)
    class Options:
        block_v: bool = option(True, "value projection under the attention-weighted Hessian 2E[(A_h X)(A_h X)ᵀ] per "
                                     "key/value head; false: 2E[x xᵀ]")
        n_quant_rows: int = option(1, "rows (out-channels) of a head quantized jointly before the closed-form "
                                      "compensation of the later rows (TurboBoA feature 1; 1 = BoA)", low=1)
        consider_dx: bool = option(False, "residual term of the input error left by earlier blocks, "
                                          "alpha·2E[(x_fp − x_q) x_qᵀ] (TurboBoA feature 2, GPTAQ)")
        alpha: float = option(0.25, "weight of the residual term (GPTAQ's heuristic; only with consider_dx)",
                              low=0, high=1)
        adaptive_qparam: bool = option(False, "query/key: grid of each block of rows recomputed from its "
                                              "compensated weights (TurboBoA feature 3); false: grids fixed on the "
                                              "original weights")
        refine_qparam: bool = option(False, "with the integers fixed, scales refined by closed-form coordinate "
                                            "descent (TurboBoA feature 3; stage 2 of the two-stage optimisation)")
        n_iters: int = option(1, "coordinate-descent sweeps of refine_qparam", low=0)
        qparam: str = option("hessian", "grid search: hessian (e H eᵀ per group; stage 1 of the two-stage "
                                        "optimisation), mse (Σ|e|^2.4) or minmax (no search)", choices=QPARAM_MODES)
        act_order_col: bool = option(False, "visit input columns in decreasing H_jj (per-channel grids only)")
        act_order_row: bool = option(False, "visit the rows of each head in decreasing G_jj (query/key)")
        percdamp: float = option(0.01, "damping of every Hessian and row covariance, a fraction of its mean "
                                       "diagonal", positive=True)
        dead_value: float | None = option(None, "Hessian diagonal of dead input channels; null: 1/seqlen (the "
                                                "reference)", positive=True)
        blocksize: int = option(128, "columns per lazy-batch block of the column sweeps (speed only)", low=1)

    def __init__(self, spec: QuantSpec, options=None):
        super().__init__(spec, options)
        o = self.options
        self.needs_fp_stream = o.consider_dx  # the full-precision stream, for the residual term
        if o.refine_qparam and spec.bits >= 16:
            raise UserError(f"{self.name} option method.refine_qparam=true needs integer weights to refine; "
                            f"use bits 2..8 or method.refine_qparam=false")

    def check(self, model: ModelAdapter) -> None:
        super().check(model)
        head_dim = model.geometry.head_dim
        if self.options.n_quant_rows > head_dim:
            raise UserError(f"{self.name} option method.n_quant_rows={self.options.n_quant_rows} is above the head "
                            f"dimension of this model; use 1..{head_dim}")

    def footprint(self, block, windows: int, seqlen: int, batch_size: int) -> Footprint:
        """The plan's estimate: the block's statistics as aespa keeps them (every input Hessian, the
        value Hessian per kv-head with ``block_v``, the head covariances), the column/row sweep of
        the largest linear as GPTQ's; the statistics pass and the propagation (and, with
        ``consider_dx``, both streams through the residual statistics)."""
        o, g = self.options, block.geometry
        linears = block.linears()
        widths = [linears[grp.roles[0]].in_features for grp in block.groups]
        tokens, d = windows * seqlen, g.hidden_size
        state = 4 * sum(w * w for w in widths) + 4 * (g.num_heads + g.num_kv_heads) * g.head_dim ** 2
        _, work, flops = hessian_footprint(block, tokens)
        if o.block_v:
            state += 4 * g.num_kv_heads * d * d + 4 * g.num_heads * seqlen * d
            flops += 2.0 * tokens * g.num_heads * d * d
        passes = 2.0
        if o.consider_dx:
            state += 4 * sum(w * w for w in widths) + 4 * sum(m.weight.numel() for m in linears.values())
            passes += 1.0
        return Footprint(state, work, passes, flops, attention_observed=True)

    # ------------------------------------------------------------------ the algorithm, per block

    def quantize_block(self, ctx: BlockContext) -> None:
        o = self.options
        linears = ctx.block.linears()
        with ctx.phase("statistics"):
            stats = collect_block_statistics(ctx, value=o.block_v, query_key=True)
        residual = None
        if o.consider_dx:
            with ctx.phase("residual"):
                residual = collect_residual_statistics(ctx, linears, value=o.block_v)
        dead_value = o.dead_value if o.dead_value is not None else 1 / ctx.inputs.shape[1]
        head_covariances = {"q": stats.key_covariance, "k": stats.query_covariance}
        for role, linear in linears.items():
            per_head_value = role == "v" and o.block_v
            hessian = stats.value_hessian if per_head_value else stats.hessians[role]
            D = None
            if residual is not None:
                D = o.alpha * (residual.value if per_head_value else residual.inputs[role])
            with ctx.phase("sweep"):
                quantized, grid, raised = self.quantize_linear(linear.weight.data.float(), hessian,
                                                               head_covariances.get(role), D, dead_value)
            ctx.set_weight(role, quantized, grid)
            if raised:
                ctx.note(f"{self.name} {role}: a Cholesky factorisation failed at percdamp={o.percdamp}; "
                         "damping was raised")

    def quantize_linear(self, weight: torch.Tensor, hessian: torch.Tensor, head_covariance: torch.Tensor | None,
                        residual: torch.Tensor | None, dead_value: float) -> tuple[torch.Tensor, Grid, bool]:
        """One linear: the quantized weight, its grid, and whether damping had to be raised.

        ``hessian`` (undamped) ``[in, in]`` or ``[heads, in, in]``; ``head_covariance``
        (undamped) ``[heads, d_h, d_h]`` for the Kronecker solve, None for GPTQ; ``residual``
        the residual term already scaled by α, shaped like ``hessian``.
        """
        o, spec = self.options, self.spec
        H, dead = prepare_hessian(hessian, o.percdamp, dead_value)
        W = zero_dead_columns(weight, dead)
        if residual is not None:
            residual = zero_dead_columns(residual, dead)
        act_order_col = o.act_order_col and spec.group_size == -1

        def grid_of(rows: torch.Tensor, h: torch.Tensor) -> Grid:
            return search_grid(rows, spec.bits, spec.sym, spec.group_size, mode=o.qparam, hessian=h)

        if head_covariance is not None:
            G = add_damping(head_covariance.clone(), o.percdamp)  # no dead rows: the release damps G only
            result = kronecker_sweep(W, H, G, grid_of if o.adaptive_qparam else grid_of(W, H),
                                     rows=o.n_quant_rows, residual=residual, act_order_col=act_order_col,
                                     act_order_row=o.act_order_row, refine_iters=o.n_iters if o.refine_qparam else 0,
                                     blocksize=o.blocksize)
            return result.weight_q, result.grid, result.damping_raised

        grid = grid_of(W, H)
        sweep = gptq_sweep(W, hessian, grid, blocksize=o.blocksize, percdamp=o.percdamp, act_order=act_order_col,
                           dead_value=dead_value, residual=residual)
        quantized = sweep.weight_q
        if o.refine_qparam and o.n_iters > 0:
            quantized, grid = refine_grid(W, quantized, grid, H, residual=residual, iters=o.n_iters)
        return quantized, grid, sweep.damping > o.percdamp * (1 + 1e-6)


@register("turboboa")
class TurboBoA(BoA):
    """TurboBoA (Kim et al., ICLR 2026): BoA with 16 rows quantized jointly, the residual term of
    earlier blocks' error, adaptive grids and closed-form scale refinement."""

    @dataclass(frozen=True)
    class Options(BoA.Options):
        n_quant_rows: int = option(16, "rows (out-channels) of a head quantized jointly before the closed-form "
                                       "compensation of the later rows (feature 1; 1 = BoA)", low=1)
        consider_dx: bool = option(True, "residual term of the input error left by earlier blocks, "
                                         "alpha·2E[(x_fp − x_q) x_qᵀ] (feature 2, GPTAQ)")
        adaptive_qparam: bool = option(True, "query/key: grid of each block of rows recomputed from its compensated "
                                             "weights (feature 3); false: grids fixed on the original weights")
        refine_qparam: bool = option(True, "with the integers fixed, scales refined by closed-form coordinate "
                                           "descent (feature 3; stage 2 of the two-stage optimisation)")
