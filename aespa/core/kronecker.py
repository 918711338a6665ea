"""Quantizing a weight under a Kronecker-structured Hessian, rows and columns both
compensated: the solver of BoA (Kim et al., ICML 2025) and TurboBoA (Kim et al., ICLR 2026).

For a weight whose rows split into heads, ``W_h`` ``[d_h, in]``, the objective is

    L = Σ_h tr(G_h ΔW_h H ΔW_hᵀ)  (− 2 Σ_h tr(G_h W_h D ΔW_hᵀ) with a residual term)

with ``H`` ``[in, in]`` the input Hessian (shared by the heads, or one per head) and
``G_h`` ``[d_h, d_h]`` the head's row Hessian (for a query projection the key covariance,
for a key projection the query covariance): the Hessian of ``vec(W_h)`` is ``G_h ⊗ H``.

Per head, all heads at once, blocks of ``rows`` consecutive rows ``B = [r1, r2)`` are
quantized in order:

1. every row of ``B`` is swept column by column with GPTQ's update under ``H`` alone (the
   rows of ``B`` do not compensate each other; with a residual term, GPTAQ's recursion);
2. the later rows ``R = [r2, d_h)`` take the closed-form compensation that minimises ``L``
   over them with the rows up to ``r2`` fixed (TurboBoA Prop. 3.1),

       W_R ← W_R − P2 (W_B − Q_B),   P2 = U_out[B, R]ᵀ U_out[B, B]⁻ᵀ = −G_RR⁻¹ G_RB,

   ``U_out`` the upper Cholesky factor of ``G⁻¹``; with the residual term ``D``
   (Prop. 3.2) the block's error is ``(W_B − Q_B) + W_B D H⁻¹``.

With ``rows = 1`` this is BoA: the sequence of per-row GPTQ sweeps with the row update
equals one dense GPTQ sweep of ``vec(W_h)`` under ``G_h ⊗ H`` in row-major order (the upper
Cholesky factor of ``(G ⊗ H)⁻¹`` is ``U_out ⊗ U_in``). With ``rows = d_h`` it is GPTQ on every
row under ``H``.

Grids: either fixed for every row before the solve (BoA) or recomputed for each block of
rows from its weights as they stand after the earlier blocks' compensation, before the
in-row sweep (TurboBoA's ``adaptive_qparam``); a group's grid never sees the in-row
updates. ``act_order_col`` visits columns in decreasing ``H_jj`` (one order for all rows;
not with groups or per-head ``H``), ``act_order_row`` the rows of each head in decreasing
``G_jj``. With ``refine_iters`` the scales are then refined with the integers frozen
(:func:`aespa.core.scale_refine.refine_scales`, in the visiting order). Inputs are taken as
prepared (dead columns zeroed, Hessians damped).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from aespa.core.grid import Grid
from aespa.core.hessian import inverse_cholesky_upper
from aespa.core.scale_refine import refine_scales

# (weight rows [n, in], input Hessian [in, in] or [heads, in, in] in the solver's column order) -> grid
GridRule = Callable[[torch.Tensor, torch.Tensor], Grid]


@dataclass
class KroneckerResult:
    weight_q: torch.Tensor  # [out, in], on the grid
    grid: Grid  # scale and zero [out, n_groups], original row and column order
    damping_raised: bool  # a Cholesky factorisation needed more damping than given


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Round to nearest on the grid and back (the reference's order: round, then shift)."""
    return scale * (torch.clamp(torch.round(w / scale) + zero, 0, maxq) - zero)


def row_sweep(weight: torch.Tensor, upper: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int,
              residual_map: torch.Tensor | None = None, blocksize: int = 128) -> torch.Tensor:
    """GPTQ's column sweep on a batch of rows: ``weight`` ``[heads, n, in]`` (updated in place),
    ``upper`` ``[1|heads, in, in]`` the upper Cholesky factor of ``H⁻¹``, ``scale``/``zero``
    ``[heads, n, in]`` per element; ``residual_map`` GPTAQ's ``P = triu(D Uᵀ, 1) U`` shaped like
    ``upper``. Lazy updates by blocks of ``blocksize`` columns. Returns ``Q``."""
    W, U, P = weight, upper, residual_map
    cols = W.shape[-1]
    Q = torch.zeros_like(W)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        err = torch.zeros_like(W[..., i1:i2])
        rounded_from = torch.zeros_like(err)  # each column as it stood when rounded
        for j in range(i1, i2):
            w = W[..., j].clone()
            q = fake_quantize(w, scale[..., j], zero[..., j], maxq)
            Q[..., j] = q
            e = (w - q) / U[:, None, j, j]
            W[..., j:i2] -= e[..., None] * U[:, None, j, j:i2]
            if P is not None:
                W[..., j:i2] += w[..., None] * P[:, None, j, j:i2]
            err[..., j - i1], rounded_from[..., j - i1] = e, w
        if i2 < cols:
            W[..., i2:] -= err @ U[:, i1:i2, i2:]
            if P is not None:
                W[..., i2:] += rounded_from @ P[:, i1:i2, i2:]
    return Q


def kronecker_sweep(weight: torch.Tensor, hessian: torch.Tensor, head_covariance: torch.Tensor,
                    grid: Grid | GridRule, *, rows: int = 1, residual: torch.Tensor | None = None,
                    act_order_col: bool = False, act_order_row: bool = False, refine_iters: int = 0,
                    blocksize: int = 128) -> KroneckerResult:
    """Quantize ``weight`` ``[heads · d_h, in]`` under ``G_h ⊗ H`` (module docstring).

    ``hessian`` ``[in, in]`` or ``[heads, in, in]``, ``head_covariance`` ``[heads, d_h, d_h]``,
    both damped; ``residual`` GPTAQ's ``D`` (already scaled by α) shaped like ``hessian``;
    ``grid`` a :class:`Grid` for every row, or a rule giving the grid of each block of rows.
    """
    heads, d_h = head_covariance.shape[0], head_covariance.shape[1]
    in_features = weight.shape[1]
    if weight.shape[0] != heads * d_h:
        raise ValueError(f"{heads} heads of {d_h} rows do not make the {weight.shape[0]} rows of the weight")
    if not 1 <= rows <= d_h:
        raise ValueError(f"rows={rows} is outside 1..{d_h}")
    W = weight.reshape(heads, d_h, in_features).clone()
    H = hessian if hessian.dim() == 3 else hessian[None]
    D = None if residual is None else (residual if residual.dim() == 3 else residual[None])
    G = head_covariance
    fixed = grid if isinstance(grid, Grid) else None
    bits = fixed.bits if fixed is not None else None
    group_size = fixed.group_size if fixed is not None else -1
    S = Z = None  # scale / zero [heads, d_h, n_groups], solver order
    if fixed is not None:
        S, Z = (t.to(W.dtype).reshape(heads, d_h, -1).clone() for t in (fixed.scale, fixed.zero))

    col_perm = None
    if act_order_col:
        if H.shape[0] != 1 or (fixed is not None and fixed.scale.shape[1] > 1):
            raise ValueError("act_order_col needs one input Hessian for all heads and a per-channel grid")
        col_perm = torch.argsort(H[0].diagonal(), descending=True, stable=True)
        W, H = W[..., col_perm], H[:, col_perm][:, :, col_perm]
        D = None if D is None else D[:, col_perm][:, :, col_perm]
    row_perm = None
    if act_order_row:
        row_perm = torch.argsort(G.diagonal(dim1=-2, dim2=-1), dim=-1, descending=True, stable=True)  # [heads, d_h]
        W = torch.gather(W, 1, row_perm[..., None].expand_as(W))
        G = torch.gather(torch.gather(G, 1, row_perm[..., None].expand_as(G)), 2, row_perm[:, None, :].expand_as(G))
        if fixed is not None:
            S, Z = (torch.gather(t, 1, row_perm[..., None].expand_as(t)) for t in (S, Z))
    target = W.clone()

    U_in, damp_in = inverse_cholesky_upper(H)
    U_out, damp_out = inverse_cholesky_upper(G)
    P = H_inv_residual = None
    if D is not None:
        P = torch.triu(D @ U_in.transpose(-1, -2), diagonal=1) @ U_in
        H_inv_residual = D @ U_in.transpose(-1, -2) @ U_in  # D H⁻¹

    Q = torch.zeros_like(W)
    for r1 in range(0, d_h, rows):
        r2 = min(r1 + rows, d_h)
        block = W[:, r1:r2]
        if fixed is None:
            g = grid(block.reshape(-1, in_features), H[0] if H.shape[0] == 1 else H)
            if S is None:
                bits, group_size = g.bits, g.group_size
                S = torch.zeros(heads, d_h, g.scale.shape[1], dtype=W.dtype, device=W.device)
                Z = torch.zeros_like(S)
            S[:, r1:r2] = g.scale.to(W.dtype).reshape(heads, r2 - r1, -1)
            Z[:, r1:r2] = g.zero.to(W.dtype).reshape(heads, r2 - r1, -1)
        scale, zero = _per_column(S[:, r1:r2], in_features), _per_column(Z[:, r1:r2], in_features)
        Q[:, r1:r2] = row_sweep(block.clone(), U_in, scale, zero, 2**bits - 1, P, blocksize)
        if r2 < d_h:
            inverse_bb = torch.linalg.solve_triangular(
                U_out[:, r1:r2, r1:r2], torch.eye(r2 - r1, dtype=W.dtype, device=W.device).expand(heads, -1, -1),
                upper=True)
            P2 = U_out[:, r1:r2, r2:].transpose(-1, -2) @ inverse_bb.transpose(-1, -2)  # [heads, R, B]
            error = block - Q[:, r1:r2]
            if H_inv_residual is not None:
                error = error + block @ H_inv_residual
            W[:, r2:] -= P2 @ error

    if refine_iters > 0:
        codes = torch.round(Q / _per_column(S, in_features)) + _per_column(Z, in_features)
        n_groups = S.shape[-1]
        S = refine_scales(target.reshape(-1, in_features), codes.reshape(-1, in_features), S.reshape(-1, n_groups),
                          Z.reshape(-1, n_groups), H[0] if H.shape[0] == 1 else H, group_size=group_size,
                          head_covariance=G, residual=None if D is None else (D[0] if D.shape[0] == 1 else D),
                          iters=refine_iters).reshape(heads, d_h, n_groups)
        Q = _per_column(S, in_features) * (codes - _per_column(Z, in_features))

    if row_perm is not None:
        inverse = torch.argsort(row_perm, dim=-1)
        Q = torch.gather(Q, 1, inverse[..., None].expand_as(Q))
        S, Z = (torch.gather(t, 1, inverse[..., None].expand_as(t)) for t in (S, Z))
    if col_perm is not None:
        Q = Q[..., torch.argsort(col_perm)]
    n_groups = S.shape[-1]
    return KroneckerResult(Q.reshape(-1, in_features),
                           Grid(S.reshape(-1, n_groups), Z.reshape(-1, n_groups), bits, group_size),
                           damp_in > 0 or damp_out > 0)


def _per_column(t: torch.Tensor, in_features: int) -> torch.Tensor:
    """``[..., n_groups]`` per-group values broadcast to ``[..., in_features]``."""
    return t.repeat_interleave(in_features // t.shape[-1], dim=-1)
