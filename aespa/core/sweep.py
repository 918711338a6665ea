"""The GPTQ (OPTQ) column sweep: quantize a weight column by column and push each
column's rounding error onto the columns not yet quantized (Frantar et al., ICLR 2023).

For ``W`` ``[out, in]`` and the Hessian ``H = 2 X Xᵀ`` of the layer-wise loss
``tr(dW H dWᵀ)/2``, with ``U`` the upper Cholesky factor of ``H⁻¹`` (``H⁻¹ = Uᵀ U``),
quantizing column ``j`` to ``q_j`` and updating the later columns by

    e_j = (w_j - q_j) / U_jj,      W[:, j+1:] -= e_j U[j, j+1:]         (paper Eq. 3-5, Alg. 1)

is the optimal (OBS) compensation when the columns are fixed in order. As in the
IST-DASLab/gptq reference (``GPTQ.fasterquant``) the updates are "lazy-batched": inside a
block of ``blocksize`` columns they are applied to the block only, and the block's errors
``E`` update every later column at once, ``W[:, i2:] -= E U[i1:i2, i2:]``.

Options, all as the reference:
- ``act_order``: columns are visited in decreasing ``H_jj`` and the result is un-permuted.
- ``group_size`` > 0, dynamic groups (default): the grid of a group is the min-max grid of
  the group's columns computed when the sweep reaches the group's first column, on the
  weights *as they stood at the start of the enclosing block of* ``blocksize`` *columns*
  (the reference reads the lazily updated matrix there, so for ``group_size < blocksize``
  the within-block updates of earlier columns are not seen; for ``group_size`` a multiple
  of ``blocksize`` this is the fully updated weight). With ``act_order`` a group is
  ``group_size`` consecutive columns *in the visiting order*.
- ``static_groups``: every group grid is computed once, before the sweep, on the original
  weights (dead columns zeroed), and looked up by original column index.
- per-channel (``group_size = -1``): one min-max grid per row, computed on the original
  weights before dead columns are zeroed.

A ``grid`` passed in (e.g. refined by aespa, possibly with the per-input-column factor
``Grid.col_scale``) is used as given: column ``j`` (original index) is rounded on its
row scales ``scale[:, j // grid.group_size] · col_scale[j]`` and zero points, whatever
the visiting order — the same lookup as static groups; nothing is recomputed, and
``group_size``/``static_groups`` are ignored.

``residual`` (GPTAQ, Li et al. 2025; TurboBoA's feature 2): the cross moment
``D = α · E[(x_fp − x_q) x_qᵀ]`` (in the scale of ``hessian``) of the gap between the
full-precision model's inputs and the quantized model's. Each column's update then also
pushes its own input error onto the later columns, ``W[:, j+1:] += w_j P[j, j+1:]`` with
``P = triu(D Uᵀ, 1) U`` (``P[j, j+1:] = D[j, j+1:] H[j+1:, j+1:]⁻¹``), ``w_j`` the column as
it stood when rounded; dead input columns of ``D`` are zeroed. Without it (default) the
sweep is unchanged.

Numerics: fp32 as the reference (fp64 when the weight is fp64, for exact tests). Pure
tensors in, tensors out.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from aespa.core.errors import UserError
from aespa.core.grid import Grid, check_group_size, minmax_grid
from aespa.core.hessian import inverse_cholesky_upper, prepare_hessian, zero_dead_columns


@dataclass
class SweepResult:
    weight_q: torch.Tensor  # [out, in] quantized weight (dequantized values, on `grid`), original column order
    grid: Grid  # the grid weight_q lies on (original column order; see gptq_sweep for act_order + dynamic groups)
    losses: torch.Tensor  # [in] per column: Σ_rows (w_j - q_j)² / (2 U_jj²), the reference's "error" terms
    damping: float  # damping actually used, as a fraction of the mean diagonal of H (percdamp unless
    #                 Cholesky failed and it was raised; inf: every attempt failed, rounding was RTN)
    weight_updated: torch.Tensor  # [out, in] each column as it stood just before it was rounded (aespa's OPTQ init)


def check_sweep_options(blocksize: int, percdamp: float) -> None:
    """One-line errors for the sweep's own knobs."""
    if not isinstance(blocksize, int) or isinstance(blocksize, bool) or blocksize <= 0:
        raise UserError(f"blocksize={blocksize!r} is not allowed; use a positive integer (default 128)")
    if not isinstance(percdamp, (int, float)) or isinstance(percdamp, bool) or not percdamp > 0:
        raise UserError(f"percdamp={percdamp!r} is not allowed; use a positive fraction of the mean Hessian "
                        f"diagonal (default 0.01)")


def gptq_sweep(weight: torch.Tensor, hessian: torch.Tensor, grid: Grid | None = None, *, bits: int | None = None,
               sym: bool = False, group_size: int = -1, blocksize: int = 128, percdamp: float = 0.01,
               act_order: bool = False, static_groups: bool = False, dead_value: float = 1.0,
               residual: torch.Tensor | None = None) -> SweepResult:
    """Quantize ``weight`` ``[out, in]`` by the GPTQ sweep under ``hessian``.

    ``hessian`` is ``[in, in]``, or ``[heads, in, in]`` with one Hessian per block of
    ``out / heads`` consecutive rows (aespa's per-head objectives); each block of rows is
    then swept with its own Hessian (own damping, own ``act_order`` permutation).

    ``residual``: GPTAQ's ``D`` (module docstring), shaped like ``hessian``.

    ``grid``: use this grid (see the module docstring); else min-max grids of ``bits``
    bits (``sym``, ``group_size``, ``static_groups``) as the reference. With
    ``act_order`` and dynamic groups the groups are not contiguous in the original
    column order, so the returned grid is expanded to one (scale, zero) per column
    (``group_size = 1``; the reference needs a ``g_idx`` there).
    """
    check_sweep_options(blocksize, percdamp)
    if grid is None:
        if bits is None:
            raise ValueError("gptq_sweep needs bits when no grid is given")
        check_group_size(weight.shape[1], group_size)
    elif bits is not None and bits != grid.bits:
        raise ValueError(f"bits={bits} contradicts the given grid's bits={grid.bits}")
    options = dict(bits=grid.bits if grid is not None else bits, sym=sym, group_size=group_size, blocksize=blocksize,
                   percdamp=percdamp, act_order=act_order, static_groups=static_groups, dead_value=dead_value)
    if hessian.dim() == 2:
        return _sweep(weight, hessian, grid, residual=residual, **options)
    heads = hessian.shape[0]
    if weight.shape[0] % heads:
        raise ValueError(f"{heads} per-head Hessians do not divide the {weight.shape[0]} rows of the weight")
    rows = weight.shape[0] // heads
    parts = [_sweep(weight[h * rows:(h + 1) * rows], hessian[h],
                    None if grid is None else _grid_rows(grid, slice(h * rows, (h + 1) * rows)),
                    residual=None if residual is None else residual[h], **options)
             for h in range(heads)]
    first = parts[0].grid
    merged = Grid(torch.cat([p.grid.scale for p in parts]), torch.cat([p.grid.zero for p in parts]), first.bits,
                  first.group_size, first.col_scale)
    return SweepResult(torch.cat([p.weight_q for p in parts]), merged, torch.stack([p.losses for p in parts]).sum(0),
                       max(p.damping for p in parts), torch.cat([p.weight_updated for p in parts]))


def _grid_rows(grid: Grid, rows: slice) -> Grid:
    return Grid(grid.scale[rows], grid.zero[rows], grid.bits, grid.group_size, grid.col_scale)


def _fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Round to nearest on the grid and back (the same arithmetic as ``Grid.fake_quantize``)."""
    return scale * (torch.clamp(torch.round(w / scale) + zero, 0, maxq) - zero)


def _sweep(weight, hessian, grid, *, bits, sym, group_size, blocksize, percdamp, act_order, static_groups,
           dead_value, residual=None) -> SweepResult:
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    W = weight.detach().to(dtype).clone()
    rows, cols = W.shape
    maxq = 2**bits - 1
    dynamic_groups = grid is None and group_size != -1 and not static_groups
    if grid is None and group_size == -1:
        grid = minmax_grid(W, bits, sym)  # before dead columns are zeroed, as the reference

    H, dead = prepare_hessian(hessian.detach().to(device=W.device, dtype=dtype), percdamp, dead_value)
    mean_diag = H.diagonal().mean().item() / (1 + percdamp)  # mean diagonal before damping
    W = zero_dead_columns(W, dead)
    if grid is None and static_groups:
        grid = minmax_grid(W, bits, sym, group_size)

    if grid is not None:
        scale, zero = (t.to(dtype).contiguous() for t in grid.expanded(cols))
    else:  # filled group by group during the sweep
        scale, zero = torch.zeros_like(W), torch.zeros_like(W)
    perm = None
    if act_order:
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)
        W, H, scale, zero = W[:, perm], H[perm][:, perm], scale[:, perm], zero[:, perm]

    U, damp_used = inverse_cholesky_upper(H, percdamp * mean_diag)
    P = None  # GPTAQ's residual recursion (module docstring)
    if residual is not None:
        D = zero_dead_columns(residual.detach().to(device=W.device, dtype=dtype), dead)
        if perm is not None:
            D = D[perm][:, perm]
        P = torch.triu(D @ U.T, diagonal=1) @ U
    Q = torch.zeros_like(W)
    updated = torch.zeros_like(W)
    losses = torch.zeros(cols, dtype=dtype, device=W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        err = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if dynamic_groups and j % group_size == 0:
                g = minmax_grid(W[:, j:j + group_size], bits, sym)  # W: as it stood at the block start
                scale[:, j:j + group_size] = g.scale
                zero[:, j:j + group_size] = g.zero
            w = W1[:, i]
            updated[:, j] = w
            q = _fake_quantize(w, scale[:, j], zero[:, j], maxq)
            Q[:, j] = q
            e = (w - q) / U1[i, i]
            losses[j] = (e**2).sum() / 2
            W1[:, i:] -= e[:, None] * U1[i, i:][None, :]
            if P is not None:
                W1[:, i:] += updated[:, j, None] * P[j, j:i2][None, :]
            err[:, i] = e
        W[:, i2:] -= err @ U[i1:i2, i2:]
        if P is not None:
            W[:, i2:] += updated[:, i1:i2] @ P[i1:i2, i2:]

    if perm is not None:
        inverse = torch.argsort(perm)
        Q, updated, losses, scale, zero = Q[:, inverse], updated[:, inverse], losses[inverse], scale[:, inverse], \
            zero[:, inverse]
    if dynamic_groups:
        grid = Grid(scale, zero, bits, 1) if act_order else \
            Grid(scale[:, ::group_size].contiguous(), zero[:, ::group_size].contiguous(), bits, group_size)
    relative_damping = damp_used / mean_diag if damp_used != float("inf") else float("inf")
    return SweepResult(Q, grid, losses, relative_damping, updated)
