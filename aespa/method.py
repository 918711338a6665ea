"""aespa: layer-wise quantization with attention-wise objectives
(Kim et al., "Towards Next-Level Post-Training Quantization of Hyper-Scale
Transformers", NeurIPS 2024; reference code SamsungLabs/aespa).

Per decoder block (the pipeline feeds it the quantized-stream inputs, in fp32):

1. **Statistics** (``aespa.statistics``), one full-precision pass of the block:
   H = 2E[xxᵀ] of every linear's input; per head the attention-weighted value Hessian
   2E[(A_h X)(A_h X)ᵀ] (``block_v``) and the query/key covariances 2E[k kᵀ], 2E[q qᵀ]
   (post-RoPE, rotated back and averaged over positions; grouped-query heads averaged
   or repeated). Dead input channels (H_jj = 0) get H_jj = ``dead_value`` and a zero
   weight column; H += ``percdamp`` · mean diag(H) · I (per head for the value Hessian).
2. **Quantization parameters** (``aespa.zfold``): per output channel (or group), the
   clipping of the min-max range that minimises the Hessian-weighted error
   tr(ΔW H ΔWᵀ) — with the value Hessian for v; with ``use_zfold``, Z-Fold's
   per-input-channel factor ζ (shared by q, k, v) alternating with that search, for the
   layers of ``BlockAdapter.zfold_groups()``.
3. **OPTQ initialisation** (``optq_init``, ``aespa.gptq.gptq_sweep`` on the refined grid,
   ``act_order``): the GPTQ column sweep with H (q, k, and the layers outside attention)
   or the value Hessian of each head (v); its error-updated weights are where rounding
   learning starts.
4. **Rounding** (``learn_rounding``, ``aespa.adaround``): AdaRound on the refined objectives

       q:  Σ_h tr(E[K_h K_hᵀ] ΔW_h H ΔW_hᵀ)          (Eq. 21)
       k:  Σ_h tr(E[Q_h Q_hᵀ] ΔW_h H ΔW_hᵀ)          (Eq. 22)
       v:  Σ_h tr(ΔW_h E[X A_hᵀ A_h Xᵀ] ΔW_hᵀ)       (Eq. 17; with block_v off, tr(ΔW H ΔWᵀ))
       o, up, gate, down:  tr(ΔW H ΔWᵀ)

   with ΔW = Ŵ - W against the original weights; Adam (lr 0.015) on the rounding
   variables for 2000 iterations, rounding-loss weight 1.5 for q/k/v and 1.0 for the
   others, β 20 -> 2 after a 20 % warm-up. Without it, the OPTQ weights (or, without
   ``optq_init`` either, round-to-nearest on the refined grid) are kept.

Each linear is quantized against statistics of the unquantized block (as the
reference: no true-sequential re-collection inside a block).

Deviations from the reference code, stated:
- Group-wise grids (``group_size`` > 0) are supported (the reference has per-channel
  only): the clipping search runs per (row, group), group after group with the other
  groups fixed; ζ stays per input column; OPTQ and AdaRound read the group grid.
- Statistics are gathered over mini-batches of ``batch_size`` windows (the same running
  means up to float rounding); the attention-weighted value Hessian is accumulated
  directly per key/value head (the mean over its query heads), which is what the
  reference computes after the pass.
- OPTQ's ``act_order`` permutation uses a stable sort (ties in diag H keep column order).
- If a Cholesky factorisation fails, damping is raised (noted in the record) instead of
  crashing.
"""
from __future__ import annotations

from aespa.adaround import learn_rounding
from aespa.errors import UserError
from aespa.gptq import gptq_sweep
from aespa.hessian import prepare_hessian
from aespa.quant import Grid, check_group_size, minmax_grid
from aespa.registry import Method, register
from aespa.statistics import BlockStatistics, QuadraticObjective, collect_block_statistics
from aespa.zfold import hessian_weighted_grid, zfold

DEFAULTS = dict(
    block_v=True, use_zfold=True, optq_init=True, act_order=True, learn_rounding=True,
    percdamp=0.01, dead_value=1 / 2048, blocksize=128, zfold_rounds=30,
    iters=2000, lr=0.015, round_weight=1.0, round_weight_qkv=1.5, warmup=0.2, beta_start=20.0, beta_end=2.0,
)
SWITCHES = ("block_v", "use_zfold", "optq_init", "act_order", "learn_rounding")
POSITIVE = ("percdamp", "dead_value", "lr", "beta_start", "beta_end")
COUNTS = ("blocksize", "iters")
ATTENTION_INPUT = ("q", "k", "v")


@register("aespa")
class Aespa(Method):
    defaults = DEFAULTS  # a variant (baselines/zfold.py) registers under its own name with other defaults

    def __init__(self, spec, options=None):
        super().__init__(spec, options)
        unknown = sorted(set(self.options) - set(self.defaults))
        if unknown:
            raise UserError(f"unknown {self.name} option(s) {', '.join(unknown)}; allowed: {', '.join(self.defaults)}")
        opts = {**self.defaults, **self.options}
        for name in SWITCHES:
            if not isinstance(opts[name], bool):
                raise UserError(f"{self.name} option {name}={opts[name]!r} is not allowed; use true or false")
        for name in POSITIVE:
            if isinstance(opts[name], bool) or not isinstance(opts[name], (int, float)) or not opts[name] > 0:
                raise UserError(f"{self.name} option {name}={opts[name]!r} is not allowed; use a positive number")
        for name in COUNTS + ("zfold_rounds",):
            low = 0 if name == "zfold_rounds" else 1
            if isinstance(opts[name], bool) or not isinstance(opts[name], int) or opts[name] < low:
                raise UserError(f"{self.name} option {name}={opts[name]!r} is not allowed; use an integer >= {low}")
        for name in ("round_weight", "round_weight_qkv"):
            if isinstance(opts[name], bool) or not isinstance(opts[name], (int, float)) or opts[name] < 0:
                raise UserError(f"{self.name} option {name}={opts[name]!r} is not allowed; use a number >= 0")
        if not 0 <= opts["warmup"] < 1:
            raise UserError(f"{self.name} option warmup={opts['warmup']!r} is not allowed; use a fraction in [0, 1)")
        self.opts = opts

    # ------------------------------------------------------------------ the algorithm, per block

    def quantize_block(self, ctx) -> None:
        o, spec = self.opts, self.spec
        linears = ctx.block.linears()
        for role, linear in linears.items():
            check_group_size(linear.in_features, spec.group_size, f"{role} of block {ctx.index}")
        original = {role: lin.weight.data.float().clone() for role, lin in linears.items()}

        with ctx.phase("statistics"):
            stats = collect_block_statistics(ctx, value=o["block_v"], query_key=o["learn_rounding"])
            objectives, weights = self.objectives(stats, original)

        with ctx.phase("qparams"):
            grids = self.quantization_parameters(ctx.block, original, weights, objectives)

        starts = weights
        if o["optq_init"]:
            with ctx.phase("optq_init"):
                starts = {}
                for role in linears:
                    sweep = gptq_sweep(weights[role], self.optq_hessian(role, stats), grids[role],
                                       blocksize=o["blocksize"], percdamp=o["percdamp"], act_order=o["act_order"],
                                       dead_value=o["dead_value"])
                    starts[role] = sweep.weight_updated if o["learn_rounding"] else sweep.weight_q
                    if sweep.damping > o["percdamp"] * (1 + 1e-6):
                        ctx.notes.append(f"aespa {role}: Cholesky failed at percdamp={o['percdamp']}; "
                                         f"used {sweep.damping:g}")

        with ctx.phase("rounding"):
            for role in linears:
                if o["learn_rounding"]:
                    objective, target = objectives[role], weights[role]
                    quantized = learn_rounding(
                        target, grids[role], lambda w_soft: objective(w_soft - target), iterations=o["iters"],
                        lr=o["lr"], round_weight=o["round_weight_qkv"] if role in ATTENTION_INPUT else o["round_weight"],
                        warmup=o["warmup"], beta=(o["beta_start"], o["beta_end"]), init_weight=starts[role])
                elif o["optq_init"]:
                    quantized = starts[role]  # the OPTQ weights (already on the grid)
                else:
                    quantized = grids[role].fake_quantize(weights[role])
                ctx.set_weight(role, quantized, grids[role])

    # ------------------------------------------------------------------ the pieces

    def objectives(self, stats: BlockStatistics, original: dict) -> tuple[dict, dict]:
        """Per role the refined objective (damped Hessians, dead channels replaced) and the
        reference weight with dead input columns zeroed."""
        o = self.opts
        objectives, weights = {}, {}
        for role, w in original.items():
            raw = stats.value_hessian if role == "v" and o["block_v"] else stats.hessians[role]
            hessian, dead = prepare_hessian(raw, o["percdamp"], o["dead_value"])
            head_covariance = None
            if o["learn_rounding"] and role == "q":
                head_covariance = stats.key_covariance
            elif o["learn_rounding"] and role == "k":
                head_covariance = stats.query_covariance
            objectives[role], weights[role] = QuadraticObjective(hessian, head_covariance), zero_dead_columns(w, dead)
        return objectives, weights

    def quantization_parameters(self, block, original: dict, weights: dict, objectives: dict) -> dict[str, Grid]:
        """Hessian-weighted clipping search per layer; Z-Fold for the family's fold groups."""
        spec, o = self.spec, self.opts
        grids: dict[str, Grid] = {}
        if o["use_zfold"] and o["zfold_rounds"] > 0:
            for group in block.zfold_groups():
                result = zfold([weights[r] for r in group], [objectives[r].hessian for r in group], spec.bits,
                               spec.sym, spec.group_size, o["zfold_rounds"],
                               initial_grids=[minmax_grid(original[r], spec.bits, spec.sym, spec.group_size)
                                              for r in group])
                grids.update(zip(group, result.grids))
        for role, w in weights.items():
            if role not in grids:
                grids[role] = hessian_weighted_grid(w, objectives[role].hessian, spec.bits, spec.sym, spec.group_size)
        return grids

    def optq_hessian(self, role: str, stats: BlockStatistics):
        """The (undamped) Hessian the OPTQ sweep uses: per head for v under ``block_v``."""
        return stats.value_hessian if role == "v" and self.opts["block_v"] else stats.hessians[role]


def zero_dead_columns(weight, dead):
    """``weight`` ``[out, in]`` with the columns of dead input channels set to 0; a per-head
    mask ``[heads, in]`` applies to each head's block of rows."""
    heads = dead.shape[0] if dead.dim() == 2 else 1
    return (weight.reshape(heads, -1, weight.shape[1]) * ~dead.reshape(heads, 1, -1)).reshape(weight.shape)
