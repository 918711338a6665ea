"""The quantities of the rounding step (AdaRound in closed form), the Kronecker solver and
aespa's statistics, each against its definition computed here by brute force (explicit loops
over elements, heads and positions) or by autograd: the rectified sigmoid and its inverse, the
soft and hard weights, the regulariser's value and schedule, the quadratic objectives and
their gradient, the learned rounding variables, the rounding/grid helpers of the Kronecker
solver, and the rotated-back query/key covariances."""
import math

import pytest
import torch

from aespa.core.attention import rotation_matrices
from aespa.core.errors import UserError
from aespa.core.grid import Grid
from aespa.core.rounding import (
    RoundingRegularizer,
    hard_quantized_weight,
    init_rounding,
    inverse_rectified_sigmoid,
    quadratic_loss,
    quadratic_product,
    rectified_sigmoid,
    soft_quantized_weight,
)
from aespa.statistics import QuadraticObjective, rotary_tables, rotate_back

F64 = torch.float64


def spd(n: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(2 * n, n, generator=g, dtype=F64)
    return x.T @ x / n + 0.1 * torch.eye(n, dtype=F64)


# --------------------------------------------------------------------------- AdaRound's pieces


def test_rectified_sigmoid_and_its_inverse_are_the_stretched_clamped_sigmoid():
    v = torch.tensor([-40.0, -3.0, -0.7, 0.0, 0.4, 2.5, 40.0], dtype=F64)
    expected = [min(1.0, max(0.0, 1.2 / (1 + math.exp(-x)) - 0.1)) for x in v.tolist()]
    assert rectified_sigmoid(v).tolist() == pytest.approx(expected, abs=1e-15)
    assert rectified_sigmoid(v)[0].item() == 0.0 and rectified_sigmoid(v)[-1].item() == 1.0
    h = torch.tensor([0.0, 0.1, 0.37, 0.5, 0.93], dtype=F64)
    # σ(V) · 1.2 − 0.1 = h  ⇔  V = log((h + 0.1) / (1.1 − h))
    assert inverse_rectified_sigmoid(h).tolist() == pytest.approx(
        [math.log((x + 0.1) / (1.1 - x)) for x in h.tolist()], abs=1e-14)


def grid_and_weight():
    """A per-group grid (zero ≠ 0) and a weight with entries inside and outside its range."""
    g = torch.Generator().manual_seed(1)
    scale = torch.rand(3, 2, generator=g, dtype=F64).add(0.2)
    zero = torch.tensor([[1.0, 2.0], [0.0, 3.0], [2.0, 1.0]], dtype=F64)
    grid = Grid(scale, zero, bits=2, group_size=3)
    weight = 2.5 * torch.randn(3, 6, generator=g, dtype=F64)
    return grid, weight


def test_soft_and_hard_weights_element_by_element():
    grid, w = grid_and_weight()
    g = torch.Generator().manual_seed(2)
    v = torch.randn(w.shape, generator=g, dtype=F64)
    v[0, 0] = 0.0  # V = 0 rounds up
    soft, hard, start = soft_quantized_weight(w, grid, v), hard_quantized_weight(w, grid, v), init_rounding(w, grid)
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            s, z = grid.scale[i, j // 3].item(), grid.zero[i, j // 3].item()
            x = w[i, j].item() / s
            h = min(1.0, max(0.0, 1.2 / (1 + math.exp(-v[i, j].item())) - 0.1))
            assert soft[i, j].item() == pytest.approx(s * (min(3.0, max(0.0, math.floor(x) + h + z)) - z), abs=1e-12)
            up = 1.0 if v[i, j].item() >= 0 else 0.0
            assert hard[i, j].item() == pytest.approx(s * (min(3.0, max(0.0, math.floor(x) + up + z)) - z), abs=1e-12)
            assert rectified_sigmoid(start[i, j]).item() == pytest.approx(x - math.floor(x), abs=1e-12)


@pytest.mark.parametrize("iterations,warmup,beta", [(100, 0.2, (20.0, 2.0)), (37, 0.3, (8.0, 3.0))])
def test_regulariser_schedule_and_value(iterations, warmup, beta):
    reg = RoundingRegularizer(iterations, warmup, *beta)
    assert reg.start == pytest.approx(warmup * iterations)
    start = warmup * iterations
    for step in range(iterations + 5):
        expected = beta[0] if step < start else \
            beta[1] + (beta[0] - beta[1]) * max(0.0, 1 - (step - start) / (iterations - start))
        assert reg.beta(step) == pytest.approx(expected, abs=1e-12)
    v = torch.randn(5, 4, generator=torch.Generator().manual_seed(3), dtype=F64)
    for step in range(iterations):
        value = reg(step, v).item()
        if step < start:
            assert value == 0.0
        else:
            b = reg.beta(step)
            h = [min(1.0, max(0.0, 1.2 / (1 + math.exp(-x)) - 0.1)) for x in v.flatten().tolist()]
            assert value == pytest.approx(sum(1 - abs(2 * x - 1) ** b for x in h), rel=1e-12)
            assert value > 0
    assert RoundingRegularizer(10).start == 2.0 and RoundingRegularizer(10).beta(10) == 2.0
    assert RoundingRegularizer(10).beta(2) == 20.0 and RoundingRegularizer(10).beta(6) == pytest.approx(11.0)


# --------------------------------------------------------------------------- the quadratic objectives


def objectives():
    g = torch.Generator().manual_seed(4)
    h, per_head = spd(5, g), torch.stack([spd(5, g) for _ in range(3)])
    cov = torch.stack([spd(2, g) for _ in range(3)])
    delta = torch.randn(6, 5, generator=g, dtype=F64)
    return {  # (hessian, head covariance, the loss by a loop over heads)
        "layer": (h, None, lambda d: torch.trace(d @ h @ d.T)),
        "heads": (per_head, None, lambda d: sum(torch.trace(d[2 * i:2 * i + 2] @ per_head[i] @ d[2 * i:2 * i + 2].T)
                                               for i in range(3))),
        "kronecker": (h, cov, lambda d: sum(torch.trace(cov[i] @ d[2 * i:2 * i + 2] @ h @ d[2 * i:2 * i + 2].T)
                                            for i in range(3))),
        "kronecker per head": (per_head, cov, lambda d: sum(
            torch.trace(cov[i] @ d[2 * i:2 * i + 2] @ per_head[i] @ d[2 * i:2 * i + 2].T) for i in range(3))),
    }, delta


@pytest.mark.parametrize("kind", ["layer", "heads", "kronecker", "kronecker per head"])
def test_quadratic_objectives_value_and_gradient(kind):
    cases, delta = objectives()
    hessian, cov, loop = cases[kind]
    d = delta.clone().requires_grad_(True)
    reference = loop(d)
    (grad,) = torch.autograd.grad(reference, d)
    assert quadratic_loss(delta, hessian, cov).item() == pytest.approx(reference.item(), rel=1e-12)
    torch.testing.assert_close(2 * quadratic_product(delta, hessian, cov), grad, rtol=1e-12, atol=1e-12)
    d2 = delta.clone().requires_grad_(True)
    value = QuadraticObjective(hessian, cov)(d2)
    assert value.item() == pytest.approx(reference.item(), rel=1e-12)
    (3 * value).backward()
    torch.testing.assert_close(d2.grad, 3 * grad, rtol=1e-12, atol=1e-12)


def test_layer_objective_of_an_odd_number_of_rows():
    g = torch.Generator().manual_seed(6)
    h, delta = spd(5, g), torch.randn(7, 5, generator=g, dtype=F64)
    assert QuadraticObjective(h)(delta).item() == pytest.approx(torch.trace(delta @ h @ delta.T).item(), rel=1e-12)


@pytest.mark.parametrize("per_head", [True, False])
def test_rounding_of_a_kronecker_problem_equals_autograd(per_head):
    """q/k objectives with one input Hessian per head (the batched product path) or a shared
    one, in closed form against autograd; no output buffer of the wrong shape (a resize
    warns: an error here)."""
    import warnings

    from aespa.core.grid import minmax_grid
    from aespa.core.rounding import RoundingProblem, learn_rounding, learn_rounding_autograd

    g = torch.Generator().manual_seed(7)
    w = torch.randn(6, 5, generator=g, dtype=F64)
    hessian = torch.stack([spd(5, g) for _ in range(3)]) if per_head else spd(5, g)
    p = RoundingProblem(w, minmax_grid(w, 2), hessian, torch.stack([spd(2, g) for _ in range(3)]), round_weight=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        closed, = learn_rounding([p], iterations=40, lr=0.05)
    torch.testing.assert_close(closed.v, learn_rounding_autograd(p, iterations=40, lr=0.05), rtol=1e-9, atol=1e-9)


def test_rounding_follows_the_given_regulariser_schedule_below_beta_one():
    """A schedule other than the default (20 → 2), ending with β < 1 (|y|^(β−1) by pow), from a
    start other than the weight, in closed form against autograd."""
    from aespa.core.grid import minmax_grid
    from aespa.core.rounding import RoundingProblem, learn_rounding, learn_rounding_autograd

    g = torch.Generator().manual_seed(9)
    w = torch.randn(6, 8, generator=g, dtype=F64)
    start = w + 0.3 * torch.randn(w.shape, generator=g, dtype=F64)  # a GPTQ-like start, off the weight
    p = RoundingProblem(w, minmax_grid(w, 2), spd(8, g), start=start, round_weight=0.3)
    closed, = learn_rounding([p], iterations=60, lr=0.02, warmup=0.3, beta=(8.0, 0.5))
    reference = learn_rounding_autograd(p, iterations=60, lr=0.02, warmup=0.3, beta=(8.0, 0.5))
    torch.testing.assert_close(closed.v, reference, rtol=1e-9, atol=1e-9)
    default, = learn_rounding([p], iterations=60, lr=0.02, warmup=0.3)
    assert not torch.allclose(default.v, closed.v)


def test_rounding_problems_share_a_product_only_when_they_share_the_objective(monkeypatch):
    """Consecutive problems with an equal 2-D input Hessian and the same kind of objective
    (and head size) are stacked into one product; per-head Hessians never are. Each problem
    still gets what autograd gives it alone (no resized buffers: warnings are errors)."""
    import warnings

    from aespa.core import rounding
    from aespa.core.grid import minmax_grid

    g = torch.Generator().manual_seed(8)
    h1, h2, h3 = spd(6, g), spd(6, g), torch.stack([spd(6, g), spd(6, g)])

    def problem(hessian, cov=None):
        w = torch.randn(4, 6, generator=g, dtype=F64)
        return rounding.RoundingProblem(w, minmax_grid(w, 2), hessian, cov)

    problems = [problem(h1), problem(h1.clone()), problem(h2), problem(h3), problem(h3),
                problem(h1, torch.stack([spd(2, g), spd(2, g)])), problem(h1, torch.stack([spd(2, g), spd(2, g)])),
                problem(h1, torch.stack([spd(1, g) for _ in range(4)]))]
    made = []

    class Spy(rounding._Product):
        def __init__(self, members, offset):
            made.append(len(members))
            super().__init__(members, offset)

    monkeypatch.setattr(rounding, "_Product", Spy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        results = rounding.learn_rounding(problems, iterations=30, lr=0.05)
    assert made == [2, 1, 1, 1, 2, 1]
    for p, r in zip(problems, results):
        torch.testing.assert_close(r.v, rounding.learn_rounding_autograd(p, iterations=30, lr=0.05), rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------- statistics: RoPE


@pytest.mark.parametrize("positions,chunk", [(150, 64), (7, 3), (5, 64)])
def test_rotate_back_is_the_mean_over_positions_of_the_rotated_covariance(positions, chunk):
    g = torch.Generator().manual_seed(5)
    d = 4
    angle = torch.rand(positions, d // 2, generator=g) * 6
    cos, sin = torch.cat([angle.cos()] * 2, -1)[None], torch.cat([angle.sin()] * 2, -1)[None]
    cov = torch.stack([spd(d, g).float() for _ in range(2)])
    rotations = rotation_matrices(cos, sin)
    expected = torch.stack([sum(rotations[s].T @ cov[h] @ rotations[s] for s in range(positions)) / positions
                            for h in range(2)])
    out = rotate_back(cov, cos, sin) if chunk == 64 else rotate_back(cov, cos, sin, chunk=chunk)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_rotary_tables_are_read_from_the_block_kwargs():
    tables = (torch.ones(1, 3, 4), torch.zeros(1, 3, 4))
    assert rotary_tables({"position_embeddings": tables}) is tables
    with pytest.raises(UserError) as e:
        rotary_tables({"attention_mask": None})
    assert str(e.value) == ("this rotary-embedding model passes no position_embeddings to its blocks; aespa needs "
                            "them to rotate query/key statistics back (supported: LLaMA-family blocks)")


# --------------------------------------------------------------------------- the Kronecker solver's options


def kron_problem(seed=11, heads=2, d_h=4, d_in=10, residual=False):
    from test_boa import problem

    return problem(seed, heads=heads, d_h=d_h, d_in=d_in, residual=residual)


def test_kronecker_default_is_boa_one_row_at_a_time():
    from aespa.core.grid import minmax_grid
    from aespa.core.kronecker import kronecker_sweep

    W, H, G, _ = kron_problem()
    grid = minmax_grid(W, 2)
    default = kronecker_sweep(W, H, G, grid)
    assert torch.equal(default.weight_q, kronecker_sweep(W, H, G, grid, rows=1).weight_q)
    assert not torch.equal(default.weight_q, kronecker_sweep(W, H, G, grid, rows=2).weight_q)


def test_kronecker_bad_shapes_and_orders_are_refused_with_their_reason():
    from aespa.core.grid import minmax_grid
    from aespa.core.kronecker import kronecker_sweep

    W, H, G, _ = kron_problem()
    grid = minmax_grid(W, 2)
    with pytest.raises(ValueError) as e:
        kronecker_sweep(W[:7], H, G, minmax_grid(W[:7], 2))
    assert str(e.value) == "2 heads of 4 rows do not make the 7 rows of the weight"
    with pytest.raises(ValueError) as e:
        kronecker_sweep(W, H, G, grid, rows=5)
    assert str(e.value) == "rows=5 is outside 1..4"
    message = "act_order_col needs one input Hessian for all heads and a per-channel grid"
    per_head = torch.stack([H, H + torch.eye(10, dtype=F64)])
    for bad in [dict(hessian=per_head, grid=grid), dict(hessian=H, grid=minmax_grid(W, 2, group_size=5))]:
        with pytest.raises(ValueError) as e:
            kronecker_sweep(W, bad["hessian"], G, bad["grid"], act_order_col=True)
        assert str(e.value) == message


def _per_head_calls(W, H, G, grid, D=None, **kw):
    """The solve of every head alone (its own 2-D input Hessian and residual)."""
    from aespa.core.grid import Grid
    from aespa.core.kronecker import kronecker_sweep

    d_h, out = G.shape[1], []
    for h in range(G.shape[0]):
        rows = slice(h * d_h, (h + 1) * d_h)
        g = grid if callable(grid) else Grid(grid.scale[rows], grid.zero[rows], grid.bits, grid.group_size)
        out.append(kronecker_sweep(W[rows], H[h], G[h:h + 1], g, residual=None if D is None else D[h], **kw))
    return torch.cat([r.weight_q for r in out]), torch.cat([r.grid.scale for r in out])


@pytest.mark.parametrize("residual,refine", [(False, 0), (True, 0), (False, 2), (True, 2)])
def test_kronecker_per_head_hessians_solve_each_head_with_its_own(residual, refine):
    from aespa.core.grid import minmax_grid
    from aespa.core.kronecker import kronecker_sweep

    W, H, G, D = kron_problem(residual=residual)
    g = torch.Generator().manual_seed(12)
    H2 = torch.stack([H, spd(10, g)])
    D2 = None if D is None else torch.stack([D, 0.3 * torch.randn(10, 10, generator=g, dtype=F64)])
    grid = minmax_grid(W, 2, group_size=5)
    result = kronecker_sweep(W, H2, G, grid, rows=2, residual=D2, refine_iters=refine)
    weight_q, scale = _per_head_calls(W, H2, G, grid, D2, rows=2, refine_iters=refine)
    torch.testing.assert_close(result.weight_q, weight_q, rtol=0, atol=1e-12)
    torch.testing.assert_close(result.grid.scale, scale, rtol=0, atol=1e-12)
    shared = kronecker_sweep(W, H, G, grid, rows=2, residual=D, refine_iters=refine)
    assert not torch.allclose(shared.weight_q, result.weight_q)


def test_kronecker_grid_rule_is_given_the_rows_and_their_input_hessian():
    from aespa.core.grid import minmax_grid
    from aespa.core.kronecker import kronecker_sweep

    W, H, G, _ = kron_problem()
    H2 = torch.stack([H, H + torch.eye(10, dtype=F64)])
    for hessian in (H, H2):
        seen = []

        def rule(rows, h):
            seen.append(h)
            return minmax_grid(rows, 2)

        kronecker_sweep(W, hessian, G, rule, rows=2)
        assert len(seen) == 2 and all(torch.equal(h, hessian) for h in seen)


def _permuted_solve(W, H, G, grid, D, col, row):
    """The plain solve on inputs permuted by hand (columns by decreasing H_jj, each head's rows
    by decreasing G_jj), mapped back."""
    from aespa.core.grid import Grid
    from aespa.core.kronecker import kronecker_sweep

    heads, d_h = G.shape[:2]
    cols = torch.argsort(H.diagonal(), descending=True, stable=True) if col else torch.arange(H.shape[0])
    rows = torch.cat([h * d_h + torch.argsort(G[h].diagonal(), descending=True, stable=True) if row
                      else h * d_h + torch.arange(d_h) for h in range(heads)])
    Gp = torch.stack([G[h][r][:, r] for h, r in enumerate(rows.view(heads, d_h) - torch.arange(heads)[:, None] * d_h)])
    res = kronecker_sweep(W[rows][:, cols], H[cols][:, cols], Gp, Grid(grid.scale[rows], grid.zero[rows], grid.bits),
                          rows=2, residual=None if D is None else D[cols][:, cols])
    q = torch.empty_like(res.weight_q)
    q[rows[:, None], cols[None, :]] = res.weight_q
    return q


@pytest.mark.parametrize("col,row,residual", [(True, False, False), (True, False, True), (False, True, False),
                                              (True, True, True)])
def test_kronecker_act_orders_are_the_solve_on_permuted_inputs(col, row, residual):
    from aespa.core.grid import minmax_grid
    from aespa.core.kronecker import kronecker_sweep

    W, H, G, D = kron_problem(seed=13, residual=residual)
    grid = minmax_grid(W, 2)
    result = kronecker_sweep(W, H, G, grid, rows=2, residual=D, act_order_col=col, act_order_row=row)
    torch.testing.assert_close(result.weight_q, _permuted_solve(W, H, G, grid, D, col, row), rtol=0, atol=1e-12)
    assert not torch.allclose(result.weight_q, kronecker_sweep(W, H, G, grid, rows=2, residual=D).weight_q)


def test_kronecker_act_orders_keep_tied_entries_in_their_order():
    """Equal diagonal entries keep their original order (a stable sort: the same order on every
    device; torch's unstable CPU sort reorders ties from 24 entries on)."""
    from aespa.core.grid import minmax_grid
    from aespa.core.kronecker import kronecker_sweep

    W, H, G, _ = kron_problem(seed=16, d_h=24, d_in=32)
    H, G = H.clone(), G.clone()
    tied = torch.arange(0, 32, 3)
    H[tied, tied] = H.diagonal()[tied].max()  # raising diagonal entries keeps H positive definite
    for h in range(G.shape[0]):
        G[h, tied[:8], tied[:8]] = G[h].diagonal()[tied[:8]].max()
    grid = minmax_grid(W, 2)
    result = kronecker_sweep(W, H, G, grid, rows=2, act_order_col=True, act_order_row=True)
    torch.testing.assert_close(result.weight_q, _permuted_solve(W, H, G, grid, None, True, True), rtol=0, atol=1e-12)


@pytest.mark.parametrize("residual", [False, True])
def test_kronecker_refinement_is_refine_scales_on_the_solved_codes(residual):
    from aespa.core.grid import minmax_grid
    from aespa.core.kronecker import kronecker_sweep
    from aespa.core.scale_refine import refine_scales

    W, H, G, D = kron_problem(seed=14, residual=residual)
    grid = minmax_grid(W, 2, group_size=5)
    plain = kronecker_sweep(W, H, G, grid, rows=2, residual=D)
    s, z = (t.repeat_interleave(5, dim=1) for t in (plain.grid.scale, plain.grid.zero))
    codes = torch.round(plain.weight_q / s) + z
    for iters in (1, 2):
        refined = kronecker_sweep(W, H, G, grid, rows=2, residual=D, refine_iters=iters)
        scale = refine_scales(W, codes, plain.grid.scale, plain.grid.zero, H, group_size=5, head_covariance=G,
                              residual=D, iters=iters)
        torch.testing.assert_close(refined.grid.scale, scale, rtol=0, atol=1e-12)
        torch.testing.assert_close(refined.weight_q, scale.repeat_interleave(5, dim=1) * (codes - z), rtol=0, atol=1e-12)
        assert not torch.allclose(refined.grid.scale, plain.grid.scale)


@pytest.mark.parametrize("singular", ["input", "row", "none"])
def test_kronecker_reports_raised_damping_of_either_factor(singular):
    from aespa.core.grid import minmax_grid
    from aespa.core.kronecker import kronecker_sweep

    W, H, G, _ = kron_problem(seed=15)
    if singular == "input":  # a dead input (zero row and column): the factorisation needs damping
        H = H.clone()
        H[3], H[:, 3], W = 0.0, 0.0, W.clone()
        W[:, 3] = 0.0
    if singular == "row":
        G = G.clone()
        G[1, 2], G[1, :, 2] = 0.0, 0.0
    # the damping raised is 1 % of the mean diagonal (here well below 1)
    assert kronecker_sweep(W, H, G, minmax_grid(W, 2)).damping_raised is (singular != "none")
