"""Second-moment statistics of a linear layer's input ("the Hessian") and their
preparation for GPTQ-style sweeps.

For a linear with weight ``W`` ``[out, in]`` and inputs ``x`` (tokens of the
calibration sequences), the layer-wise reconstruction loss is

    ||W X - W_hat X||_F^2 = tr(dW H dWᵀ) / 2,   H = 2 X Xᵀ          (GPTQ paper, Eq. 1-2)

``HessianAccumulator`` keeps ``H`` as the running mean of the IST-DASLab/gptq
reference (``GPTQ.add_batch``): after ``n`` sequences, a batch of ``m`` sequences with
tokens ``X`` updates ``H <- H n/(n+m) + 2/(n+m) XᵀX``. ``n`` counts *sequences*, not
tokens; the scale does not matter downstream because damping is relative to the mean
diagonal.

``RunningSecondMoment`` keeps the token mean ``E[x yᵀ]`` instead (aespa's statistics,
the residual term of GPTAQ/TurboBoA).

``prepare_hessian`` (dead input channels, relative damping: ``add_damping``),
``zero_dead_columns`` and ``inverse_cholesky_upper`` (the upper Cholesky factor of ``H⁻¹``
that the column sweeps read, with a damping fallback) are shared by GPTQ, aespa, BoA and
TurboBoA.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from aespa.core.errors import check_finite

if TYPE_CHECKING:
    from aespa.core.pipeline import BlockContext


class HessianAccumulator:
    """Streaming ``H = 2/N Σ_sequences Σ_tokens x xᵀ`` in fp32 (fp64 if fed fp64)."""

    def __init__(self) -> None:
        self.hessian: torch.Tensor | None = None
        self.nsamples = 0  # sequences seen so far

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs ``[..., in]``: ``[batch, tokens, in]`` counts ``batch``
        sequences, a 2-D ``[tokens, in]`` counts one (as the reference)."""
        m = x.shape[0] if x.dim() >= 3 else 1
        tokens = x.detach().reshape(-1, x.shape[-1])
        tokens = tokens.double() if tokens.dtype == torch.float64 else tokens.float()
        if self.hessian is None:
            self.hessian = torch.zeros(tokens.shape[1], tokens.shape[1], dtype=tokens.dtype, device=tokens.device)
        self.hessian *= self.nsamples / (self.nsamples + m)
        self.nsamples += m
        tokens = math.sqrt(2 / self.nsamples) * tokens
        self.hessian += tokens.t() @ tokens


class RunningSecondMoment:
    """``E[x yᵀ]`` over tokens as a running mean (``y = x`` by default: ``E[x xᵀ]``), for
    ``[..., tokens, d]`` batches; ``leading`` leading dimensions (e.g. heads) are kept apart,
    so the result is ``[*lead, d, d]``. fp32."""

    def __init__(self) -> None:
        self.mean: torch.Tensor | None = None
        self.tokens = 0

    def add(self, x: torch.Tensor, y: torch.Tensor | None = None, leading: int = 0) -> None:
        """``x`` (and ``y``, shaped like it): ``[*lead, tokens, d]`` with ``leading`` leading
        dims kept apart; every other dim counts tokens."""
        x = x.detach().float()
        x = x.reshape(*x.shape[:leading], -1, x.shape[-1])
        if y is not None:
            y = y.detach().float()
            y = y.reshape(*y.shape[:leading], -1, y.shape[-1])
        n = x.shape[-2]
        moment = x.transpose(-1, -2) @ (x if y is None else y)
        if self.mean is None:
            self.mean = torch.zeros_like(moment)
        self.mean *= self.tokens / (self.tokens + n)
        self.mean += moment / (self.tokens + n)
        self.tokens += n


def collect_hessians(ctx: BlockContext, roles: Iterable[str]) -> dict[str, torch.Tensor]:
    """Hessians of the inputs of the linears ``roles`` of the block in ``ctx``, from one
    pass of the block (as it is now) over the quantized-stream inputs ``ctx.inputs``.

    Linears of one adapter group read the same input, so each group's statistic is
    accumulated once; every role still gets its own tensor (safe to modify in place).
    The pass stops once the last needed input is seen.
    """
    roles = list(roles)
    source: dict[str, str] = {}  # role -> the role whose input is hooked
    for group in ctx.block.groups:
        members = [r for r in group.roles if r in roles]
        for r in members:
            source[r] = members[0]
    missing = [r for r in roles if r not in source]
    if missing:
        raise ValueError(f"roles {missing} are not linears of this block; known: {list(ctx.block.linears())}")
    accumulators = {r: HessianAccumulator() for r in set(source.values())}
    ctx.observe(on_input={r: acc.add for r, acc in accumulators.items()})
    check_finite(f"block {ctx.index}", {f"Hessian of the {r} input": acc.hessian for r, acc in accumulators.items()})
    hessians, handed_out = {}, set()
    for r in roles:
        h = accumulators[source[r]].hessian
        hessians[r] = h.clone() if source[r] in handed_out else h
        handed_out.add(source[r])
    return hessians


def prepare_hessian(hessian: torch.Tensor, percdamp: float, dead_value: float = 1.0
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dead input channels and relative damping, on a copy of ``H`` ``[..., in, in]``.

    Dead channels (``H_jj == 0``: the input is always 0) get ``H_jj = dead_value``
    (GPTQ: 1; aespa's code: 1/2048); the caller zeroes those weight columns. Then
    ``H += percdamp · mean(diag H) · I`` (per matrix when batched, e.g. per head).
    Returns ``(H_damped, dead_mask)`` with ``dead_mask`` ``[..., in]``.
    """
    h = hessian.clone()
    diag = h.diagonal(dim1=-2, dim2=-1)
    dead = diag == 0
    diag[dead] = dead_value
    return add_damping(h, percdamp), dead


def add_damping(matrix: torch.Tensor, percdamp: float) -> torch.Tensor:
    """``M += percdamp · mean(diag M) · I`` in place, per matrix of ``[..., n, n]``; returns ``M``."""
    diag = matrix.diagonal(dim1=-2, dim2=-1)
    diag += percdamp * diag.mean(dim=-1, keepdim=True)
    return matrix


def zero_dead_columns(weight: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """``weight`` ``[out, in]`` with the columns of dead input channels set to 0 (a copy); a
    per-head mask ``[heads, in]`` applies to each head's block of ``out / heads`` rows. Also
    for a residual term ``D`` ``[in, in]`` or ``[heads, in, in]`` (its dead columns)."""
    heads = dead.shape[0] if dead.dim() == 2 else 1
    return (weight.reshape(heads, -1, weight.shape[-1]) * ~dead.reshape(heads, 1, -1)).reshape(weight.shape)


def _try_inverse_cholesky_upper(h: torch.Tensor) -> torch.Tensor | None:
    lower, info = torch.linalg.cholesky_ex(h)
    if info.any() or not torch.isfinite(lower).all():
        return None
    upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    if info.any() or not torch.isfinite(upper).all():
        return None
    return upper


def inverse_cholesky_upper(hessian: torch.Tensor, damp: float = 0.0, tries: int = 4
                           ) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = Uᵀ U``), as the reference computes it:
    ``chol(H) -> cholesky_inverse -> chol(·, upper)``.

    ``hessian`` (``[in, in]``, or ``[..., in, in]`` handled matrix by matrix) already
    carries the damping ``damp`` (from ``prepare_hessian``). If a factorisation fails
    (not positive definite in floating point), the damping is raised ×10 and retried, up
    to ``tries`` attempts in all (without damping, the first retry adds 1 % of the mean
    diagonal). If every attempt fails (e.g. non-finite statistics) ``U`` is
    diagonal, which turns the sweep into round-to-nearest (no error feedback), and the
    damping returned is ``inf``. Never raises for numerical reasons.

    Returns ``(U, damp_used)``: the total damping on the diagonal when it succeeded
    (``damp`` if the first attempt did; the largest over matrices when batched).
    """
    if hessian.dim() > 2:
        flat = hessian.reshape(-1, *hessian.shape[-2:])
        results = [inverse_cholesky_upper(h, damp, tries) for h in flat]
        upper = torch.stack([u for u, _ in results]).reshape(hessian.shape)
        return upper, max(d for _, d in results)
    upper = _try_inverse_cholesky_upper(hessian)
    if upper is not None:
        return upper, damp
    diag = hessian.diagonal()
    base = damp if damp > 0 else 1e-3 * diag.mean().item()  # without damping the first retry adds 1 %
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    for k in range(1, tries):
        used = base * 10**k
        if math.isfinite(used) and used > 0:
            upper = _try_inverse_cholesky_upper(hessian + (used - damp) * eye)
            if upper is not None:
                return upper, used
    safe = torch.where(torch.isfinite(diag) & (diag > 0), diag, torch.ones_like(diag))
    return torch.diag(safe.rsqrt()), math.inf
