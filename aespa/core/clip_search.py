"""Grids chosen by a clip search: for every row, or every (row, group), of a weight the
shrunk min-max grid with the smallest error on that group alone.

BoA and TurboBoA pick their grids this way (their ``qparam`` option), and it is stage 1 of
the two-stage group-scale optimisation (Kim et al., arXiv 2602.02126): each group's scale
starts from the minimiser of its own reconstruction loss, before the column sweep fixes
the integers.

Candidates per (row, group), in this order: the min-max range ``[lo, hi]`` of the group's
weights (the range contains 0; an all-zero group gets ``[-1, 1]``; symmetric grids use
``±max|w|``) scaled by ``p = 1, 0.99, ..., 0.01``; step ``s = p (hi − lo) / maxq``; zero
point ``floor(−p lo / s)``, then ``ceil(−p lo / s)`` (symmetric grids: the fixed mid point
``2^(b−1)``). With ``e = fq(w_g) − w_g`` the score of a candidate is

- ``hessian``: ``e H_gg eᵀ`` with the group's diagonal block of the input Hessian (of the
  row's head where the Hessian is per head);
- ``mse``: ``Σ |e|^2.4`` (the reference's "MMSE");
- ``minmax``: no search, ``p = 1`` and zero point ``round(−lo / s)`` (the RTN/GPTQ grid).

The first candidate with the smallest score wins. Groups are scored one by one: the cross
terms between groups are left out here (stage 2, :mod:`aespa.core.scale_refine`, accounts
for them).
"""
from __future__ import annotations

import torch

from aespa.core.grid import Grid, check_group_size, grid_from_range, minmax_range

QPARAM_MODES = ("minmax", "mse", "hessian")
SHRINK_STEPS = 100  # p = 1 - i / 100
MSE_NORM = 2.4
_CHUNK_ELEMENTS = 2**24  # candidate errors scored at once (bounds memory)


def search_grid(weight: torch.Tensor, bits: int, sym: bool = False, group_size: int = -1, *,
                mode: str = "hessian", hessian: torch.Tensor | None = None) -> Grid:
    """The grid of ``weight`` ``[out, in]`` chosen by ``mode`` (see the module docstring).

    ``hessian`` (``mode="hessian"``): ``[in, in]``, or ``[heads, in, in]`` for rows split
    into ``heads`` consecutive blocks. The search runs in ``weight``'s dtype.
    """
    if mode not in QPARAM_MODES:
        raise ValueError(f"unknown grid mode {mode!r}; allowed: {', '.join(QPARAM_MODES)}")
    if mode == "hessian" and hessian is None:
        raise ValueError("the hessian grid search needs the input Hessian")
    out_features, in_features = weight.shape
    check_group_size(in_features, group_size)
    size = in_features if group_size == -1 else group_size
    n_groups = in_features // size
    w = weight if weight.dtype == torch.float64 else weight.float()
    lo, hi = minmax_range(w.reshape(-1, size), sym)
    lo, hi = lo.reshape(out_features, n_groups), hi.reshape(out_features, n_groups)
    if mode == "minmax":
        scale, zero = grid_from_range(lo, hi, bits, sym)
        return Grid(scale, zero, bits, group_size)

    maxq = 2**bits - 1
    shrink = 1 - torch.arange(SHRINK_STEPS, dtype=w.dtype, device=w.device)[:, None] / SHRINK_STEPS  # [P, 1]
    H = None
    if mode == "hessian":
        H = hessian.to(device=w.device, dtype=w.dtype)
        H = H if H.dim() == 3 else H[None]
    scale = torch.empty(out_features, n_groups, dtype=w.dtype, device=w.device)
    zero = torch.empty_like(scale)
    rows = torch.arange(out_features, device=w.device)
    for g in range(n_groups):
        cols = slice(g * size, (g + 1) * size)
        r_lo, r_hi = lo[:, g] * shrink, hi[:, g] * shrink  # [P, out]
        step = (r_hi - r_lo) / maxq
        if sym:
            steps, zeros = step, torch.full_like(step, (maxq + 1) / 2)
        else:  # per shrink factor: floor, then ceil
            steps = step.repeat_interleave(2, dim=0)
            zeros = torch.stack([torch.floor(-r_lo / step), torch.ceil(-r_lo / step)], 1).reshape(steps.shape)
        chunk = max(1, _CHUNK_ELEMENTS // (out_features * size))
        h_gg = None if H is None else H[:, cols, cols]
        scores = torch.cat([_scores(w[:, cols], steps[i:i + chunk], zeros[i:i + chunk], maxq, h_gg)
                            for i in range(0, steps.shape[0], chunk)])
        best = scores.argmin(0)  # the first of equal scores
        scale[:, g], zero[:, g] = steps[best, rows], zeros[best, rows]
    return Grid(scale, zero, bits, group_size)


def _scores(w: torch.Tensor, steps: torch.Tensor, zeros: torch.Tensor, maxq: int, h_gg: torch.Tensor | None
            ) -> torch.Tensor:
    """Scores ``[candidates, out]`` of the grids ``(steps, zeros)`` ``[candidates, out]`` on the
    group's columns ``w`` ``[out, size]``; ``h_gg`` ``[1|heads, size, size]`` or None (mse)."""
    step, zero = steps[..., None], zeros[..., None]
    error = torch.div(w, step)
    error.round_().add_(zero).clamp_(0, maxq).sub_(zero).mul_(step).sub_(w)
    if h_gg is None:
        return error.abs_().pow_(MSE_NORM).sum(-1)
    c, heads, cols = error.shape[0], h_gg.shape[0], error.shape[-1]
    if heads == 1:
        by_head = error.reshape(c, 1, -1, cols)
        return ((by_head @ h_gg) * by_head).sum(-1).reshape(c, -1)
    # head-major [heads, c·rows, cols]: one product per head, H not broadcast over the candidates
    by_head = error.reshape(c, heads, -1, cols).transpose(0, 1).reshape(heads, -1, cols)
    return (torch.bmm(by_head, h_gg) * by_head).sum(-1).reshape(heads, c, -1).transpose(0, 1).reshape(c, -1)
