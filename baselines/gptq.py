"""GPTQ (OPTQ): layer-wise quantization with second-order error compensation
(Frantar et al., ICLR 2023; reference code IST-DASLab/gptq).

Per decoder block, for each group of linears that read the same input (adapter order:
q/k/v, then o, then up/gate, then down):

1. Hessian ``H = 2/N Σ x xᵀ`` of the group's input, from a pass of the block over the
   quantized-stream calibration inputs (``aespa.core.hessian.collect_hessians``);
2. for each linear of the group, the column sweep of ``aespa.core.sweep.gptq_sweep`` (Alg. 1:
   min-max grid, dead columns, damping ``percdamp · mean diag H``, Cholesky factor of
   ``H⁻¹``, blocked lazy updates, optional ``act_order`` and static groups), and the
   quantized weight written back.

With ``true_sequential`` (default here) each group's Hessian is collected after the
earlier groups of the block are quantized, so later linears see quantized inputs; with
``true_sequential: false`` all Hessians come from one pass of the unquantized block (the
reference OPT script). The pipeline then propagates the quantized block's outputs to
the next block, as the reference.

Deviations from the reference, stated:
- ``true_sequential`` defaults to true for every family (the reference OPT script has no
  such option; the LLaMA script has it off by default and its README recommends it).
- Hessians are accumulated over mini-batches of ``batch_size`` sequences instead of one
  sequence at a time (the same running mean up to float rounding), and once per group of
  linears that share an input instead of once per linear (identical values).
- The block is quantized in fp32 (the pipeline's compute dtype) where the reference runs
  it in fp16; the sweep is fp32 in both (TF32 stays off: PyTorch's default, the reference
  sets it explicitly).
- If the Cholesky factorisation fails, the damping is raised ×10 (up to 3 times) instead
  of crashing, and the block's record gets a note; the reference raises.

Two additions from later papers, off by default (plain GPTQ):

- ``alpha`` > 0: GPTAQ's residual term (Li et al., 2025; TurboBoA's feature 2): the sweep
  also compensates the drift of each linear's input from the full-precision model's,
  through ``D = alpha · 2/N Σ (x_fp − x_q) x_qᵀ`` (``aespa.core.residual``, in the scale of
  the Hessian; ``aespa.core.sweep``). ``x_fp`` comes from the full-precision block on the
  full-precision stream (the pipeline keeps it when ``alpha`` > 0), ``x_q`` from the block
  as it is on the quantized stream, so with ``true_sequential`` it includes the error of the
  block's earlier groups.
- The two-stage group-scale optimisation (Kim et al., arXiv 2602.02126), per group or per
  channel. Stage 1, ``qparam=hessian``: before the sweep, each (row, group) grid is the
  clip of its min-max range minimising the group's own error ``e H_gg eᵀ``
  (``aespa.core.clip_search``); these grids stay fixed during the sweep (like
  ``static_groups``). Stage 2, ``refine_qparam``: after the sweep, with the integers frozen,
  the scales are refined by closed-form coordinate descent on ``tr(ΔW H ΔWᵀ) − 2 tr(W D ΔWᵀ)``
  (``aespa.core.scale_refine``, ``n_iters`` sweeps; ``D`` = 0 without ``alpha``). The paper
  gives no code; the stage-1 search is the one of its authors' TurboBoA release, and stage 2
  follows the paper's description (its authors' release has it only as an unused helper).
  Stage 2 with ``act_order`` and dynamic groups is refused (those groups are not contiguous
  columns).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from aespa.core.clip_search import QPARAM_MODES, search_grid
from aespa.core.errors import UserError
from aespa.core.hessian import collect_hessians, prepare_hessian, zero_dead_columns
from aespa.core.method import Footprint, Method, QuantSpec, hessian_footprint, register
from aespa.core.options import option
from aespa.core.pipeline import BlockContext
from aespa.core.residual import collect_residual_statistics
from aespa.core.scale_refine import refine_grid
from aespa.core.sweep import gptq_sweep


@register("gptq")
class GPTQ(Method):
    @dataclass(frozen=True)
    class Options:
        percdamp: float = option(0.01, "damping added to H's diagonal, as a fraction of its mean diagonal",
                                 positive=True)
        blocksize: int = option(128, "columns per lazy-batch block (speed only, except where group_size < "
                                     "blocksize)", low=1)
        act_order: bool = option(False, "visit columns in decreasing H_jj (the reference README recommends it for "
                                        "LLaMA)")
        static_groups: bool = option(False, "with group_size: group grids fixed on the original weights before "
                                            "the sweep")
        true_sequential: bool = option(True, "re-collect each group's Hessian after the earlier groups of the "
                                             "block are quantized")
        alpha: float = option(0.0, "GPTAQ's residual term: weight of the input drift 2E[(x_fp − x_q) x_qᵀ] from the "
                                   "full-precision model (0 = plain GPTQ; GPTAQ and TurboBoA use 0.25)", low=0, high=1)
        qparam: str = option("minmax", "grids: minmax (the reference); hessian = stage 1 of the two-stage group-scale "
                                       "optimisation (per-group clip search on e H eᵀ, fixed before the sweep); mse "
                                       "(clip search on Σ|e|^2.4)", choices=QPARAM_MODES)
        refine_qparam: bool = option(False, "stage 2 of the two-stage optimisation: after the sweep, scales refined "
                                            "by closed-form coordinate descent with the integers frozen")
        n_iters: int = option(1, "coordinate-descent sweeps of refine_qparam", low=0)

    def __init__(self, spec: QuantSpec, options=None):
        super().__init__(spec, options)
        o = self.options
        self.needs_fp_stream = o.alpha > 0  # the full-precision stream, for the residual term
        if o.refine_qparam and spec.bits >= 16:
            raise UserError("gptq option method.refine_qparam=true needs integer weights to refine; use bits 2..8 or "
                            "method.refine_qparam=false")
        if o.refine_qparam and o.act_order and spec.group_size != -1 and o.qparam == "minmax" and not o.static_groups:
            raise UserError("gptq option method.refine_qparam=true cannot refine act_order's dynamic groups (not "
                            "contiguous columns); use method.static_groups=true or method.qparam=hessian")

    def footprint(self, block, windows: int, seqlen: int, batch_size: int) -> Footprint:
        """A Hessian at a time (true-sequential), the sweep's copies of one weight; a pass stopped
        at each group's input to collect its Hessian (half a pass on average) and the
        propagation; with ``alpha`` also the full-precision weights and a group's residual
        statistics, both streams through the stopped passes."""
        o = self.options
        state, work, flops = hessian_footprint(block, windows * seqlen, sequential=o.true_sequential)
        state += 4 * batch_size * seqlen * max(m.in_features for m in block.linears().values())  # a scaled batch
        passes = 1 + (len(block.groups) / 2 if o.true_sequential else 1)
        if o.alpha > 0:
            linears = block.linears().values()
            state += 4 * sum(m.weight.numel() for m in linears) + 4 * max(m.in_features for m in linears) ** 2
            passes, flops = 2 * passes - 1, 2 * flops
        return Footprint(state, work, passes, flops)

    def quantize_block(self, ctx: BlockContext) -> None:
        o = self.options
        linears = ctx.block.linears()
        stages = [g.roles for g in ctx.block.groups] if o.true_sequential else [tuple(linears)]
        full_precision = None  # the block's weights before any of them is quantized (residual term)
        if o.alpha > 0:
            full_precision = {f"{ctx.block.family.linears[r]}.weight": lin.weight.detach().clone()
                              for r, lin in linears.items()}
        for roles in stages:
            with ctx.phase("hessian"):
                hessians = collect_hessians(ctx, roles)
            residual = None
            if o.alpha > 0:
                with ctx.phase("residual"):
                    residual = collect_residual_statistics(ctx, roles, fp_params=full_precision)
            with ctx.phase("sweep"):
                for role in roles:
                    # the Hessian is 2/N Σ over N windows of T tokens: the residual term in the same scale
                    D = None if residual is None else o.alpha * ctx.inputs.shape[1] * residual.inputs[role]
                    result = self.quantize_linear(linears[role].weight.data, hessians.pop(role), D)
                    ctx.set_weight(role, result.weight_q, result.grid)
                    if result.damping > o.percdamp * (1 + 1e-6):
                        ctx.note(f"gptq {role}: Cholesky failed at percdamp={o.percdamp}; "
                                 f"used {result.damping:g}" + (" (rounded to nearest)"
                                                               if result.damping == float("inf") else ""))

    def quantize_linear(self, weight, hessian, residual):
        """One linear: the grid (stage 1 or the reference's), the sweep (with the residual
        term), and the scale refinement (stage 2)."""
        o, spec = self.options, self.spec
        grid = None
        if o.qparam != "minmax" or o.refine_qparam:
            H, dead = prepare_hessian(hessian, o.percdamp)
            W = zero_dead_columns(weight.double() if weight.dtype == torch.float64 else weight.float(), dead)
        if o.qparam != "minmax":
            grid = search_grid(W, spec.bits, spec.sym, spec.group_size, mode=o.qparam, hessian=H)
        result = gptq_sweep(weight, hessian, grid, bits=spec.bits, sym=spec.sym, group_size=spec.group_size,
                            blocksize=o.blocksize, percdamp=o.percdamp, act_order=o.act_order,
                            static_groups=o.static_groups, residual=residual)
        if o.refine_qparam and o.n_iters > 0:
            result.weight_q, result.grid = refine_grid(W, result.weight_q, result.grid, H, iters=o.n_iters,
                                                       residual=None if residual is None else
                                                       zero_dead_columns(residual, dead))
        return result
