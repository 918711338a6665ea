"""BRECQ: block reconstruction with AdaRound (Li et al., ICLR 2021; reference code
yhhhli/BRECQ, ``quant/block_recon.py``, ``quant/adaptive_rounding.py``,
``quant/quant_layer.py``), ported to decoder blocks as aespa's comparison does.

Per decoder block, with the block's full-precision weights W:

1. **Grid** (``quant_layer.UniformAffineQuantizer``, ``scale_method='mse'``): per output
   channel, the range [min w, max w] shrunk by 80 factors 1.00, 0.99, ..., 0.21; the one
   with the least mean |w - Q(w)|^2.4 wins (first on ties); scale = (hi - lo) / (2^b - 1),
   zero = round(-lo / scale). The range is *not* forced to contain 0 (unlike min-max).
2. **Reconstruction** (``block_recon.block_reconstruction``, ``asym=True``): AdaRound on
   the weights of every linear of the block *jointly* (``aespa.core.rounding``: rectified
   sigmoid, V initialised at the fractional part), minimising

       min_V  E ‖ f(X_q; Ŵ(V)) − f(X; W) ‖²  +  λ Σ_layers Σ (1 − |2h(V) − 1|^β)

   where X_q are the block's inputs on the quantized stream (earlier blocks quantized),
   f(X; W) the full-precision block's outputs on the full-precision stream, the squared
   error summed over the hidden features and averaged over tokens and windows (the
   reference's ``lp_loss(p=2)``: sum over the feature axis, mean over the rest).
   λ = 0.01, the regulariser is off during the first 20 % of the iterations and β decays
   linearly 20 → 2 after that; Adam with its default learning rate 1e-3 on V only;
   20 000 iterations; each iteration a mini-batch of ``windows_per_step`` windows drawn without replacement
   (``torch.randperm(n)[:batch]``, seeded by the run's seed) from the cached inputs.
   The soft weights enter the block through ``torch.func.functional_call``.
3. **Hard rounding**: up where V ≥ 0; the block keeps those weights.

Memory: the pipeline holds the two calibration streams of the current block; BRECQ adds
the rounding variables of one block (and Adam's two moments) and the activations of one
mini-batch, so memory grows with ``windows_per_step``, never with the number of blocks.

Deviations and choices, stated:
- ``windows_per_step`` (the reference's batch size) defaults to 4 windows, not 32: the reference tunes 32
  images per step for CNNs; aespa's cost model of BRECQ on LLMs counts 4 sequences per
  iteration (its Table 7), and aespa's measured 3.39 GB peak for BRECQ on OPT-125M
  (Table 14) is consistent with 4 × 2048-token windows, not 32 (one 32-window attention
  probability tensor of OPT-125M alone takes 6.4 GB in fp32).
- The reconstruction error sums over the hidden features of a token (the analogue of the
  reference's sum over CNN channels, its dim 1) and averages over tokens and windows.
- ``sym`` (symmetric search over [-max|w|, max|w|], zero at 2^b / 2) and ``group_size``
  (the same search per group of input columns) extend the reference, which is
  per-channel asymmetric only. A row whose range is empty (constant row) gets the
  shared min-max range instead of the reference's zero-width range.
- ``scale_method: max`` selects the reference's other weight grid (min-max with 0 in the
  range), i.e. the RTN grid; with ``iters: 0`` BRECQ then returns exactly RTN.
- Training in fp32; the regulariser's step counter starts at 1 as the reference's.
- The mini-batch generator (seeded by the run's seed) is part of a checkpoint, so a resumed
  run draws the same mini-batches as an uninterrupted one.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch.func import functional_call

from aespa.core.grid import Grid, check_group_size, grid_from_range, minmax_grid, minmax_range
from aespa.core.method import Footprint, Method, activation_bytes, block_flops, register
from aespa.core.observe import block_output
from aespa.core.options import option
from aespa.core.pipeline import BlockContext
from aespa.core.rounding import RoundingRegularizer, hard_quantized_weight, init_rounding, soft_quantized_weight

SHRINK_STEPS, SHRINK_STEP = 80, 0.01  # range factors 1.00, 0.99, ..., 0.21
SEARCH_NORM = 2.4  # the L_p norm of the grid search (LAPQ's choice, hard-coded in the reference)


def lp_search_grid(w: torch.Tensor, bits: int, sym: bool = False, group_size: int = -1,
                   norm: float = SEARCH_NORM) -> Grid:
    """BRECQ's weight grid: per row (or group) the shrink factor of [min, max] that
    minimises mean |w - Q(w)|^norm over the row, searched over 1.00, 0.99, ..., 0.21."""
    out_features, in_features = w.shape
    check_group_size(in_features, group_size)
    rows = w.detach().float()
    rows = rows if group_size == -1 else rows.reshape(-1, group_size)
    lo, hi = rows.min(dim=1).values, rows.max(dim=1).values
    if sym:
        hi = torch.maximum(lo.abs(), hi.abs())
        lo = -hi
    empty = hi <= lo
    if empty.any():  # constant row: fall back to the min-max range (contains 0; [-1, 1] for zeros)
        mm_lo, mm_hi = minmax_range(rows, sym)
        lo, hi = torch.where(empty, mm_lo, lo), torch.where(empty, mm_hi, hi)
    maxq = 2**bits - 1
    best_err = torch.full_like(lo, math.inf)
    best_scale, best_zero = torch.empty_like(lo), torch.empty_like(lo)
    for i in range(SHRINK_STEPS):
        factor = 1.0 - i * SHRINK_STEP
        scale, zero = grid_from_range(lo * factor, hi * factor, bits, sym)
        s, z = scale[:, None], zero[:, None]
        q = torch.round(rows / s).add_(z).clamp_(0, maxq).sub_(z).mul_(s)  # Q(w), in place
        err = q.sub_(rows).abs_().pow_(norm).mean(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return Grid(best_scale.reshape(out_features, -1), best_zero.reshape(out_features, -1), bits, group_size)


def reconstruction_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The reference's ``lp_loss(p=2)``: squared error summed over features, mean over tokens and windows."""
    return (output - target).pow(2).sum(dim=-1).mean()


@register("brecq")
class BRECQ(Method):
    needs_fp_stream = True

    @dataclass(frozen=True)
    class Options:
        iters: int = option(20000, "Adam steps per block (reference --iters_w)", low=0)
        windows_per_step: int = option(4, "calibration windows per step; the reference's batch size 32 is for CNN "
                                          "images, aespa's cost model of BRECQ on LLMs uses 4 sequences (Table 7)",
                                       low=1)
        lr: float = option(1e-3, "Adam learning rate of the rounding variables (reference: Adam's default)",
                           positive=True)
        round_weight: float = option(0.01, "λ, weight of the rounding regulariser (reference --weight)", low=0)
        warmup: float = option(0.2, "fraction of the steps without the regulariser (reference --warmup)", low=0,
                               below=1)
        beta_start: float = option(20.0, "regulariser exponent β, decayed linearly after warm-up ...", positive=True)
        beta_end: float = option(2.0, "... to this value (reference --b_start / --b_end)", positive=True)
        scale_method: str = option("mse", "weight grid: mse = per-channel L2.4 search over 80 range shrink factors "
                                          "(reference); max = min-max range containing 0 (the RTN grid)",
                                   choices=("mse", "max"))

    def __init__(self, spec, options=None):
        super().__init__(spec, options)
        self.generator = torch.Generator().manual_seed(0)
        self.history: list[dict] = []  # per block: iterations, seconds, first/last reconstruction loss

    def prepare(self, model, calibration) -> None:
        # the run's seed (experiments.runner.seed_everything) seeds the mini-batch draws
        self.generator = torch.Generator().manual_seed(torch.initial_seed())

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"])

    def grid(self, w: torch.Tensor) -> Grid:
        if self.options.scale_method == "max":
            return minmax_grid(w, self.spec.bits, self.spec.sym, self.spec.group_size)
        return lp_search_grid(w, self.spec.bits, self.spec.sym, self.spec.group_size)

    def footprint(self, block, windows: int, seqlen: int, batch_size: int) -> Footprint:
        """The plan's estimate: per step, a forward and a backward pass of the block over
        ``windows_per_step`` windows (the activations autograd keeps, and their gradients, with
        the attention probabilities), and five fp32 values per weight (original, V, its gradient,
        Adam's two moments); ``iters`` steps of three passes' FLOPs each."""
        o = self.options
        per_step = min(o.windows_per_step, windows)
        weights = sum(m.weight.numel() for m in block.linears().values())
        work = 2 * activation_bytes(block, per_step, seqlen, True) + 20 * weights
        flops = 3.0 * o.iters * block_flops(block, per_step, seqlen)
        return Footprint(0, work, 2.0, flops, knob="method.windows_per_step (the activations of a step)")

    def quantize_block(self, ctx: BlockContext) -> None:
        linears = ctx.block.linears()
        weights = {role: lin.weight.detach().float().clone() for role, lin in linears.items()}

        with ctx.phase("grid"):
            grids = {role: self.grid(w) for role, w in weights.items()}

        with ctx.phase("reconstruction"):
            rounding = self.reconstruct(ctx, weights, grids)
            for role, w in weights.items():
                ctx.set_weight(role, hard_quantized_weight(w, grids[role], rounding[role]), grids[role])

    def reconstruct(self, ctx: BlockContext, weights: dict, grids: dict) -> dict[str, torch.Tensor]:
        """AdaRound on all linears of the block against the block output; returns V per role."""
        o, block = self.options, ctx.block
        v = {role: torch.nn.Parameter(init_rounding(w, grids[role])) for role, w in weights.items()}
        iters = o.iters
        if iters == 0:
            return {role: p.detach() for role, p in v.items()}
        names = {role: f"{block.family.linears[role]}.weight" for role in weights}
        optimizer = torch.optim.Adam(list(v.values()), lr=o.lr)
        regularizer = RoundingRegularizer(iters, o.warmup, o.beta_start, o.beta_end)
        kwargs = ctx.call_kwargs()
        n = ctx.inputs.shape[0]
        frozen = [(p, p.requires_grad) for p in block.module.parameters()]
        for p, _ in frozen:
            p.requires_grad_(False)
        first = last = float("nan")
        start = time.perf_counter()
        task = ctx.progress("reconstruction", " ".join(weights), iters)
        try:
            with torch.enable_grad():
                for step in range(iters):
                    idx = torch.randperm(n, generator=self.generator)[: o.windows_per_step].to(ctx.inputs.device)
                    x = ctx.inputs[idx].to(ctx.device, ctx.dtype)
                    target = ctx.fp_outputs[idx].to(ctx.device, ctx.dtype)
                    soft = {names[r]: soft_quantized_weight(weights[r], grids[r], v[r]) for r in weights}
                    out = block_output(functional_call(block.module, soft, (x,), kwargs))
                    rec = reconstruction_error(out, target)
                    # the reference's counter starts at 1 (LossFunction.count += 1 before use)
                    reg = sum(regularizer(step + 1, p) for p in v.values())
                    loss = rec + o.round_weight * reg
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    if step == 0:
                        first = rec.item()
                    elif step == iters - 1:
                        last = rec.item()
                    task.update(step + 1, rec.item)
        finally:
            task.close()
            for p, flag in frozen:
                p.requires_grad_(flag)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        seconds = time.perf_counter() - start
        last = first if iters == 1 else last
        self.history.append({"block": ctx.index, "iters": iters, "seconds": seconds, "first_loss": first,
                             "last_loss": last})
        ctx.note(f"brecq: {iters} iterations, {1e3 * seconds / iters:.2f} ms/iteration, "
                 f"reconstruction loss {first:.4g} -> {last:.4g}")
        return {role: p.detach() for role, p in v.items()}
