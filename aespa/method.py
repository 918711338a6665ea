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
2. **Quantization parameters** (``aespa.qparams``): per output channel (or group), the
   clipping of the min-max range that minimises the Hessian-weighted error
   tr(ΔW H ΔWᵀ) — with the value Hessian for v; with ``use_zfold``, Z-Fold's
   per-input-channel factor ζ (shared by q, k, v) alternating with that search, for the
   layers of :func:`zfold_groups`.
3. **OPTQ initialisation** (``optq_init``, ``aespa.core.sweep.gptq_sweep`` on the refined grid,
   ``act_order``): the GPTQ column sweep with H (q, k, and the layers outside attention)
   or the value Hessian of each head (v); its error-updated weights are where rounding
   learning starts.
4. **Rounding** (``learn_rounding``, ``aespa.core.rounding``): AdaRound on the refined objectives

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

from dataclasses import dataclass

import torch

from aespa.core.adapters import BlockAdapter
from aespa.core.grid import Grid, minmax_grid
from aespa.core.hessian import prepare_hessian, zero_dead_columns
from aespa.core.method import Footprint, Method, hessian_footprint, register
from aespa.core.options import option
from aespa.core.pipeline import BlockContext
from aespa.core.rounding import RoundingProblem, learn_rounding
from aespa.core.sweep import gptq_sweep
from aespa.qparams import CHUNK_ELEMENTS, CLIP_RATIOS, hessian_weighted_grid, zfold
from aespa.statistics import BlockStatistics, QuadraticObjective, collect_block_statistics

ATTENTION_INPUT = ("q", "k", "v")


def zfold_groups(block: BlockAdapter) -> tuple[tuple[str, ...], ...]:
    """The linears whose input channels take one shared factor ζ that folds into the op
    feeding them, as the reference code's lists: every group of the family description
    (q/k/v into the attention norm, o into the rows of v, fc1 into the MLP norm, down/fc2
    into the rows of up/fc1), except

    - the gate/up pair of a SwiGLU MLP (the reference does not fold there), and
    - o under grouped-query attention: a factor on o's input would fold into the rows of
      v, which several query heads share;
    - linears that read the residual stream itself (q/k/v and fc1 of post-LayerNorm OPT,
      OPT-350M): no op of their own feeds them, so there is nothing to fold ζ into.
    """
    groups = []
    for group in block.groups:
        if not block.family.foldable(group.feeder):
            continue
        if block.family.mlp == "swiglu" and "gate" in group.roles:
            continue
        if group.feeder == "v" and block.geometry.kv_group > 1:
            continue
        groups.append(group.roles)
    return tuple(groups)


@register("aespa")
class Aespa(Method):
    """aespa (Kim et al., NeurIPS 2024): layer-wise quantization with attention-aware objectives,
    pre-computed statistics and learned rounding (the steps: this module's docstring)."""

    @dataclass(frozen=True)
    class Options:
        block_v: bool = option(True, "value objective with the attention-weighted Hessian E[X A_hᵀ A_h Xᵀ] per "
                                     "head (Eq. 17); false: E[X Xᵀ]")
        use_zfold: bool = option(True, "Z-Fold: per-input-channel scale ζ (shared by q/k/v), alternated with the "
                                       "clipping search; false: clipping search only")
        optq_init: bool = option(True, "start rounding from the OPTQ (GPTQ) error-updated weights on the refined "
                                       "grid; false: from the original weights")
        act_order: bool = option(True, "OPTQ visits columns in decreasing Hessian diagonal (only with optq_init)")
        learn_rounding: bool = option(True, "AdaRound on the refined objectives (q: Eq. 21, k: Eq. 22, v: Eq. 17); "
                                            "false: keep OPTQ's (or nearest) rounding")
        percdamp: float = option(0.01, "damping added to every Hessian's diagonal, a fraction of its mean diagonal",
                                 positive=True)
        dead_value: float = option(1 / 2048, "Hessian diagonal of dead input channels (the public code's --replace)",
                                   positive=True)
        blocksize: int = option(128, "OPTQ columns per lazy-batch block (speed only)", low=1)
        zfold_rounds: int = option(30, "at most this many ζ / scale alternations (stops as soon as the loss "
                                       "increases)", low=0)
        iters: int = option(2000, "AdaRound iterations per linear", low=1)
        lr: float = option(0.015, "Adam learning rate of the rounding variables", positive=True)
        round_weight: float = option(1.0, "weight λ of the rounding regulariser for o, up, gate, down", low=0)
        round_weight_qkv: float = option(1.5, "weight λ of the rounding regulariser for q, k, v", low=0)
        warmup: float = option(0.2, "fraction of the iterations without the regulariser", low=0, below=1)
        beta_start: float = option(20.0, "regulariser exponent β at the end of the warm-up ...", positive=True)
        beta_end: float = option(2.0, "... decayed linearly to this at the last iteration", positive=True)

    # ------------------------------------------------------------------ the algorithm, per block

    def footprint(self, block, windows: int, seqlen: int, batch_size: int) -> Footprint:
        """Kept through the block: every input Hessian, the per-kv-head value Hessian, the
        query/key covariances. Work, the largest of: the clip search (2 candidate-sized buffers of
        at most ``CHUNK_ELEMENTS`` values, more when one candidate is larger; 3 with the per-head
        value Hessian), OPTQ's sweep, and rounding every linear at once
        (14 fp32 values per weight: original and start weights, V, Adam's moments, the step's
        buffers). Passes: the statistics and the propagation. FLOPs: the statistics (2·N·in² per
        input, 2·N·heads·d² for the value moments and the A·X products), OPTQ's sweep, and
        ``iters`` rounding steps of one product G ΔW H each (2·out·in², + 2·d_h·out·in for q, k)."""
        o, g = self.options, block.geometry
        linears = block.linears()
        tokens, d = windows * seqlen, g.hidden_size
        widths = [linears[grp.roles[0]].in_features for grp in block.groups]
        state = 4 * sum(w * w for w in widths) + 4 * (g.num_heads + g.num_kv_heads) * g.head_dim ** 2
        _, sweep_bytes, sweep_flops = hessian_footprint(block, 0)
        candidates = 2 * len(CLIP_RATIOS)
        search = 0
        for role, m in linears.items():
            size = m.in_features if self.spec.group_size == -1 else self.spec.group_size
            chunk = min(candidates, max(1, CHUNK_ELEMENTS // (m.out_features * size)))
            buffers = 3 if role == "v" and o.block_v else 2  # per-head Hessian: a head-major copy too
            search = max(search, 4 * buffers * chunk * m.out_features * size)
        work = max(search, sweep_bytes if o.optq_init else 0)
        flops = sum(2.0 * tokens * w * w for w in widths) + (sweep_flops if o.optq_init else 0.0)
        if o.block_v:
            state += 4 * g.num_kv_heads * d * d + 4 * g.num_heads * seqlen * d  # + one window's A·X
            flops += 2.0 * tokens * g.num_heads * d * d + 2.0 * tokens * g.num_heads * seqlen * d
        if o.learn_rounding:
            work = max(work, 56 * sum(m.weight.numel() for m in linears.values()))
            step = sum(2.0 * m.out_features * m.in_features ** 2 for m in linears.values())
            step += sum(2.0 * g.head_dim * linears[r].out_features * linears[r].in_features for r in ("q", "k"))
            flops += o.iters * step
        knob = "block_v=false drops the value Hessian"
        if o.learn_rounding:
            knob = "none: learn_rounding optimises every linear of a block at once (56 bytes per weight); " + knob
        return Footprint(state, work, 2.0, flops, attention_observed=o.block_v or o.learn_rounding, knob=knob)

    def quantize_block(self, ctx: BlockContext) -> None:
        o = self.options
        linears = ctx.block.linears()
        original = {role: lin.weight.data.float().clone() for role, lin in linears.items()}

        with ctx.phase("statistics"):
            stats = collect_block_statistics(ctx, value=o.block_v, query_key=o.learn_rounding)
            objectives, weights = self.objectives(stats, original)

        with ctx.phase("qparams"):
            grids = self.quantization_parameters(ctx.block, original, weights, objectives, ctx.progress)

        starts = weights
        if o.optq_init:
            with ctx.phase("optq_init"):
                starts = {}
                for role in linears:
                    sweep = gptq_sweep(weights[role], self.optq_hessian(role, stats), grids[role],
                                       blocksize=o.blocksize, percdamp=o.percdamp, act_order=o.act_order,
                                       dead_value=o.dead_value)
                    starts[role] = sweep.weight_updated if o.learn_rounding else sweep.weight_q
                    if sweep.damping > o.percdamp * (1 + 1e-6):
                        ctx.note(f"aespa {role}: Cholesky failed at percdamp={o.percdamp}; "
                                 f"used {sweep.damping:g}")

        with ctx.phase("rounding"):
            if o.learn_rounding:  # every linear of the block at once (independent problems, shared steps)
                roles = list(linears)
                problems = [RoundingProblem(weights[r], grids[r], objectives[r].hessian, objectives[r].head_covariance,
                                            start=starts[r], name=r,
                                            round_weight=o.round_weight_qkv if r in ATTENTION_INPUT else o.round_weight)
                            for r in roles]
                with ctx.progress("rounding", layer=" ".join(roles), total=o.iters) as task:
                    results = learn_rounding(problems, iterations=o.iters, lr=o.lr, warmup=o.warmup,
                                             beta=(o.beta_start, o.beta_end), on_step=task.update)
                    for role, result in zip(roles, results):
                        task.log(f"{role}: loss {result.start_loss:.4g} at the start, {result.loss:.4g} rounded")
                quantized = {role: result.weight for role, result in zip(roles, results)}
            elif o.optq_init:
                quantized = starts  # the OPTQ weights (already on the grid)
            else:
                quantized = {role: grids[role].fake_quantize(weights[role]) for role in linears}
            for role in linears:
                ctx.set_weight(role, quantized[role], grids[role])

    # ------------------------------------------------------------------ the pieces

    def objectives(self, stats: BlockStatistics, original: dict) -> tuple[dict, dict]:
        """Per role the refined objective (damped Hessians, dead channels replaced) and the
        reference weight with dead input columns zeroed."""
        o = self.options
        objectives, weights = {}, {}
        for role, w in original.items():
            raw = stats.value_hessian if role == "v" and o.block_v else stats.hessians[role]
            hessian, dead = prepare_hessian(raw, o.percdamp, o.dead_value)
            head_covariance = None
            if o.learn_rounding and role == "q":
                head_covariance = stats.key_covariance
            elif o.learn_rounding and role == "k":
                head_covariance = stats.query_covariance
            objectives[role], weights[role] = QuadraticObjective(hessian, head_covariance), zero_dead_columns(w, dead)
        return objectives, weights

    def quantization_parameters(self, block: BlockAdapter, original: dict, weights: dict, objectives: dict,
                                progress=None) -> dict[str, Grid]:
        """Hessian-weighted clipping search per layer; Z-Fold for the family's fold groups
        (``progress``: ``BlockContext.progress``, one task per fold group)."""
        spec, o = self.spec, self.options
        grids: dict[str, Grid] = {}
        if o.use_zfold and o.zfold_rounds > 0:
            for group in zfold_groups(block):
                task = progress("qparams", " ".join(group), o.zfold_rounds) if progress is not None else None
                result = zfold([weights[r] for r in group], [objectives[r].hessian for r in group], spec.bits,
                               spec.sym, spec.group_size, o.zfold_rounds,
                               initial_grids=[minmax_grid(original[r], spec.bits, spec.sym, spec.group_size)
                                              for r in group], on_round=None if task is None else task.update)
                if task is not None:
                    task.log(f"Z-Fold: {result.rounds} rounds kept, loss {result.initial_loss:.4g} -> "
                             f"{result.loss:.4g}")
                    task.close(summary=False)
                grids.update(zip(group, result.grids))
        for role, w in weights.items():
            if role not in grids:
                grids[role] = hessian_weighted_grid(w, objectives[role].hessian, spec.bits, spec.sym, spec.group_size)
        return grids

    def optq_hessian(self, role: str, stats: BlockStatistics) -> torch.Tensor:
        """The (undamped) Hessian the OPTQ sweep uses: per head for v under ``block_v``."""
        return stats.value_hessian if role == "v" and self.options.block_v else stats.hessians[role]
