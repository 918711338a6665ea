"""GPTQ (OPTQ): layer-wise quantization with second-order error compensation
(Frantar et al., ICLR 2023; reference code IST-DASLab/gptq).

Per decoder block, for each group of linears that read the same input (adapter order:
q/k/v, then o, then up/gate, then down):

1. Hessian ``H = 2/N Σ x xᵀ`` of the group's input, from a pass of the block over the
   quantized-stream calibration inputs (``aespa.hessian.collect_hessians``);
2. for each linear of the group, the column sweep of ``aespa.gptq.gptq_sweep`` (Alg. 1:
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

from aespa.errors import UserError
from aespa.gptq import check_sweep_options, gptq_sweep
from aespa.hessian import collect_hessians
from aespa.quant import check_group_size
from aespa.registry import Method, register

DEFAULTS = dict(percdamp=0.01, blocksize=128, act_order=False, static_groups=False, true_sequential=True)


@register("gptq")
class GPTQ(Method):
    def __init__(self, spec, options=None):
        super().__init__(spec, options)
        unknown = sorted(set(self.options) - set(DEFAULTS))
        if unknown:
            raise UserError(f"unknown gptq option(s) {', '.join(unknown)}; allowed: {', '.join(DEFAULTS)}")
        opts = {**DEFAULTS, **self.options}
        check_sweep_options(opts["blocksize"], opts["percdamp"])
        for flag in ("act_order", "static_groups", "true_sequential"):
            if not isinstance(opts[flag], bool):
                raise UserError(f"gptq option {flag}={opts[flag]!r} is not allowed; use true or false")
        self.percdamp, self.blocksize = float(opts["percdamp"]), opts["blocksize"]
        self.act_order, self.static_groups = opts["act_order"], opts["static_groups"]
        self.true_sequential = opts["true_sequential"]

    def quantize_block(self, ctx) -> None:
        linears = ctx.block.linears()
        for role, linear in linears.items():
            check_group_size(linear.in_features, self.spec.group_size, f"{role} of block {ctx.index}")
        stages = [g.roles for g in ctx.block.groups] if self.true_sequential else [tuple(linears)]
        for roles in stages:
            with ctx.phase("hessian"):
                hessians = collect_hessians(ctx, roles)
            with ctx.phase("sweep"):
                for role in roles:
                    result = gptq_sweep(linears[role].weight.data, hessians.pop(role), bits=self.spec.bits,
                                        sym=self.spec.sym, group_size=self.spec.group_size,
                                        blocksize=self.blocksize, percdamp=self.percdamp, act_order=self.act_order,
                                        static_groups=self.static_groups)
                    ctx.set_weight(role, result.weight_q, result.grid)
                    if result.damping > self.percdamp * (1 + 1e-6):
                        ctx.notes.append(f"gptq {role}: Cholesky failed at percdamp={self.percdamp}; "
                                         f"used {result.damping:g}" + (" (rounded to nearest)"
                                                                       if result.damping == float("inf") else ""))
