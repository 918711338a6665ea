"""The uniform quantization grid every method shares.

A b-bit asymmetric grid over a range [lo, hi] has integer levels 0 .. 2^b - 1:

    scale = (hi - lo) / (2^b - 1),   zero = round(-lo / scale)
    q     = clamp(round(w / scale) + zero, 0, 2^b - 1),   w_hat = scale * (q - zero)

Granularity: one (scale, zero) per output row ("per-channel", ``group_size=-1``) or per
group of ``group_size`` consecutive input columns of each row ("g128").

The min-max range follows the GPTQ/RTN reference: the range always contains 0
(lo = min(min w, 0), hi = max(max w, 0)); a row that is all zeros gets [-1, 1];
``sym`` uses [-max|w|, max|w|] with the zero point fixed at (2^b) / 2.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from aespa.core.errors import UserError


@dataclass
class Grid:
    """Quantization parameters of one weight matrix ``[out, in]``.

    ``scale`` and ``zero`` have shape ``[out, n_groups]``; ``n_groups`` is 1 for a
    per-channel grid. ``zero`` holds integers stored as floats.
    """

    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int = -1
    col_scale: torch.Tensor | None = None  # optional per-input-column factor (Z-Fold's zeta), [in]

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def expanded(self, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero broadcast to every weight element, ``[out, in]``."""
        if self.scale.shape[1] == 1:
            scale, zero = self.scale.expand(-1, in_features), self.zero.expand(-1, in_features)
        else:
            g = self.group_size
            scale = self.scale.repeat_interleave(g, dim=1)[:, :in_features]
            zero = self.zero.repeat_interleave(g, dim=1)[:, :in_features]
        if self.col_scale is not None:
            scale = scale * self.col_scale[None, :]
        return scale, zero

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        """Integer codes of ``w`` on this grid (round to nearest)."""
        scale, zero = self.expanded(w.shape[1])
        return torch.clamp(torch.round(w / scale) + zero, 0, self.maxq)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        scale, zero = self.expanded(codes.shape[1])
        return scale * (codes - zero)

    def fake_quantize(self, w: torch.Tensor) -> torch.Tensor:
        """Round-to-nearest onto the grid and back (the RTN weight)."""
        return self.dequantize(self.quantize(w))

    def to(self, device) -> Grid:
        """The same grid with its tensors on ``device``."""
        return Grid(self.scale.to(device), self.zero.to(device), self.bits, self.group_size,
                    None if self.col_scale is None else self.col_scale.to(device))

    def to_dict(self) -> dict:
        """Plain tensors and numbers (CPU), loadable with ``torch.load(weights_only=True)``;
        ``col_scale`` only when present. The inverse of :meth:`from_dict`."""
        d = {"scale": self.scale.detach().cpu(), "zero": self.zero.detach().cpu(), "bits": self.bits,
             "group_size": self.group_size}
        if self.col_scale is not None:
            d["col_scale"] = self.col_scale.detach().cpu()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Grid:
        return cls(d["scale"], d["zero"], int(d["bits"]), int(d["group_size"]), d.get("col_scale"))


def check_group_size(in_features: int, group_size: int, name: str = "layer") -> None:
    if group_size == -1:
        return
    if group_size <= 0 or in_features % group_size:
        raise UserError(
            f"group_size={group_size} does not divide the input width {in_features} of {name}; "
            f"allowed: -1 (per channel) or a divisor of {in_features}"
        )


def minmax_range(w: torch.Tensor, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise range of ``w`` (``[rows, cols]``) containing 0; ``[-1, 1]`` for an all-zero row."""
    lo = torch.clamp(w.min(dim=1).values, max=0)
    hi = torch.clamp(w.max(dim=1).values, min=0)
    if sym:
        hi = torch.maximum(lo.abs(), hi)
        lo = torch.where(lo < 0, -hi, lo)
    dead = (lo == 0) & (hi == 0)
    return torch.where(dead, -1.0, lo), torch.where(dead, 1.0, hi)


def grid_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point of the grid over [lo, hi] (vectors of equal shape)."""
    maxq = 2**bits - 1
    scale = (hi - lo) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-lo / scale)
    return scale, zero


def minmax_grid(w: torch.Tensor, bits: int, sym: bool = False, group_size: int = -1) -> Grid:
    """The RTN/GPTQ min-max grid of ``w`` ``[out, in]``, per channel or per group."""
    out_features, in_features = w.shape
    check_group_size(in_features, group_size)
    w = w.float()
    rows = w if group_size == -1 else w.reshape(-1, group_size)
    lo, hi = minmax_range(rows, sym)
    scale, zero = grid_from_range(lo, hi, bits, sym)
    return Grid(scale.reshape(out_features, -1), zero.reshape(out_features, -1), bits, group_size)


def round_to_nearest(w: torch.Tensor, bits: int, sym: bool = False, group_size: int = -1) -> torch.Tensor:
    """RTN: ``w`` fake-quantized on its own min-max grid."""
    return minmax_grid(w, bits, sym, group_size).fake_quantize(w.float()).to(w.dtype)


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``torch.round`` in the forward pass (bit-identical), identity gradient in the backward
    pass: the straight-through estimator of methods that train through a quantizer."""
    return _RoundSTE.apply(x)


def quantize_activation(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-token dynamic asymmetric min-max fake quantization over the last dimension
    (OmniQuant/QLLM activation quantizer: raw min/max, scale clamped to >= 1e-5).
    Differentiable as in those codes: straight-through rounding of ``x / scale``, the
    zero point rounded plainly (no gradient through it)."""
    maxq = 2**bits - 1
    lo = x.amin(dim=-1, keepdim=True)
    hi = x.amax(dim=-1, keepdim=True)
    scale = ((hi - lo) / maxq).clamp(min=1e-5, max=1e4)
    zero = torch.round(-lo / scale).clamp(-1e4, 1e4)
    q = torch.clamp(round_ste(x / scale) + zero, 0, maxq)
    return (q - zero) * scale
