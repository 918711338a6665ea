"""AdaRound: learning whether each weight rounds down or up (Nagel et al., ICML 2020).

The pieces every rounding-learning method shares (aespa's layer-wise step, BRECQ's
block reconstruction). On a fixed grid (scale ``s``, zero ``z``, levels 0..2^b-1, with an
optional per-input-column factor folded into ``s``) a weight ``w`` is represented as

    w_soft = s * (clamp(floor(w / s) + h(V) + z, 0, 2^b - 1) - z)

with one free variable ``V`` per weight and the rectified sigmoid

    h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1),   gamma = -0.1, zeta = 1.1.

``V`` starts where ``h(V)`` equals the fractional part of ``w / s`` (so ``w_soft = w``
inside the range), is trained with a task loss plus ``lambda * f_reg``, where

    f_reg(V) = sum (1 - |2 h(V) - 1|^beta)

is zero during the first 20 % of the iterations (warm-up) and then pushes every ``h``
to 0 or 1 while ``beta`` decays linearly from 20 to 2; finally every weight is rounded
up where ``V >= 0`` and down elsewhere.
"""
from __future__ import annotations

import torch

from aespa.core.grid import Grid

GAMMA, ZETA = -0.1, 1.1  # stretch of the rectified sigmoid


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """h(V): the soft rounding offset in [0, 1]."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def inverse_rectified_sigmoid(h: torch.Tensor) -> torch.Tensor:
    """The V with h(V) = ``h`` for ``h`` in [0, 1)."""
    return -torch.log((ZETA - GAMMA) / (h - GAMMA) - 1)


def init_rounding(weight: torch.Tensor, grid: Grid) -> torch.Tensor:
    """V for ``weight`` ``[out, in]`` such that the soft-quantized weight starts at ``weight``
    (inside the grid's range): h(V) = frac(weight / scale)."""
    scale, _ = grid.expanded(weight.shape[1])
    x = weight / scale
    return inverse_rectified_sigmoid(x - torch.floor(x))


def soft_quantized_weight(weight: torch.Tensor, grid: Grid, v: torch.Tensor) -> torch.Tensor:
    """The differentiable weight of AdaRound: rounding offsets h(V) instead of round()."""
    scale, zero = grid.expanded(weight.shape[1])
    q = torch.clamp(torch.floor(weight / scale) + rectified_sigmoid(v) + zero, 0, grid.maxq)
    return scale * (q - zero)


def hard_quantized_weight(weight: torch.Tensor, grid: Grid, v: torch.Tensor) -> torch.Tensor:
    """The final weight: round up where V >= 0, down elsewhere; on the grid exactly."""
    scale, zero = grid.expanded(weight.shape[1])
    q = torch.clamp(torch.floor(weight / scale) + (v >= 0).to(weight.dtype) + zero, 0, grid.maxq)
    return scale * (q - zero)


class RoundingRegularizer:
    """f_reg with AdaRound's schedule: 0 for ``warmup * iterations`` steps, then
    sum(1 - |2h - 1|^beta) with beta decaying linearly from ``beta_start`` to ``beta_end``
    over the remaining steps (the reference codes' ``RoundLoss`` + ``LinearTempDecay``)."""

    def __init__(self, iterations: int, warmup: float = 0.2, beta_start: float = 20.0, beta_end: float = 2.0):
        self.iterations, self.warmup = iterations, warmup
        self.beta_start, self.beta_end = beta_start, beta_end
        self.start = warmup * iterations

    def beta(self, step: int) -> float:
        if step < self.start:
            return self.beta_start
        progress = (step - self.start) / (self.iterations - self.start)
        return self.beta_end + (self.beta_start - self.beta_end) * max(0.0, 1.0 - progress)

    def __call__(self, step: int, v: torch.Tensor) -> torch.Tensor:
        if step < self.start:
            return v.new_zeros(())
        h = rectified_sigmoid(v)
        return (1 - (2 * h - 1).abs().pow(self.beta(step))).sum()


def learn_rounding(weight: torch.Tensor, grid: Grid, loss_fn, *, iterations: int, lr: float,
                   round_weight: float, warmup: float = 0.2, beta: tuple[float, float] = (20.0, 2.0),
                   init_weight: torch.Tensor | None = None) -> torch.Tensor:
    """AdaRound on one weight matrix with a quadratic (or any differentiable) task loss.

    ``loss_fn(w_soft)`` is the reconstruction loss of the soft-quantized weight; rounding
    starts from ``init_weight`` (default ``weight``, e.g. a GPTQ-updated weight), i.e. the
    floor and the initial offsets are those of ``init_weight / scale``. Adam on V only.
    Returns the hard-rounded weight (on ``grid``).
    """
    base = weight if init_weight is None else init_weight
    base = base.detach()
    v = torch.nn.Parameter(init_rounding(base, grid))
    optimizer = torch.optim.Adam([v], lr=lr)
    regularizer = RoundingRegularizer(iterations, warmup, *beta)
    with torch.enable_grad():
        for step in range(iterations):
            loss = loss_fn(soft_quantized_weight(base, grid, v)) + round_weight * regularizer(step, v)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return hard_quantized_weight(base, grid, v.detach())
