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

:func:`learn_rounding` runs this for a quadratic task loss (aespa's objectives) in closed
form: with ``c = floor(w0 / s) + z`` fixed by the starting weight ``w0``, every weight whose
``c`` lies in ``[0, 2^b - 2]`` moves with ``h`` and every other one is pinned by the clamp, so

    ΔW = w_soft - W = D + A ⊙ y,   y = 2 h(V) - 1 = clamp(2.4 sigmoid(V) - 1.2, -1, 1),

with the constants ``A = s/2`` on the free weights (0 elsewhere) and
``D = s (clamp(c, 0, 2^b - 1) - z) - W + A``. For the loss
``L = Σ_h tr(G_h ΔW_h H_h ΔW_hᵀ)`` (``G`` = I for the plain and per-head objectives) the
gradient is ``∂L/∂ΔW = 2 G ΔW H`` (G, H symmetric), the product the loss itself needs, so one
step costs one product per objective (two for the Kronecker q/k objective: ``ΔW H``, then
``G ·``), and the rest is elementwise:

    ∂/∂V = 2.4 (2 A ⊙ G ΔW H - λ β sign(y) |y|^(β-1)) ⊙ σ (1 - σ) ⊙ [|2.4σ - 1.2| ≤ 1]

followed by Adam (``torch.optim.Adam``, fused). This is the same function and gradient as
autograd through :func:`soft_quantized_weight` and :class:`RoundingRegularizer`
(:func:`learn_rounding_autograd`; a test checks the rounding variables after many steps
against it).

All problems of one call (aespa: every linear of a block) are one flat set of variables:
each elementwise operation runs once per step over all of them, and problems that share
the input Hessian and the kind of objective (q with k, gate with up) are stacked into one
matrix product; the problems stay independent (no term couples two of them), so the result
of each is the one it would get alone.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

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


# --------------------------------------------------------------------------- quadratic objectives


def _heads(hessian: torch.Tensor, head_covariance: torch.Tensor | None) -> int:
    if head_covariance is not None:
        return head_covariance.shape[0]
    return hessian.shape[0] if hessian.dim() == 3 else 1


def quadratic_product(delta: torch.Tensor, hessian: torch.Tensor,
                      head_covariance: torch.Tensor | None = None) -> torch.Tensor:
    """``G_h ΔW_h H_h`` for every head h, as ``[out, in]``: half the gradient of
    :func:`quadratic_loss` (symmetric G, H). Rows split in consecutive heads; ``hessian``
    ``[in, in]`` or ``[heads, in, in]``, ``head_covariance`` ``[heads, d_h, d_h]`` or None."""
    d = delta.reshape(_heads(hessian, head_covariance), -1, delta.shape[-1])
    product = d @ hessian
    if head_covariance is not None:
        product = head_covariance @ product
    return product.reshape(delta.shape)


def quadratic_loss(delta: torch.Tensor, hessian: torch.Tensor, head_covariance: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """``Σ_h tr(G_h ΔW_h H_h ΔW_hᵀ)`` (aespa's objectives, Eqs. 17, 21, 22; G = I when None)."""
    return (delta * quadratic_product(delta, hessian, head_covariance)).sum()


# --------------------------------------------------------------------------- learned rounding


@dataclass
class RoundingProblem:
    """AdaRound of one weight ``[out, in]`` on ``grid`` under the task loss
    ``quadratic_loss(Ŵ - weight, hessian, head_covariance)`` plus ``round_weight`` · f_reg.
    Rounding starts from ``start`` (default ``weight``, e.g. a GPTQ-updated weight): the
    floor and the initial offsets are those of ``start / scale``."""

    weight: torch.Tensor
    grid: Grid
    hessian: torch.Tensor
    head_covariance: torch.Tensor | None = None
    start: torch.Tensor | None = None
    round_weight: float = 1.0
    name: str = ""


@dataclass
class RoundingResult:
    weight: torch.Tensor  # the hard-rounded weight, on the grid
    v: torch.Tensor  # the learned rounding variables [out, in]
    start_loss: float  # task loss at the start (the soft weight of step 0)
    loss: float  # task loss of the hard-rounded weight


# called after every step's loss product: (step, 1-based; a function giving that step's task loss, summed
# over the problems, evaluated only if called)
StepHook = Callable[[int, Callable[[], float]], None]


class _Product:
    """One matrix product per step for consecutive problems that share their input Hessian
    and the kind of objective: their rows are stacked (a view of the flat buffers)."""

    def __init__(self, problems: Sequence[RoundingProblem], offset: int):
        first = problems[0]
        self.in_features = first.weight.shape[1]
        self.rows = sum(p.weight.shape[0] for p in problems)
        self.offset, self.size = offset, self.rows * self.in_features
        self.hessian = first.hessian
        self.head_covariance = None
        if first.head_covariance is not None:
            self.head_covariance = torch.cat([p.head_covariance for p in problems])  # [heads, d_h, d_h]
            self.heads = self.head_covariance.shape[0]
            self.temp = torch.empty(self.rows, self.in_features, dtype=first.weight.dtype,
                                    device=first.weight.device)
        else:
            self.heads = _heads(self.hessian, None)

    @staticmethod
    def joins(product: list[RoundingProblem], p: RoundingProblem) -> bool:
        q = product[-1]
        if p.hessian.dim() != 2 or q.hessian.dim() != 2 or p.hessian.shape != q.hessian.shape:
            return False
        if (p.head_covariance is None) != (q.head_covariance is None):
            return False
        if p.head_covariance is not None and p.head_covariance.shape[1:] != q.head_covariance.shape[1:]:
            return False
        return p.hessian is q.hessian or torch.equal(p.hessian, q.hessian)

    def __call__(self, delta: torch.Tensor, out: torch.Tensor) -> None:
        """``out`` ← G ΔW H for this product's slice of the flat ``delta``."""
        d = delta[self.offset:self.offset + self.size]
        o = out[self.offset:self.offset + self.size]
        rows, cols = self.rows, self.in_features
        if self.head_covariance is None and self.heads == 1:
            torch.mm(d.view(rows, cols), self.hessian, out=o.view(rows, cols))
        elif self.head_covariance is None:
            torch.bmm(d.view(self.heads, -1, cols), self.hessian, out=o.view(self.heads, -1, cols))
        else:
            if self.hessian.dim() == 2:
                torch.mm(d.view(rows, cols), self.hessian, out=self.temp)
            else:
                torch.bmm(d.view(self.heads, -1, cols), self.hessian, out=self.temp.view(self.heads, -1, cols))
            torch.bmm(self.head_covariance, self.temp.view(self.heads, -1, cols), out=o.view(self.heads, -1, cols))


def learn_rounding(problems: Sequence[RoundingProblem], *, iterations: int, lr: float, warmup: float = 0.2,
                   beta: tuple[float, float] = (20.0, 2.0), on_step: StepHook | None = None
                   ) -> list[RoundingResult]:
    """AdaRound (Adam on V, ``iterations`` steps, learning rate ``lr``, the regulariser's
    schedule of :class:`RoundingRegularizer`) on every problem at once, with the loss and its
    gradient in closed form (module docstring). Returns one result per problem."""
    ref = problems[0].weight
    device, dtype = ref.device, ref.dtype
    sizes = [p.weight.numel() for p in problems]
    offsets = [sum(sizes[:i]) for i in range(len(problems))]
    n = sum(sizes)

    def flat() -> torch.Tensor:
        return torch.empty(n, dtype=dtype, device=device)

    # constants of the steps: ΔW = base + half_scale ⊙ y; slope = 4.8 · half_scale
    v, base, half_scale = flat(), flat(), flat()
    for p, offset, size in zip(problems, offsets, sizes):
        part = slice(offset, offset + size)
        start = (p.weight if p.start is None else p.start).detach()
        scale, zero = p.grid.expanded(p.weight.shape[1])
        x = start / scale
        floor = torch.floor(x)
        v[part] = inverse_rectified_sigmoid(x - floor).flatten()
        codes = floor + zero
        half = 0.5 * scale * ((codes >= 0) & (codes <= p.grid.maxq - 1))
        half_scale[part] = half.flatten()
        base[part] = (scale * (torch.clamp(codes, 0, p.grid.maxq) - zero) - p.weight + half).flatten()
    slope = 4.8 * half_scale

    products: list[_Product] = []
    i = 0
    while i < len(problems):
        j = i + 1
        while j < len(problems) and _Product.joins(list(problems[i:j]), problems[j]):
            j += 1
        products.append(_Product(problems[i:j], offsets[i]))
        i = j
    # consecutive problems with the same regulariser weight: one update each
    runs: list[tuple[int, int, float]] = []
    for p, offset, size in zip(problems, offsets, sizes):
        if runs and runs[-1][2] == p.round_weight and runs[-1][1] == offset:
            runs[-1] = (runs[-1][0], offset + size, p.round_weight)
        else:
            runs.append((offset, offset + size, p.round_weight))

    sig, unclamped, y, delta, product = flat(), flat(), flat(), flat(), flat()
    # d clamp(u, -1, 1)/du = [-1 <= u <= 1]: hardtanh's backward passes strictly inside its bounds,
    # so they are the floats next to -1 and 1 (one branch-free pass instead of a mask and a fill)
    inside = (torch.nextafter(torch.tensor(-1.0, dtype=dtype), torch.tensor(-2.0, dtype=dtype)).item(),
              torch.nextafter(torch.tensor(1.0, dtype=dtype), torch.tensor(2.0, dtype=dtype)).item())
    optimizer = torch.optim.Adam([v], lr=lr, fused=device.type in ("cpu", "cuda"))
    regularizer = RoundingRegularizer(iterations, warmup, *beta)

    def step_loss() -> float:
        return torch.dot(delta, product).item()

    start_losses: list[float] = []
    with torch.no_grad():
        for step in range(iterations):
            torch.sigmoid(v, out=sig)
            torch.mul(sig, 2 * (ZETA - GAMMA), out=unclamped).sub_(1 - 2 * GAMMA)  # 2 (1.2σ - 0.1) - 1
            torch.clamp(unclamped, -1, 1, out=y)
            torch.addcmul(base, half_scale, y, out=delta)
            for prod in products:
                prod(delta, product)
            if step == 0:
                start_losses = [torch.dot(delta[o:o + s], product[o:o + s]).item() for o, s in zip(offsets, sizes)]
            if on_step is not None:
                on_step(step + 1, step_loss)
            grad = product.mul_(slope)  # the product is not read again this step
            if step >= regularizer.start:
                b = regularizer.beta(step)
                reg = torch.abs(y, out=delta)  # sign(y)|y|^(β-1), in the buffer of ΔW
                if b > 1:  # 2^((β-1) log2|y|): vectorised passes, cheaper than pow (and exp) on a CPU
                    reg.log2_().mul_(b - 1).exp2_()
                else:
                    reg.pow_(b - 1)
                reg.copysign_(y)
                for lo, hi, weight in runs:
                    if weight:
                        grad[lo:hi].add_(reg[lo:hi], alpha=-(ZETA - GAMMA) * 2 * weight * b)
            grad.mul_(sig.addcmul_(sig, sig, value=-1))  # · σ(1 - σ)
            v.grad = torch.ops.aten.hardtanh_backward.grad_input(grad, unclamped, *inside, grad_input=y)  # · [|u| <= 1]
            optimizer.step()

    results = []
    for p, offset, size, start_loss in zip(problems, offsets, sizes, start_losses or [float("nan")] * len(problems)):
        start = (p.weight if p.start is None else p.start).detach()
        rounding = v[offset:offset + size].view_as(p.weight).clone()
        hard = hard_quantized_weight(start, p.grid, rounding)
        loss = quadratic_loss(hard - p.weight, p.hessian, p.head_covariance).item()
        results.append(RoundingResult(hard, rounding, start_loss, loss))
    return results


def learn_rounding_autograd(problem: RoundingProblem, *, iterations: int, lr: float, warmup: float = 0.2,
                            beta: tuple[float, float] = (20.0, 2.0)) -> torch.Tensor:
    """AdaRound by its definition, one problem alone: autograd through
    :func:`soft_quantized_weight`, :func:`quadratic_loss` and :class:`RoundingRegularizer`,
    ``torch.optim.Adam`` on V. Returns V. No method uses it: it is what :func:`learn_rounding`
    is checked against (tests) and measured against (``experiments.rounding_noise``)."""
    p = problem
    start = (p.weight if p.start is None else p.start).detach()
    v = torch.nn.Parameter(init_rounding(start, p.grid))
    optimizer = torch.optim.Adam([v], lr=lr)
    regularizer = RoundingRegularizer(iterations, warmup, *beta)
    with torch.enable_grad():
        for step in range(iterations):
            delta = soft_quantized_weight(start, p.grid, v) - p.weight
            loss = quadratic_loss(delta, p.hessian, p.head_covariance) + p.round_weight * regularizer(step, v)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return v.detach()
