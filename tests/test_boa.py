"""BoA, TurboBoA, GPTAQ's residual term and the two-stage group-scale optimisation: each
closed form against a brute-force definition written here on small random problems (fp64,
explicit inverses, no Cholesky factors), then the methods on small random models, bad input,
and the experiment/table configuration."""
import copy
import os

import pytest
import torch
from conftest import ASSETS, random_model

from aespa.core.adapters import ModelAdapter
from aespa.core.clip_search import search_grid
from aespa.core.errors import UserError
from aespa.core.grid import Grid, minmax_grid
from aespa.core.hessian import prepare_hessian
from aespa.core.kronecker import fake_quantize, kronecker_sweep
from aespa.core.method import QuantSpec, get_method
from aespa.core.pipeline import BlockContext, capture_inputs, quantize_model
from aespa.core.residual import collect_residual_statistics
from aespa.core.scale_refine import layer_objective, refine_scales
from aespa.core.sweep import gptq_sweep

F64 = torch.float64


def spd(n: int, g: torch.Generator, tokens: int = 256, scale: float = 1.0) -> torch.Tensor:
    """2/T XᵀX of correlated inputs, with a small ridge (positive definite)."""
    mix = torch.eye(n, dtype=F64) + torch.randn(n, n, generator=g, dtype=F64) / 2
    x = torch.randn(tokens, n, generator=g, dtype=F64) @ mix * torch.rand(n, generator=g, dtype=F64).add(0.3)
    return scale * 2 / tokens * x.T @ x + 1e-3 * torch.eye(n, dtype=F64)


def problem(seed: int, heads: int = 2, d_h: int = 6, d_in: int = 16, residual: bool = False):
    """Weight [heads·d_h, d_in], input Hessian H, row covariances G [heads, d_h, d_h], and D."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(heads * d_h, d_in, generator=g, dtype=F64)
    H = spd(d_in, g)
    G = torch.stack([spd(d_h, g) for _ in range(heads)])
    D = 0.3 * torch.randn(d_in, d_in, generator=g, dtype=F64) if residual else None
    return W, H, G, D


def _group(grid: Grid, col: int) -> int:
    return 0 if grid.scale.shape[1] == 1 else col // grid.group_size


def sequential_minimiser(w0: torch.Tensor, K: torch.Tensor, round_at) -> torch.Tensor:
    """Greedy quantization of the vector ``w0`` under ``(x − w0)ᵀ K (x − w0)``: coordinate t is
    rounded from its value in the minimiser over the free coordinates t.., the earlier ones
    fixed at their rounded values (recomputed from scratch at every step)."""
    n = w0.shape[0]
    q, current = torch.zeros_like(w0), w0.clone()
    for t in range(n):
        q[t] = round_at(t, current[t])
        fixed, free = slice(0, t + 1), slice(t + 1, n)
        if t + 1 < n:
            current[free] = w0[free] - torch.linalg.solve(K[free, free], K[free, fixed] @ (q[fixed] - w0[fixed]))
    return q


def gptaq_row(w0: torch.Tensor, H: torch.Tensor, D: torch.Tensor | None, round_at) -> torch.Tensor:
    """GPTAQ's definition per column: once column t is rounded, the later columns are moved by
    the least-squares fit of column t's output error ``(q_t − w_t) x_t − w_t Δx_t`` onto their
    inputs, i.e. ``δ = [(w_t − q_t) H[t, >t] + w_t D[t, >t]] H[>t, >t]⁻¹`` (explicit solves)."""
    n = w0.shape[0]
    w, q = w0.clone(), torch.zeros_like(w0)
    for t in range(n):
        q[t] = round_at(t, w[t])
        rest = slice(t + 1, n)
        if t + 1 < n:
            rhs = (w[t] - q[t]) * H[t, rest] + (0 if D is None else w[t] * D[t, rest])
            w[rest] += torch.linalg.solve(H[rest, rest], rhs)
    return q


# --------------------------------------------------------------------------- the Kronecker solver


@pytest.mark.parametrize("seed", range(3))
def test_boa_equals_greedy_quantization_under_the_kronecker_hessian(seed):
    """n_quant_rows=1: every row compensated along its columns and the later rows is the greedy
    sequential quantization of vec(W_h) under G_h ⊗ H in row-major order."""
    W, H, G, _ = problem(seed)
    grid = minmax_grid(W, 3)
    result = kronecker_sweep(W, H, G, grid, rows=1, blocksize=5)
    d_h, d_in = G.shape[1], H.shape[0]
    for h in range(G.shape[0]):
        rows = slice(h * d_h, (h + 1) * d_h)
        flat = lambda t, value: fake_quantize(value, grid.scale[h * d_h + t // d_in, 0], grid.zero[h * d_h + t // d_in, 0],
                                              grid.maxq)
        expected = sequential_minimiser(W[rows].reshape(-1), torch.kron(G[h], H), flat).reshape(d_h, d_in)
        torch.testing.assert_close(result.weight_q[rows], expected, rtol=0, atol=1e-10)
    assert not result.damping_raised


def joint_rows_reference(W, H, G, n_rows, grid_of_rows, D=None):
    """TurboBoA's definition with explicit inverses, one head: blocks of ``n_rows`` rows; each row
    of a block swept alone under H (GPTAQ's column rule with D); then every later row moved to
    the minimiser of tr(G ΔW H ΔWᵀ) over the later rows with the rows so far fixed (D = 0:
    ``W_R = W0_R − G_RR⁻¹ G_RF (Q_F − W0_F)``), or by Prop. 3.2's rule with D."""
    d_h = W.shape[0]
    current, Q = W.clone(), torch.zeros_like(W)
    H_inv = torch.linalg.inv(H)
    for r1 in range(0, d_h, n_rows):
        r2 = min(r1 + n_rows, d_h)
        block = current[r1:r2].clone()
        grid = grid_of_rows(r1, block)
        for i, r in enumerate(range(r1, r2)):
            Q[r] = gptaq_row(block[i], H, D, lambda col, v, i=i: fake_quantize(
                v, grid.scale[i, _group(grid, col)], grid.zero[i, _group(grid, col)], grid.maxq))
        if r2 < d_h:
            R, B, F = slice(r2, d_h), slice(r1, r2), slice(0, r2)
            if D is None:
                current[R] = W[R] - torch.linalg.solve(G[R, R], G[R, F] @ (Q[F] - W[F]))
            else:
                current[R] += torch.linalg.solve(G[R, R], G[R, B] @ ((block - Q[B]) + block @ D @ H_inv))
    return Q


@pytest.mark.parametrize("n_rows,group_size,adaptive", [(2, -1, False), (4, 8, False), (3, -1, True), (4, 8, True)])
def test_joint_rows_closed_form_equals_the_minimiser_over_the_remaining_rows(n_rows, group_size, adaptive):
    W, H, G, _ = problem(7)
    d_h = G.shape[1]
    fixed = minmax_grid(W, 2, group_size=group_size)
    if adaptive:
        rule = lambda rows, h: search_grid(rows, 2, group_size=group_size, mode="hessian", hessian=h)
    result = kronecker_sweep(W, H, G, rule if adaptive else fixed, rows=n_rows, blocksize=4)
    for h in range(G.shape[0]):
        head = slice(h * d_h, (h + 1) * d_h)
        grid_of_rows = (lambda r1, block: rule(block, H)) if adaptive else \
            (lambda r1, block, h=h: Grid(fixed.scale[h * d_h + r1:], fixed.zero[h * d_h + r1:], 2, group_size))
        expected = joint_rows_reference(W[head], H, G[h], n_rows, grid_of_rows)
        torch.testing.assert_close(result.weight_q[head], expected, rtol=0, atol=1e-10)
        if adaptive:  # the grids come from the compensated rows, not the original ones
            assert not torch.equal(result.grid.scale[head], search_grid(W[head], 2, group_size=group_size,
                                                                        mode="hessian", hessian=H).scale)


@pytest.mark.parametrize("n_rows", [1, 2, 6])
def test_residual_term_follows_gptaq_and_prop_3_2(n_rows):
    W, H, G, D = problem(3, residual=True)
    grid = minmax_grid(W, 3)
    result = kronecker_sweep(W, H, G, grid, rows=n_rows, residual=D, blocksize=3)
    d_h = G.shape[1]
    for h in range(G.shape[0]):
        head = slice(h * d_h, (h + 1) * d_h)
        expected = joint_rows_reference(W[head], H, G[h], n_rows,
                                        lambda r1, block, h=h: Grid(grid.scale[h * d_h + r1:], grid.zero[h * d_h + r1:], 3),
                                        D=D)
        torch.testing.assert_close(result.weight_q[head], expected, rtol=0, atol=1e-10)
    assert not torch.equal(result.weight_q, kronecker_sweep(W, H, G, grid, rows=n_rows).weight_q)


def test_prop_3_2_row_update_is_the_minimiser_up_to_the_rows_own_shift():
    """For the first block, Prop. 3.2's update of the later rows plus their own residual shift
    ``W_R D H⁻¹`` (applied later by their column sweeps) minimises the objective with D."""
    W, H, G, D = problem(4, heads=1, residual=True)
    G, n = G[0], 2
    Q_B = minmax_grid(W[:n], 3).fake_quantize(W[:n])
    B, R = slice(0, n), slice(n, None)
    H_inv = torch.linalg.inv(H)
    update = torch.linalg.solve(G[R, R], G[R, B] @ ((W[B] - Q_B) + W[B] @ D @ H_inv))
    # brute force: ∂L/∂W_R = 0 for L = tr(G ΔW H ΔWᵀ) − 2 tr(G W D ΔWᵀ) with rows B fixed at Q_B
    shifted = W + W @ D @ H_inv  # L = ‖Q − shifted‖²_{G⊗H} + const
    best = shifted[R] - torch.linalg.solve(G[R, R], G[R, B] @ (Q_B - shifted[B]))
    torch.testing.assert_close(W[R] + update + W[R] @ D @ H_inv, best, rtol=0, atol=1e-10)


@pytest.mark.parametrize("seed", range(3))
def test_boa_objective_below_row_independent_gptq(seed):
    """On the Kronecker objective, BoA's row compensation beats GPTQ on each row alone
    (rows = d_h: no row compensation)."""
    W, H, G, _ = problem(seed + 10, heads=3, d_h=8, d_in=24)
    grid = minmax_grid(W, 2)
    boa = kronecker_sweep(W, H, G, grid, rows=1).weight_q
    plain = kronecker_sweep(W, H, G, grid, rows=8).weight_q
    assert layer_objective(W, boa, H, G) < 0.95 * layer_objective(W, plain, H, G)


def test_act_orders_permute_and_restore():
    W, H, G, _ = problem(5)
    grid = minmax_grid(W, 3)
    for col, row in [(True, False), (False, True), (True, True)]:
        result = kronecker_sweep(W, H, G, grid, rows=2, act_order_col=col, act_order_row=row)
        torch.testing.assert_close(grid.fake_quantize(result.weight_q), result.weight_q, rtol=0, atol=1e-12)
        assert torch.equal(result.grid.scale, grid.scale)  # grids follow their rows back


# --------------------------------------------------------------------------- GPTAQ in the GPTQ sweep


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_sweep_residual_is_gptaqs_column_rule(act_order):
    W, H, _, D = problem(8, heads=1, d_h=10, d_in=20, residual=True)
    grid = minmax_grid(W, 3)
    result = gptq_sweep(W, H, grid, residual=D, act_order=act_order, blocksize=6)
    Hd, _ = prepare_hessian(H, 0.01)
    order = torch.argsort(Hd.diagonal(), descending=True, stable=True) if act_order else torch.arange(20)
    Hp, Dp = Hd[order][:, order], D[order][:, order]
    for r in range(W.shape[0]):
        q = gptaq_row(W[r, order], Hp, Dp, lambda t, v: fake_quantize(v, grid.scale[r, 0], grid.zero[r, 0], grid.maxq))
        torch.testing.assert_close(result.weight_q[r, order], q, rtol=0, atol=1e-10)
    zero = gptq_sweep(W, H, grid, residual=torch.zeros_like(D), act_order=act_order, blocksize=6)
    assert torch.equal(zero.weight_q, gptq_sweep(W, H, grid, act_order=act_order, blocksize=6).weight_q)


# --------------------------------------------------------------------------- scale refinement


def brute_force_coordinate_descent(W, codes, scale, zero, H, group_size, G=None, D=None, iters=1):
    """Each scale in turn set to the exact minimiser of the layer objective along it, found from
    three evaluations of the (quadratic) objective, in the order of ``refine_scales``."""
    S = scale.clone()
    n_groups = S.shape[1]
    size = W.shape[1] // n_groups
    heads = 1 if G is None else G.shape[0]
    rows = W.shape[0] // heads

    def loss(S):
        Q = S.repeat_interleave(size, dim=1) * (codes - zero.repeat_interleave(size, dim=1))
        return layer_objective(W, Q, H, G, D).item()

    def minimise(r, g):
        step = 1e-2 * S[r, g].item()
        values = []
        for delta in (-step, 0.0, step):
            T = S.clone()
            T[r, g] += delta
            values.append(loss(T))
        curvature = values[0] - 2 * values[1] + values[2]
        S[r, g] -= step * (values[2] - values[0]) / (2 * curvature)

    for _ in range(iters):
        if G is None:
            for g in range(n_groups):
                for r in range(W.shape[0]):
                    minimise(r, g)
        else:
            for r in range(rows):
                for g in range(n_groups):
                    for h in range(heads):
                        minimise(h * rows + r, g)
    return S


@pytest.mark.parametrize("kronecker,group_size,residual", [(False, -1, False), (False, 4, True), (True, -1, False),
                                                           (True, 8, True)])
def test_coordinate_descent_steps_are_exact_one_dimensional_minima(kronecker, group_size, residual):
    W, H, G, D = problem(9, heads=2, d_h=4, d_in=16, residual=residual)
    if not kronecker:
        G = None
    grid = minmax_grid(W, 2, group_size=group_size)
    codes = grid.quantize(W + 0.05 * torch.randn(W.shape, generator=torch.Generator().manual_seed(1), dtype=F64))
    start, zero = grid.scale.double(), grid.zero.double()
    scale = refine_scales(W, codes, start, zero, H, group_size=group_size, head_covariance=G, residual=D)
    expected = brute_force_coordinate_descent(W, codes, start, zero, H, group_size, G, D)
    torch.testing.assert_close(scale, expected, rtol=1e-8, atol=1e-10)
    assert (scale > 0).all()


@pytest.mark.parametrize("kronecker", [False, True])
def test_refinement_never_increases_the_objective(kronecker):
    W, H, G, D = problem(11, heads=2, d_h=6, d_in=24, residual=True)
    G = G if kronecker else None
    grid = search_grid(W, 2, group_size=8, mode="hessian", hessian=H)
    codes = grid.quantize(W)
    size = 8

    def objective(S):
        return layer_objective(W, Grid(S, grid.zero, 2, size).dequantize(codes), H, G, D).item()

    losses, S = [objective(grid.scale)], grid.scale
    for _ in range(4):
        S = refine_scales(W, codes, S, grid.zero, H, group_size=size, head_covariance=G, residual=D)
        losses.append(objective(S))
    assert all(b <= a + 1e-9 * abs(a) for a, b in zip(losses, losses[1:]))
    assert losses[-1] < 0.999 * losses[0]


def test_refinement_keeps_scales_without_a_positive_minimiser():
    W, H, _, _ = problem(12, heads=1, d_h=3, d_in=8)
    grid = minmax_grid(W, 2)
    codes = grid.quantize(W)
    codes[0] = grid.zero[0]  # a row whose codes all sit on the zero point: nothing to refine
    scale = refine_scales(W, codes, grid.scale, grid.zero, H)
    assert scale[0] == grid.scale[0] and (scale > 0).all()


# --------------------------------------------------------------------------- clip search


@pytest.mark.parametrize("mode,group_size,sym", [("hessian", -1, False), ("hessian", 4, False), ("mse", 8, False),
                                                 ("hessian", 8, True)])
def test_clip_search_is_the_best_candidate_per_group(mode, group_size, sym):
    W, H, _, _ = problem(13, heads=1, d_h=5, d_in=16)
    grid = search_grid(W, 2, sym, group_size, mode=mode, hessian=H)
    size = 16 if group_size == -1 else group_size
    for r in range(W.shape[0]):
        for g in range(16 // size):
            cols = slice(g * size, (g + 1) * size)
            w = W[r, cols]
            lo, hi = min(w.min().item(), 0.0), max(w.max().item(), 0.0)
            if sym:
                hi = max(-lo, hi)
                lo = -hi if lo < 0 else lo
            best, choice = float("inf"), None
            for i in range(100):
                p = 1 - i / 100
                s = (p * hi - p * lo) / 3
                for z in ((2.0,) if sym else (float(torch.floor(torch.tensor(-p * lo / s))),
                                              float(torch.ceil(torch.tensor(-p * lo / s))))):
                    e = fake_quantize(w, torch.tensor(s, dtype=F64), torch.tensor(z, dtype=F64), 3) - w
                    score = (e @ H[cols, cols] @ e).item() if mode == "hessian" else e.abs().pow(2.4).sum().item()
                    if score < best:
                        best, choice = score, (s, z)
            assert grid.scale[r, g].item() == pytest.approx(choice[0], rel=1e-12) and grid.zero[r, g] == choice[1]


def test_clip_search_minmax_mode_is_the_minmax_grid():
    W, _, _, _ = problem(14, heads=1, d_h=5, d_in=16)
    for group_size in (-1, 4):
        a, b = search_grid(W.float(), 3, group_size=group_size, mode="minmax"), minmax_grid(W, 3, group_size=group_size)
        assert torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero)


# --------------------------------------------------------------------------- residual statistics


def _context(model, windows=3, tokens=16, fp_shift=0.0):
    adapter = ModelAdapter(model)
    ids = torch.randint(0, 512, (windows, tokens), generator=torch.Generator().manual_seed(0))
    inputs, kwargs = capture_inputs(adapter, ids, "cpu", batch_size=2)
    fp = inputs + fp_shift * torch.randn(inputs.shape, generator=torch.Generator().manual_seed(1))
    return adapter, BlockContext([adapter.block(0)], inputs, kwargs, torch.device("cpu"), torch.float32, batch_size=2,
                                 fp_inputs=fp)


def test_residual_statistics_are_the_cross_moment_of_the_input_drift():
    adapter, ctx = _context(random_model("opt", layers=1), fp_shift=0.1)
    stats = collect_residual_statistics(ctx, ["q", "k", "v", "o"], value=True)
    norm = adapter.block(0).norm("attn_norm")
    with torch.no_grad():
        x_q, x_fp = norm(ctx.inputs).reshape(-1, 64), norm(ctx.fp_inputs).reshape(-1, 64)
    expected = 2 * (x_fp - x_q).T @ x_q / x_q.shape[0]
    torch.testing.assert_close(stats.inputs["q"], expected, rtol=1e-4, atol=1e-6)
    assert torch.equal(stats.inputs["q"], stats.inputs["v"]) and stats.inputs["o"].abs().sum() > 0
    assert stats.value.shape == (4, 64, 64) and stats.value.abs().sum() > 0


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_identical_streams_give_a_zero_residual(arch):
    _, ctx = _context(random_model(arch, layers=1))
    stats = collect_residual_statistics(ctx, ["q", "k", "v", "o", "up", "down"], value=True)
    assert all((d == 0).all() for d in stats.inputs.values()) and (stats.value == 0).all()
    assert stats.value.shape[0] == (4 if arch == "opt" else 2)  # one per key/value head


def _quantize(model, name, bits=3, group_size=-1, windows=4, **options):
    adapter = ModelAdapter(model)
    ids = torch.randint(0, 512, (windows, 32), generator=torch.Generator().manual_seed(0))
    method = get_method(name)(QuantSpec(bits=bits, group_size=group_size), options)
    return adapter, quantize_model(adapter, method, ids, "cpu", progress=False)


def _weights(adapter):
    return {f"{i}.{r}": lin.weight.data.clone() for i in range(len(adapter.blocks))
            for r, lin in adapter.block(i).linears().items()}


@pytest.mark.parametrize("name,options", [("turboboa", {}), ("gptq", {"alpha": 0.25, "true_sequential": False})])
def test_residual_term_changes_nothing_when_the_streams_agree(name, options):
    """One block: its full-precision and quantized inputs are the same, so D = 0 exactly."""
    model = random_model("llama", layers=1)
    on, _ = _quantize(copy.deepcopy(model), name, **options)
    off, _ = _quantize(copy.deepcopy(model), name, **{**options, ("consider_dx" if name == "turboboa" else "alpha"):
                                                      False if name == "turboboa" else 0.0})
    a, b = _weights(on), _weights(off)
    assert all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- the methods


def test_turboboa_with_one_row_and_no_features_is_boa():
    model = random_model("llama", layers=2)
    boa, _ = _quantize(copy.deepcopy(model), "boa")
    turbo, _ = _quantize(copy.deepcopy(model), "turboboa", n_quant_rows=1, consider_dx=False, adaptive_qparam=False,
                         refine_qparam=False)
    a, b = _weights(boa), _weights(turbo)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("arch,name,group_size,options", [
    ("opt", "boa", -1, {"act_order_row": True}), ("llama", "boa", 16, {"block_v": False}),
    ("opt", "turboboa", 16, {}), ("llama", "turboboa", -1, {"act_order_col": True, "qparam": "mse"}),
    ("llama", "gptq", 16, {"alpha": 0.25, "qparam": "hessian", "refine_qparam": True}),
])
def test_methods_quantize_every_linear_on_its_grid(arch, name, group_size, options):
    adapter, result = _quantize(random_model(arch, layers=2), name, group_size=group_size, **options)
    expected = {"boa": {"statistics", "sweep"}, "turboboa": {"statistics", "residual", "sweep"},
                "gptq": {"hessian", "residual", "sweep"}}[name]
    assert set(result.phases) == expected
    for i in range(2):
        for role, lin in adapter.block(i).linears().items():
            grid = result.grids[f"{i}.{role}"]
            assert grid.group_size == group_size and (grid.scale > 0).all()
            torch.testing.assert_close(grid.fake_quantize(lin.weight.data), lin.weight.data, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name,options,message", [
    ("boa", {"n_quant_rows": 0}, "n_quant_rows=0"), ("turboboa", {"alpha": 1.5}, "alpha=1.5"),
    ("turboboa", {"n_iters": -1}, "n_iters=-1"), ("boa", {"qparam": "grid"}, "qparam='grid'"),
    ("gptq", {"alpha": -0.1}, "alpha=-0.1"), ("gptq", {"qparam": "Hessian"}, "qparam='Hessian'"),
])
def test_bad_options_are_one_line_errors(name, options, message):
    with pytest.raises(UserError, match=message) as e:
        get_method(name)(QuantSpec(bits=3), options)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name,options", [("turboboa", {}), ("gptq", {"refine_qparam": True}),
                                          ("boa", {"refine_qparam": True})])
def test_refining_without_integer_weights_is_refused(name, options):
    with pytest.raises(UserError, match="needs integer weights to refine") as e:
        get_method(name)(QuantSpec(bits=16), options)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="dynamic groups"):
        get_method("gptq")(QuantSpec(bits=3, group_size=16), {"refine_qparam": True, "act_order": True})


def test_more_joint_rows_than_the_head_dimension_is_refused_before_quantizing():
    model = random_model("llama", layers=1)  # head_dim 16
    method = get_method("turboboa")(QuantSpec(bits=3), {"n_quant_rows": 17})
    with pytest.raises(UserError, match=r"n_quant_rows=17 is above the head dimension of this model; use 1..16"):
        quantize_model(ModelAdapter(model), method, torch.randint(0, 512, (2, 8)), "cpu", progress=False)


def test_fp_stream_is_asked_for_only_with_the_residual_term():
    spec = QuantSpec(bits=3)
    assert get_method("turboboa")(spec).needs_fp_stream and not get_method("boa")(spec).needs_fp_stream
    assert get_method("gptq")(spec, {"alpha": 0.25}).needs_fp_stream and not get_method("gptq")(spec).needs_fp_stream


def test_two_stage_refinement_lowers_gptqs_layer_objective():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(32, 64, generator=g, dtype=F64)
    H = spd(64, g)
    gptq = get_method("gptq")
    for bits in (2, 3):
        spec = QuantSpec(bits=bits, group_size=16)
        plain = gptq(spec, {}).quantize_linear(W, H, None).weight_q
        refined = gptq(spec, {"refine_qparam": True}).quantize_linear(W, H, None).weight_q
        both = gptq(spec, {"refine_qparam": True, "qparam": "hessian"}).quantize_linear(W, H, None).weight_q
        Hd, _ = prepare_hessian(H, 0.01)
        loss = lambda q: layer_objective(W, q, Hd).item()
        assert loss(refined) < loss(plain) and loss(both) < loss(plain)


def test_observing_attention_leaves_no_hook_behind():
    _, ctx = _context(random_model("llama", layers=1), fp_shift=0.1)
    collect_residual_statistics(ctx, ["q", "k", "v"], value=True)
    assert getattr(ctx.block.attention, "_ptq_hook", None) is None
    assert all(not lin._forward_pre_hooks for lin in ctx.block.linears().values())


# --------------------------------------------------------------------------- configuration


def test_turboboa_experiment_expands_to_its_table(monkeypatch):
    """The check every paper table passes (tests/test_sweeps.py), for the TurboBoA table."""
    import tests.test_sweeps as sweeps

    monkeypatch.setitem(sweeps.PROTOCOLS, "turboboa", ("wikitext2", 0, ["wikitext2", "c4-new"]))
    sweeps.test_table_experiment_expands_to_exactly_the_cells_of_its_table("turboboa")


def test_every_option_has_its_default_in_the_config():
    from tests.conftest import compose

    cfg = compose("method=turboboa")
    assert (cfg.method.n_quant_rows, cfg.method.alpha, cfg.method.qparam, cfg.method.dead_value) == (16, 0.25,
                                                                                                     "hessian", None)
    assert compose("method=boa").method.n_quant_rows == 1 and compose("method=gptq").method.alpha == 0.0


# --------------------------------------------------------------------------- the embedded model


@pytest.mark.slow
def test_turboboa_beats_gptq_at_two_bits_on_tiny_opt(request):
    if not os.path.exists(os.path.join(ASSETS, "tiny-opt", "config.json")):
        pytest.skip("assets/tiny-opt is not trained yet (run experiments/train_tiny.py)")
    from aespa.core.evaluation import perplexity
    from experiments.data import calibration_windows, evaluation_windows

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tokenizer = request.getfixturevalue("tiny_opt")
        calibration = calibration_windows("wikivital", tokenizer, 16, 512, seed=0)  # 16 windows: CI time
        windows = evaluation_windows("wikivital", tokenizer, 512)[:16]
        ppl = {}
        for name in ("gptq", "turboboa"):
            adapter = ModelAdapter(copy.deepcopy(model))
            quantize_model(adapter, get_method(name)(QuantSpec(bits=2)), calibration, "cpu", progress=False)
            ppl[name] = perplexity(adapter, windows, "cpu", progress=False)
    finally:
        torch.set_num_threads(threads)
    assert ppl["turboboa"] < 0.95 * ppl["gptq"], ppl
