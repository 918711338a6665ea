"""Quantization parameters refined to minimise the Hessian-weighted loss, and Z-Fold.

aespa's first step per layer (Kim et al., NeurIPS 2024, §4.1) computes the grid
(scale, zero point) that minimises the loss perturbation ``tr(ΔW H ΔWᵀ)`` rather than
``‖ΔW‖²``, with the layer's (damped) Hessian ``H`` — for the value projection the
attention-weighted one, split by head.

``hessian_weighted_grid`` — the clipping search of the reference code
(``find_quant_params``): for each output row, clip ratios r = 1.00, 0.99, ..., 0.01 of the
min-max range (range containing 0), asymmetric zero point floor(-lo/s) or ceil(-lo/s)
(symmetric: fixed at 2^(b-1)), keep the (scale, zero) with the smallest row loss
``ΔW_r H ΔW_rᵀ`` (first one on ties).

``zfold`` — Z-Fold (Jeon et al., EMNLP 2023), as aespa's code runs it
(``refine_qparams_zfold``): a per-input-channel factor ζ multiplies the step of every
row, ``Ŵ = diag(s) (Q - Z) diag(ζ)``; ζ can be folded into the op that feeds the layer
(a norm, the rows of v or of up/fc1), so it is free at inference. Layers reading the same
input (q, k, v) share one ζ. Starting from the min-max grid and ζ = 1, it alternates

1. ζ-step: per input column j, the least-squares ζ_j = <W̃_j, W_j> / (<W̃_j, W̃_j> + 1e-10)
   over the stacked rows of the group, W̃ = dequant(W / ζ) on the current grid
   (ζ_j = 0 is replaced by 1);
2. s-step: ``hessian_weighted_grid`` of each layer on W / ζ, the error measured as
   (dequant(W / ζ) - W / ζ) ζ;

for up to 30 rounds, stopping as soon as the summed loss of the group increases (ties
continue) and keeping the last grids that did not increase it. The result is a
:class:`~aespa.core.grid.Grid` per layer with ζ in ``Grid.col_scale``.

Group-wise grids (``group_size`` > 0; the reference code has none): one clip ratio per
(row, group), searched group after group in column order, each minimising the same row
loss with the other groups' current grids fixed (the cross terms with the other groups
are kept: exact coordinate descent, started from the min-max grids). ζ stays one factor
per input column. With one group this is the per-channel search above.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from aespa.core.grid import Grid, minmax_grid, minmax_range

CLIP_RATIOS = torch.arange(1.0, 0.0, -0.01)  # 1.00, 0.99, ..., 0.01 (as the reference)
CHUNK_ELEMENTS = 2**24  # candidates x rows x columns scored at once (bounds memory)


def _by_head(x: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` ``[out, cols]`` as ``[heads, out/heads, cols]`` (one head for a 2-D Hessian)."""
    return x.reshape(hessian.shape[0] if hessian.dim() == 3 else 1, -1, x.shape[-1])


def _hessian3(hessian: torch.Tensor) -> torch.Tensor:
    return hessian if hessian.dim() == 3 else hessian[None]


def weighted_error(weight: torch.Tensor, grid: Grid, hessian: torch.Tensor) -> torch.Tensor:
    """``Σ_rows ΔW_r H ΔW_rᵀ`` of round-to-nearest on ``grid`` (per-head Hessians: rows by head)."""
    delta = _by_head(grid.fake_quantize(weight) - weight, hessian)
    return ((delta @ _hessian3(hessian)) * delta).sum()


def hessian_weighted_grid(weight: torch.Tensor, hessian: torch.Tensor, bits: int, sym: bool = False,
                          group_size: int = -1, col_scale: torch.Tensor | None = None) -> Grid:
    """The grid of ``weight`` ``[out, in]`` that minimises the Hessian-weighted error,
    searched over clip ratios of the min-max range of ``weight / col_scale``.

    ``hessian``: ``[in, in]``, or ``[heads, in, in]`` for rows split by head.
    """
    out_features, in_features = weight.shape
    zeta = torch.ones(in_features, dtype=weight.dtype, device=weight.device) if col_scale is None else col_scale
    w = weight / zeta
    size = in_features if group_size == -1 else group_size
    n_groups = in_features // size
    H = _hessian3(hessian)
    maxq = 2**bits - 1

    start = minmax_grid(w, bits, sym, group_size)
    scale, zero = start.scale.to(w.dtype), start.zero.to(w.dtype)  # the groups not searched yet
    lo, hi = minmax_range(w.reshape(-1, size), sym)
    lo, hi = lo.reshape(out_features, n_groups), hi.reshape(out_features, n_groups)
    ratios = CLIP_RATIOS.to(device=w.device, dtype=w.dtype)[:, None]  # [R, 1]
    delta = Grid(scale, zero, bits, group_size, zeta).fake_quantize(weight) - weight
    for g in range(n_groups):
        cols = slice(g * size, (g + 1) * size)
        h_gg = H[:, cols, cols]
        cross = None
        if n_groups > 1:  # loss terms coupling this group with the others (held fixed)
            d = _by_head(delta, hessian)
            cross = (d @ H[:, :, cols] - d[..., cols] @ h_gg).reshape(out_features, size)
        # candidates in the reference's order: ratio by ratio, zero point floor then ceil
        r_lo, r_hi = lo[:, g] * ratios, hi[:, g] * ratios  # [R, out]
        step = (r_hi - r_lo) / maxq
        if sym:
            steps, zeros = step, torch.full_like(step, (maxq + 1) / 2)
        else:
            steps = step.repeat_interleave(2, dim=0)
            zeros = torch.stack([torch.floor(-r_lo / step), torch.ceil(-r_lo / step)], 1).reshape(steps.shape)
        chunk = max(1, CHUNK_ELEMENTS // (out_features * size))  # candidates scored at once
        scores = torch.cat([_candidate_scores(w[:, cols], zeta[cols], steps[i:i + chunk], zeros[i:i + chunk], maxq,
                                              hessian, h_gg, cross) for i in range(0, steps.shape[0], chunk)])
        best = scores.argmin(0)  # the first of equal scores, as the reference's strict "<"
        rows = torch.arange(out_features, device=w.device)
        scale[:, g], zero[:, g] = steps[best, rows], zeros[best, rows]
        grid_g = Grid(scale[:, g:g + 1], zero[:, g:g + 1], bits, -1, zeta[cols])
        delta[:, cols] = grid_g.fake_quantize(weight[:, cols]) - weight[:, cols]
    return Grid(scale, zero, bits, group_size, col_scale)


def _candidate_scores(w, zeta, steps, zeros, maxq, hessian, h_gg, cross):
    """Row losses ``[candidates, out]`` of the grids (steps, zeros) ``[candidates, out]`` on
    the columns ``w`` ``[out, cols]`` (in units of ζ), the other columns' error held fixed."""
    step, zero = steps[..., None], zeros[..., None]
    # d = (step * (clamp(round(w / step + zero), 0, maxq) - zero) - w) * ζ, in place: these
    # [c, out, cols] passes are memory-bound and cost more than the product with H below
    d = torch.div(w, step)
    d.add_(zero).round_().clamp_(0, maxq).sub_(zero).mul_(step).sub_(w).mul_(zeta)
    c, heads, cols = d.shape[0], h_gg.shape[0], d.shape[-1]
    if heads == 1:
        d_h = d.reshape(c, 1, -1, cols)
        score = (d_h @ h_gg).mul_(d_h).sum(-1).reshape(c, -1)
    else:  # head-major [heads, c·rows, cols]: one product per head, H not broadcast over the candidates
        d_h = d.reshape(c, heads, -1, cols).transpose(0, 1).reshape(heads, -1, cols)
        score = torch.bmm(d_h, h_gg).mul_(d_h).sum(-1).reshape(heads, c, -1).transpose(0, 1).reshape(c, -1)
    if cross is not None:
        score = score + 2 * (d * cross).sum(-1)
    return score


def find_zeta(weights: list[torch.Tensor], grids: list[Grid], zeta: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """The ζ-step: per input column, the least-squares factor between the grid values of
    ``W / ζ`` and ``W``, over the stacked rows of every layer sharing ζ."""
    w = torch.cat(weights)
    grid_values = torch.cat([Grid(g.scale, g.zero, g.bits, g.group_size).fake_quantize(x / zeta)
                             for x, g in zip(weights, grids)])
    new = (grid_values * w).sum(0) / ((grid_values * grid_values).sum(0) + eps)
    return torch.where(new == 0, torch.ones_like(new), new)


@dataclass
class ZFoldResult:
    grids: list[Grid]  # one per layer, ζ in col_scale
    zeta: torch.Tensor  # [in]
    rounds: int  # accepted alternations
    initial_loss: float  # summed Hessian-weighted error of the min-max grids
    loss: float  # ... of the returned grids


def zfold(weights: list[torch.Tensor], hessians: list[torch.Tensor], bits: int, sym: bool = False,
          group_size: int = -1, max_rounds: int = 30, initial_grids: list[Grid] | None = None,
          on_round: Callable[[int, float], None] | None = None) -> ZFoldResult:
    """Z-Fold for layers sharing one input (see the module docstring); ``initial_grids``
    default to the min-max grids of ``weights``; ``on_round(round, loss)`` after every round."""
    in_features = weights[0].shape[1]
    zeta = torch.ones(in_features, dtype=weights[0].dtype, device=weights[0].device)
    grids = initial_grids or [minmax_grid(w, bits, sym, group_size) for w in weights]
    grids = [Grid(g.scale, g.zero, g.bits, g.group_size, zeta) for g in grids]

    def total(gs):
        return sum(weighted_error(w, g, h) for w, g, h in zip(weights, gs, hessians)).item()

    initial = best_loss = total(grids)
    best_grids, best_zeta, rounds = grids, zeta, 0
    for i in range(max_rounds):
        zeta = find_zeta(weights, grids, zeta)
        grids = [hessian_weighted_grid(w, h, bits, sym, group_size, zeta) for w, h in zip(weights, hessians)]
        loss = total(grids)
        if on_round is not None:
            on_round(i + 1, loss)
        if loss > best_loss:
            break
        best_loss, best_grids, best_zeta, rounds = loss, grids, zeta, rounds + 1
    return ZFoldResult(best_grids, best_zeta, rounds, initial, best_loss)
