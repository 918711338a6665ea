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
"""
from __future__ import annotations

from dataclasses import dataclass

from aespa.core.hessian import collect_hessians
from aespa.core.method import Method, register
from aespa.core.options import option
from aespa.core.pipeline import BlockContext
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

    def quantize_block(self, ctx: BlockContext) -> None:
        o = self.options
        linears = ctx.block.linears()
        stages = [g.roles for g in ctx.block.groups] if o.true_sequential else [tuple(linears)]
        for roles in stages:
            with ctx.phase("hessian"):
                hessians = collect_hessians(ctx, roles)
            with ctx.phase("sweep"):
                for role in roles:
                    result = gptq_sweep(linears[role].weight.data, hessians.pop(role), bits=self.spec.bits,
                                        sym=self.spec.sym, group_size=self.spec.group_size, blocksize=o.blocksize,
                                        percdamp=o.percdamp, act_order=o.act_order, static_groups=o.static_groups)
                    ctx.set_weight(role, result.weight_q, result.grid)
                    if result.damping > o.percdamp * (1 + 1e-6):
                        ctx.note(f"gptq {role}: Cholesky failed at percdamp={o.percdamp}; "
                                 f"used {result.damping:g}" + (" (rounded to nearest)"
                                                               if result.damping == float("inf") else ""))
