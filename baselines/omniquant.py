"""OmniQuant (Shao et al., ICLR 2024): learnable weight clipping (LWC) and learnable
equivalent transformation (LET), trained block by block (Algorithm 1).

Per block, with the full-precision weights frozen:

1. Statistics: per-channel ``max|x|`` (and the channel mid-points, for the shift) of the
   inputs of q, o and up, from the full-precision block on the full-precision stream.
2. LET init (§3.3): for each pair norm → {q,k,v}, v → o, norm → {fc1 | gate,up}, a scale
   ``s = max|X|^α / max|W|^(1-α)`` (SmoothQuant's formula, weight maximum over the first
   consumer: q, o, up) and, where used, a shift δ = the channel mid-point; the Q–K scale
   starts at 1. No LET on fc2/down.
3. LWC init (Eq. 2): two logits per output row (or group), 4.0; the clipped range is
   ``[σ(l)·min W, σ(u)·max W]`` on the shared grid, rounding straight-through.
4. Train (Eq. 1): ``min ‖F(W, X_fp) - F(Q_w(W; LWC, LET), Q_a(X_q; LET))‖²`` — target the
   full-precision block on the full-precision stream, student the quantized block on the
   quantized stream, activation quantizers on; AdamW (weight decay 0), LWC lr 1e-2, LET lr
   5e-3, batch 1, ``epochs`` passes in calibration order, fp32. Before every use a scale
   with ``|s| < 1e-2`` is set to ±1e-2, as the reference does.
5. Fold LET into the norms and weights, quantize each weight on its learned LWC grid;
   the activation quantizers stay installed for evaluation.

Defaults follow the paper and its scripts: weight-only OPT uses LWC + LET (scale only),
the LLaMA family LWC only (Table A3); weight-activation uses LWC + LET everywhere, with
the shift only where the norms have a bias (OPT), i.e. exactly where the reference
enables it; no LET on post-LayerNorm OPT (OPT-350M: q/k/v and fc1 read the residual stream,
no norm feeds them, so ``let=true`` is refused there and ``auto`` is LWC only); epochs 20,
40 at 2 bits; LET init strength α 0.75 at W4A4, 0.5 otherwise.
``aug_loss`` (off by default) is what the scripts add for LLaMA W2 and LLaMA-1 W4A4; the
LLaMA-2 W4A4 script also lowers the LET lr to 1e-3 (not the default here).

Deviations from the reference code (stated on purpose):

- LET is applied by one function (``aespa.core.transforms``) both while training and when
  folding. The reference's OPT training path applies a norm→linear transform to the
  v → out_proj pair (dividing v's *input* columns) while its final folding divides v's
  output rows; here training and folding both use the correct row-wise v → o transform.
- With RoPE the Q–K scale is tied across each rotary pair (i, i + d/2), which makes the
  folded transform exact; the reference folds an untied scale before RoPE, which is not
  function-preserving. With grouped-query attention the Q–K and v → o scales live on the
  kv-head channels (the reference cannot run LET on GQA models).
- Training in fp32 without AMP (the reference trains fp16 AMP unless bits ≥ 8); the
  LET statistics come from the calibration set itself through the pipeline's
  full-precision stream (the reference precomputes them on 128 × 2048 WikiText-2 windows).
- A symmetric grid (``sym=true``) uses the shared grid's convention (zero point at
  2^b / 2), not the reference's ``2^(b-1) - 1``.
- A non-finite loss stops that block's training, restores the last parameters that gave
  a finite loss and records a note (the reference drops into a debugger).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from aespa.core.actquant import install_activation_quantizers
from aespa.core.errors import UserError
from aespa.core.grid import Grid, round_ste
from aespa.core.method import Footprint, Method, activation_bytes, block_flops, register
from aespa.core.observe import block_output
from aespa.core.options import option
from aespa.core.pipeline import BlockContext
from aespa.core.transforms import (
    BlockTransform,
    ChannelStatistics,
    ChannelTransform,
    fold,
    norm_fed_groups,
    query_key_channels,
    query_key_scale,
    reduce_kv,
    refuse_residual_fed,
    smoothing_scale,
    transformed_parameters,
)

LWC_INIT = 4.0  # σ(4) ≈ 0.982: about 1.8 % clipping at the start
SCALE_FLOOR = 1e-2  # |s| below this is set to ±1e-2 before every use (reference, against fp16 overflow)
LET_WEIGHT_ONLY = {"opt": True, "llama": False}  # the paper's weight-only choice per family (Table A3)
LET_REFERENCE_CONSUMER = {"attn_norm": "q", "mlp_norm": "up"}  # whose weight maximum initialises s


class LearnableClipping(nn.Module):
    """LWC (Eq. 2): a learnable clipping of one weight's min-max range, per row or group.

    ``h = (σ(u)·max W - σ(l)·min W) / (2^b - 1)``, ``z = round(-σ(l)·min W / h)``, raw
    min/max of the row (or group) as in the reference, scale clamped to [1e-5, 1e4].
    ``learnable=False`` is the reference's quantizer without LWC: the plain min-max range.
    """

    def __init__(self, out_features: int, in_features: int, bits: int, group_size: int = -1, sym: bool = False,
                 learnable: bool = True):
        super().__init__()
        self.bits, self.group_size, self.sym, self.learnable = bits, group_size, sym, learnable
        n_groups = 1 if group_size == -1 else in_features // group_size
        self.upper = nn.Parameter(torch.full((out_features, n_groups), LWC_INIT))
        self.lower = nn.Parameter(torch.full((out_features, n_groups), LWC_INIT))

    def grid(self, w: torch.Tensor) -> Grid:
        out_features, n_groups = self.upper.shape
        rows = w.reshape(out_features * n_groups, -1)
        hi, lo = rows.amax(dim=1), rows.amin(dim=1)
        if self.learnable:
            hi, lo = torch.sigmoid(self.upper).reshape(-1) * hi, torch.sigmoid(self.lower).reshape(-1) * lo
        maxq = 2**self.bits - 1
        if self.sym:
            hi = torch.maximum(hi.abs(), lo.abs())
            lo = -hi
        scale = ((hi - lo) / maxq).clamp(min=1e-5, max=1e4)
        zero = torch.full_like(scale, (maxq + 1) / 2) if self.sym else torch.round(-lo / scale).clamp(-1e4, 1e4)
        return Grid(scale.reshape(out_features, n_groups), zero.reshape(out_features, n_groups), self.bits,
                    self.group_size)

    def fake_quantize(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` on its clipped grid, differentiable in the logits (straight-through rounding)."""
        grid = self.grid(w)
        scale, zero = grid.expanded(w.shape[1])
        codes = torch.clamp(round_ste(w / scale) + zero, 0, grid.maxq)
        return (codes - zero) * scale


@register("omniquant")
class OmniQuant(Method):
    needs_fp_stream = True
    supports_act_quant = True

    @dataclass(frozen=True)
    class Options:
        lwc: bool = option(True, "learnable weight clipping: two logits per row (or group), init 4.0")
        let: bool | str = option("auto", "learnable equivalent transformation; auto = the paper's choice: "
                                         "weight-activation on; weight-only on for OPT, off for the LLaMA family; "
                                         "off on post-LayerNorm OPT (OPT-350M), which has no norm to fold it into",
                                 choices=("auto", True, False))
        shift: bool | str = option("auto", "LET channel shift; auto = on for weight-activation runs on families "
                                           "whose norms have a bias (OPT), off otherwise (the reference's rule)",
                                   choices=("auto", True, False))
        epochs: int | None = option(None, "passes over the calibration set per block; null = 20 (40 at bits=2), "
                                          "the paper's scripts", low=0)
        lwc_lr: float = option(1e-2, "AdamW learning rate of the LWC logits (code/README value)", positive=True)
        let_lr: float = option(5e-3, "AdamW learning rate of the LET scales/shifts (weight decay 0, batch 1)",
                               positive=True)
        alpha: float | None = option(None, "SmoothQuant migration strength of the LET scale init; null = the "
                                           "scripts' 0.75 at W4A4, 0.5 otherwise", low=0, high=1)
        aug_loss: bool = option(False, "also match the FP block on the quantized-stream inputs (--aug_loss; the "
                                       "scripts use it for LLaMA W2, LLaMA-1 W4A4)")

    def __init__(self, spec, options=None):
        super().__init__(spec, options)
        o = self.options
        self.lwc, self.let, self.shift = o.lwc, o.let, o.shift
        self.epochs = (40 if spec.bits == 2 else 20) if o.epochs is None else o.epochs
        self.lwc_lr, self.let_lr = o.lwc_lr, o.let_lr
        self.alpha = (0.75 if spec.act_bits <= 4 else 0.5) if o.alpha is None else o.alpha
        self.aug_loss = o.aug_loss
        self.history: list[dict] = []  # per block: mean loss of the first and last epoch

    # ------------------------------------------------------------------ which parts are on

    def uses_let(self, block) -> bool:
        if self.let != "auto":
            return self.let
        if not all(block.family.foldable(g.feeder) for g in block.groups):
            return False  # post-LayerNorm OPT: no norm before q/k/v and fc1 to fold LET into
        return not self.spec.weight_only or LET_WEIGHT_ONLY.get(block.family.name, True)

    def uses_shift(self, block) -> bool:
        norms_have_bias = all(getattr(block.norm(g.feeder), "bias", None) is not None for g in norm_fed_groups(block))
        if self.shift == "auto":
            return not self.spec.weight_only and norms_have_bias
        if self.shift and not norms_have_bias:
            raise UserError(f"omniquant shift=true needs norms with a bias; the {block.family.name} family's norms "
                            "have none (allowed there: shift=false or auto)")
        return bool(self.shift)

    def check(self, model) -> None:
        """LET's shift needs norms with a bias; something must be trainable when epochs > 0."""
        super().check(model)
        block = model.block(0)
        use_let = self.uses_let(block)
        if use_let:
            refuse_residual_fed(block, "omniquant's LET (method.let=true)", "use method.let=false or auto (LWC only)")
        self.uses_shift(block)
        if not (self.lwc or use_let) and self.epochs > 0:
            raise UserError("omniquant with lwc=false and no LET has nothing to train; enable lwc or let, "
                            "or set epochs=0")

    def footprint(self, block, windows: int, seqlen: int, batch_size: int) -> Footprint:
        """The plan's estimate: training one window at a time (batch 1) through the block, the
        activations autograd keeps and their gradients, two fp32 copies of the weights (the frozen
        originals and the transformed ones of a step); ``epochs`` passes over the calibration
        set, three passes' FLOPs each, plus the propagation of both streams."""
        weights = sum(m.weight.numel() for m in block.linears().values())
        work = 2 * activation_bytes(block, 1, seqlen, True) + 8 * weights
        flops = 3.0 * self.epochs * block_flops(block, windows, seqlen)
        return Footprint(0, work, 2.0, flops)

    # ------------------------------------------------------------------ the algorithm

    def quantize_block(self, ctx: BlockContext) -> None:
        block = ctx.block
        linears = block.linears()
        use_let, use_shift = self.uses_let(block), self.uses_shift(block)

        with ctx.phase("statistics"):
            stats = None
            if use_let:
                stats = ChannelStatistics()
                ctx.observe(ctx.fp_inputs, on_input=stats.hooks(["o", *LET_REFERENCE_CONSUMER.values()]))
            aug_targets = ctx.run(ctx.inputs) if self.aug_loss else None  # FP block on the quantized stream
        if not self.spec.weight_only:
            install_activation_quantizers(block, self.spec.act_bits)

        let_params = self.init_let(block, stats, use_shift) if use_let else {}
        clipping = {role: LearnableClipping(lin.out_features, lin.in_features, self.spec.bits, self.spec.group_size,
                                            self.spec.sym, self.lwc).to(ctx.device) for role, lin in linears.items()}
        for c in clipping.values():
            c.requires_grad_(self.lwc)

        with ctx.phase("train"):
            self.train_block(ctx, let_params, clipping, aug_targets)

        with ctx.phase("fold"), torch.no_grad():
            if use_let:
                fold(block, self.transform(block, let_params))
            for role, linear in block.linears().items():
                w = linear.weight.data.float()
                grid = clipping[role].grid(w)
                ctx.set_weight(role, grid.fake_quantize(w), grid)

    def init_let(self, block, stats, use_shift: bool) -> dict[str, nn.Parameter]:
        """SmoothQuant-style scales (weight maximum of the first consumer), OS+ shifts, Q–K 1."""
        geometry = block.geometry
        params = {}
        for group in norm_fed_groups(block):
            role = LET_REFERENCE_CONSUMER[group.feeder]
            w_max = block.linear(role).weight.detach().float().abs().amax(dim=0)
            params[f"{group.feeder}.scale"] = smoothing_scale(stats.absmax[role], w_max, self.alpha)
            if use_shift:
                params[f"{group.feeder}.shift"] = stats.midpoint[role].clone()
        o_max = block.linear("o").weight.detach().float().abs().amax(dim=0)
        params["value.scale"] = smoothing_scale(reduce_kv(stats.absmax["o"], geometry), reduce_kv(o_max, geometry),
                                                self.alpha)
        if use_shift:
            params["value.shift"] = reduce_kv(stats.midpoint["o"], geometry, "mean")
        params["query_key.scale"] = torch.ones(query_key_channels(geometry), device=o_max.device)
        return {k: nn.Parameter(v.float()) for k, v in params.items()}

    @staticmethod
    def transform(block, params: dict[str, torch.Tensor]) -> BlockTransform:
        norms = {g.feeder: ChannelTransform(params[f"{g.feeder}.scale"], params.get(f"{g.feeder}.shift"))
                 for g in norm_fed_groups(block)}
        return BlockTransform(norms=norms, value=ChannelTransform(params["value.scale"], params.get("value.shift")),
                              query_key=query_key_scale(params["query_key.scale"], block.geometry))

    def student_parameters(self, block, let_params, clipping) -> dict[str, torch.Tensor]:
        """LET-transformed, LWC-quantized weights (and transformed norms/biases) of the block."""
        params = transformed_parameters(block, self.transform(block, let_params)) if let_params else {}
        for role, linear in block.linears().items():
            name = f"{block.family.linears[role]}.weight"
            params[name] = clipping[role].fake_quantize(params.get(name, linear.weight))
        return params

    def train_block(self, ctx: BlockContext, let_params, clipping, aug_targets) -> None:
        block = ctx.block
        scales = [p for k, p in let_params.items() if k.endswith(".scale")]
        groups = [{"params": list(let_params.values()), "lr": self.let_lr}]
        if self.lwc:
            groups.append({"params": [p for c in clipping.values() for p in c.parameters()], "lr": self.lwc_lr})
        trained = [p for g in groups for p in g["params"]]
        if self.epochs == 0 or not trained:
            return
        optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
        kwargs = ctx.call_kwargs()
        frozen = [(p, p.requires_grad) for p in block.module.parameters()]
        for p, _ in frozen:
            p.requires_grad_(False)
        n = ctx.inputs.shape[0]
        epoch_losses: list[float] = []
        last_good: list[torch.Tensor] = []  # the parameters of the last step with a finite loss
        task = ctx.progress("train", " ".join(k for k, on in (("LET", let_params), ("LWC", self.lwc)) if on),
                            self.epochs * n)
        try:
            for epoch in range(self.epochs):
                total = 0.0
                for j in range(n):
                    with torch.no_grad():
                        for s in scales:
                            s.copy_(floor_magnitude(s))
                    params = self.student_parameters(block, let_params, clipping)
                    x = ctx.inputs[j : j + 1].to(ctx.device)
                    out = block_output(functional_call(block.module, params, (x,), kwargs))
                    loss = nn.functional.mse_loss(out, ctx.fp_outputs[j : j + 1].to(ctx.device))
                    if aug_targets is not None:
                        loss = loss + nn.functional.mse_loss(out, aug_targets[j : j + 1].to(ctx.device))
                    if not math.isfinite(loss.item()):
                        if not last_good:
                            kept = "the initial parameters"
                        else:
                            kept = "the parameters of the last finite step"
                            with torch.no_grad():
                                for p, good in zip(trained, last_good):
                                    p.copy_(good)
                        ctx.note(f"omniquant: non-finite loss ({loss.item()}) at epoch {epoch}, sample {j}; "
                                 f"training of this block stopped, {kept} kept")
                        return
                    last_good = [p.detach().clone() for p in trained]
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    total += loss.item()
                    task.update(epoch * n + j + 1, total / (j + 1))
                epoch_losses.append(total / n)
        finally:
            task.close()
            for p, flag in frozen:
                p.requires_grad_(flag)
            with torch.no_grad():
                for s in scales:
                    s.copy_(floor_magnitude(s))
            if epoch_losses:
                self.history.append({"block": ctx.index, "first_epoch_loss": epoch_losses[0],
                                     "last_epoch_loss": epoch_losses[-1]})


def floor_magnitude(s: torch.Tensor, floor: float = SCALE_FLOOR) -> torch.Tensor:
    """``s`` with every entry of magnitude below ``floor`` set to ``±floor`` (sign kept, 0 -> +floor)."""
    return torch.where(s.abs() < floor, torch.where(s < 0, -floor, floor), s)
