"""Scales refined in closed form once the integers are fixed: stage 2 of the two-stage
group-scale optimisation (Kim et al., arXiv 2602.02126) and TurboBoA's ``refine_qparam``
(Kim et al., ICLR 2026, Prop. 3.3).

With the integer codes ``C`` and zero points ``z`` frozen, a weight on the grid is linear
in its scales: row ``r`` is ``q_r = Σ_g s_{r,g} · pad_g(c_{r,g} − z_{r,g})``. The layer
objective, for ``ΔW = Q − W`` against the target ``W``,

    L(Q) = Σ_h tr(G_h ΔW_h H_h ΔW_hᵀ) − 2 Σ_h tr(G_h W_h D_h ΔW_hᵀ)

(rows split into heads ``h``; ``G_h`` the head's row covariance, the identity for a plain
layer; ``H_h`` the input Hessian, shared or per head; ``D_h`` the residual term of
earlier layers' quantization error, GPTAQ's ``α E[(x_fp − x_q) x_qᵀ]``, or 0) is then a
convex quadratic in each scale alone. Coordinate descent sets one scale at a time to its
exact minimiser, the value where ``∂L/∂s_{r,g} = 0``,

    s ← s + [ z_g H[g, :] (Σ_i G[i, r] (w_i − q_i))ᵀ + (G W D)_r[g] · z_g ] / ( G[r, r] · z_g H[g, g] z_gᵀ )

with ``z_g`` the row's centred codes on group ``g`` (``z_g = pad_g(c − z)``), and refreshes
the row before the next coordinate. Without a row covariance the rows are independent and
every row's scale of one group is updated at once (exact); with one (TurboBoA's query and
key projections), rows are visited one by one within each head, all heads at once. One
sweep visits every (row, group) in that order; ``iters`` sweeps are run. No step can
increase ``L``.

A scale is kept as it was where the minimiser is not a positive finite number (a row
whose codes all equal its zero point, or an update that would flip the sign of a step):
the grid stays a valid grid.

The reference code refines per-channel scales only ("not supported for group-wise
quantization yet") and has an unused group-wise helper for the plain layer; this module
does both, per channel and per group, with and without a row covariance.
"""
from __future__ import annotations

import torch

from aespa.core.grid import Grid


def layer_objective(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor,
                    head_covariance: torch.Tensor | None = None, residual: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """``L(Q)`` of the module docstring for ``weight`` (the target ``W``) and ``quantized``
    (``Q``), both ``[out, in]``; ``hessian`` and ``residual`` ``[in, in]`` or ``[heads, in, in]``;
    ``head_covariance`` ``[heads, d_h, d_h]`` or None."""
    heads = _heads(hessian, head_covariance)
    W = weight.reshape(heads, -1, weight.shape[-1])
    delta = quantized.reshape(W.shape) - W
    H = hessian if hessian.dim() == 3 else hessian[None]
    weighted = delta @ H
    if residual is not None:
        weighted = weighted - 2 * W @ (residual if residual.dim() == 3 else residual[None])
    if head_covariance is not None:
        weighted = head_covariance @ weighted
    return (weighted * delta).sum()


def refine_scales(weight: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                  hessian: torch.Tensor, *, group_size: int = -1, head_covariance: torch.Tensor | None = None,
                  residual: torch.Tensor | None = None, iters: int = 1) -> torch.Tensor:
    """The scales ``[out, n_groups]`` after ``iters`` coordinate-descent sweeps (module
    docstring), started from ``scale``.

    ``weight`` is the target ``W`` ``[out, in]`` (dead input columns already zeroed),
    ``codes`` the integer codes ``[out, in]`` (as floats), ``zero`` ``[out, n_groups]`` the
    frozen zero points; ``hessian``/``residual`` ``[in, in]`` or ``[heads, in, in]`` (already
    damped / scaled by α); ``head_covariance`` ``[heads, d_h, d_h]`` or None. The result is
    in ``weight``'s dtype.
    """
    out_features, in_features = weight.shape
    n_groups = scale.shape[1]
    size = in_features if group_size == -1 or n_groups == 1 else group_size
    if size * n_groups != in_features:
        raise ValueError(f"{n_groups} groups of {size} columns do not cover {in_features} inputs")
    heads = _heads(hessian, head_covariance)
    rows = out_features // heads
    W = weight.reshape(heads, rows, in_features)
    dtype = weight.dtype
    Z = (codes.to(dtype) - zero.to(dtype).repeat_interleave(size, dim=1)).reshape(heads, rows, in_features)
    S = scale.to(dtype).clone().reshape(heads, rows, n_groups)
    H = hessian if hessian.dim() == 3 else hessian[None]
    WD = None if residual is None else W @ (residual if residual.dim() == 3 else residual[None])
    E = W - S.repeat_interleave(size, dim=2) * Z  # W − Q, kept current
    groups = [slice(g * size, (g + 1) * size) for g in range(n_groups)]

    if head_covariance is None:  # rows independent: one group of every row at once
        for _ in range(iters):
            for g, cols in enumerate(groups):
                z = Z[..., cols]
                numerator = (z * (E @ H[..., cols])).sum(-1)
                if WD is not None:
                    numerator = numerator + (z * WD[..., cols]).sum(-1)
                denominator = ((z @ H[..., cols, cols]) * z).sum(-1)
                new = _step(S[..., g], numerator, denominator)
                E[..., cols] -= (new - S[..., g])[..., None] * z
                S[..., g] = new
        return S.reshape(out_features, n_groups)

    G = head_covariance
    GWD = None if WD is None else G @ WD
    for _ in range(iters):
        for r in range(rows):
            for g, cols in enumerate(groups):
                z = Z[:, r, cols]  # [heads, size]
                coupled = torch.einsum("hi,hin->hn", G[:, :, r], E)  # Σ_i G[i, r] (w_i − q_i)
                numerator = (z * (coupled[:, None, :] @ H[..., cols])[:, 0]).sum(-1)
                if GWD is not None:
                    numerator = numerator + (z * GWD[:, r, cols]).sum(-1)
                denominator = G[:, r, r] * ((z[:, None, :] @ H[..., cols, cols])[:, 0] * z).sum(-1)
                new = _step(S[:, r, g], numerator, denominator)
                E[:, r, cols] -= (new - S[:, r, g])[:, None] * z
                S[:, r, g] = new
    return S.reshape(out_features, n_groups)


def refine_grid(weight: torch.Tensor, quantized: torch.Tensor, grid: Grid, hessian: torch.Tensor, *,
                residual: torch.Tensor | None = None, iters: int = 1) -> tuple[torch.Tensor, Grid]:
    """Stage 2 for a plain layer: the integer codes of ``quantized`` on ``grid`` frozen, the
    grid's scales refined by :func:`refine_scales` against the target ``weight`` (dead
    columns zeroed) under ``hessian`` (damped) and ``residual`` (scaled by α, dead columns
    zeroed). Returns the weight on the refined grid and that grid (zero points unchanged);
    computed in the dtype of the codes."""
    if grid.col_scale is not None:
        raise ValueError("refine_grid cannot refine a grid with a per-column factor")
    codes = grid.quantize(quantized)
    dtype = codes.dtype
    scale = refine_scales(weight.to(dtype), codes, grid.scale.to(dtype), grid.zero.to(dtype), hessian.to(dtype),
                          group_size=grid.group_size, iters=iters,
                          residual=None if residual is None else residual.to(dtype))
    refined = Grid(scale, grid.zero, grid.bits, grid.group_size)
    return refined.dequantize(codes), refined


def _step(scale: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """The 1-D minimiser ``scale + numerator / denominator`` where it is a positive finite
    number, else ``scale``."""
    new = scale + numerator / torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    keep = (denominator <= 0) | ~torch.isfinite(new) | (new <= 0)
    return torch.where(keep, scale, new)


def _heads(hessian: torch.Tensor, head_covariance: torch.Tensor | None) -> int:
    if head_covariance is not None:
        return head_covariance.shape[0]
    return hessian.shape[0] if hessian.dim() == 3 else 1
