"""GPTQ: the column sweep against a slow, obviously-correct sweep written here, its
objective against RTN's, the Cholesky fallback, Hessian collection, bad input, and the
quality on the embedded models."""
import copy
import os

import pytest
import torch
from conftest import ASSETS, random_model

from aespa.core.adapters import ModelAdapter
from aespa.core.errors import UserError
from aespa.core.evaluation import perplexity
from aespa.core.grid import minmax_grid, round_to_nearest
from aespa.core.hessian import HessianAccumulator, collect_hessians, inverse_cholesky_upper, prepare_hessian
from aespa.core.method import QuantSpec, get_method
from aespa.core.pipeline import BlockContext, capture_inputs, quantize_model
from aespa.core.sweep import gptq_sweep


def correlated_problem(seed: int, rows: int = 24, cols: int = 64, tokens: int = 512, dead=()):
    """A random weight and the Hessian 2/N XᵀX of strongly correlated inputs (fp64)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols, dtype=torch.float64) + torch.randn(cols, cols, generator=g, dtype=torch.float64) / 2
    x = torch.randn(tokens, cols, generator=g, dtype=torch.float64) @ mix
    x = x * torch.rand(cols, generator=g, dtype=torch.float64).add(0.2)  # unequal diagonal, for act_order
    x[:, list(dead)] = 0
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    return w, 2 / tokens * x.T @ x


def objective(w, w_hat, h):
    dw = w_hat - w
    return torch.trace(dw @ h @ dw.T).item()


def reference_sweep(w, h, bits, sym=False, group_size=-1, percdamp=0.01, act_order=False, static_groups=False,
                    blocksize=None):
    """Column by column, no blocking, no Cholesky: the OBS update with the explicit inverse
    Hessian of the columns not yet quantized (GPTQ paper Eq. 3-4).

    Dynamic group grids are computed on the weights as they stood at the last multiple of
    ``blocksize`` steps (the reference's lazy-batch state); ``blocksize=None``: current weights.
    """
    w, h = w.double().clone(), h.double().clone()
    n = w.shape[1]
    maxq = 2**bits - 1
    channel_grid = minmax_grid(w, bits, sym) if group_size == -1 else None
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    static_grid = minmax_grid(w, bits, sym, group_size) if static_groups and group_size != -1 else None
    order = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else torch.arange(n)
    h += percdamp * h.diagonal().mean() * torch.eye(n, dtype=h.dtype)
    hinv = torch.linalg.inv(h)
    q = torch.zeros_like(w)
    snapshot = w.clone()
    for t, c in enumerate(order.tolist()):
        if blocksize is not None and t % blocksize == 0:
            snapshot = w.clone()
        if channel_grid is not None:
            scale, zero = channel_grid.scale[:, 0], channel_grid.zero[:, 0]
        elif static_grid is not None:
            scale, zero = static_grid.scale[:, c // group_size], static_grid.zero[:, c // group_size]
        elif t % group_size == 0:
            members = order[t:t + group_size]
            g = minmax_grid((snapshot if blocksize is not None else w)[:, members], bits, sym)
            scale, zero = g.scale[:, 0], g.zero[:, 0]
        q[:, c] = scale * (torch.clamp(torch.round(w[:, c] / scale) + zero, 0, maxq) - zero)
        rest = order[t + 1:]
        w[:, rest] -= ((w[:, c] - q[:, c]) / hinv[c, c])[:, None] * hinv[c, rest][None, :]
        hinv = hinv - hinv[:, c:c + 1] @ hinv[c:c + 1, :] / hinv[c, c]
    return q


# --------------------------------------------------------------------------- the sweep


@pytest.mark.parametrize("group_size,sym", [(-1, False), (16, False), (-1, True), (8, True)])
def test_identity_hessian_gives_rtn_exactly(group_size, sym):
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    result = gptq_sweep(w, torch.eye(64), bits=3, sym=sym, group_size=group_size, blocksize=16)
    assert torch.equal(result.weight_q, round_to_nearest(w, 3, sym, group_size))
    assert torch.equal(result.grid.fake_quantize(w), result.weight_q)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("bits,group_size", [(3, -1), (2, 16), (4, -1)])
def test_gptq_objective_below_rtn(seed, bits, group_size):
    w, h = correlated_problem(seed, rows=48, cols=128)
    w, h = w.float(), h.float()
    gptq = gptq_sweep(w, h, bits=bits, group_size=group_size).weight_q
    rtn = round_to_nearest(w, bits, group_size=group_size)
    assert objective(w, gptq, h) < 0.9 * objective(w, rtn, h)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size,static_groups", [(-1, False), (16, False), (32, False), (16, True), (8, True)])
def test_blocked_sweep_equals_slow_reference(act_order, group_size, static_groups):
    w, h = correlated_problem(2, dead=(5,))
    kw = dict(bits=3, group_size=group_size, act_order=act_order, static_groups=static_groups)
    result = gptq_sweep(w, h, blocksize=16, **kw)
    expected = reference_sweep(w, h, **kw)
    assert result.damping == pytest.approx(0.01)
    torch.testing.assert_close(result.weight_q, expected, rtol=0, atol=1e-12)
    assert (result.weight_q[:, 5] == 0).all()  # the dead input column
    torch.testing.assert_close(result.grid.fake_quantize(result.weight_q), result.weight_q, rtol=0, atol=1e-12)


@pytest.mark.parametrize("act_order", [False, True])
def test_groups_smaller_than_block_read_the_block_start_weights(act_order):
    """The reference computes a group's grid from the lazily updated matrix: for groups
    smaller than the block, the weights as they stood at the block start."""
    w, h = correlated_problem(3)
    kw = dict(bits=3, group_size=8, act_order=act_order)
    result = gptq_sweep(w, h, blocksize=32, **kw)
    torch.testing.assert_close(result.weight_q, reference_sweep(w, h, blocksize=32, **kw), rtol=0, atol=1e-12)
    assert not torch.equal(result.weight_q, reference_sweep(w, h, **kw))  # the distinction is real here


def test_given_grid_with_column_scale_is_used_as_is():
    w, h = correlated_problem(4)
    grid = minmax_grid(w, 3, group_size=16)
    grid.col_scale = torch.linspace(0.8, 1.3, 64, dtype=torch.float64)
    for act_order in (False, True):
        result = gptq_sweep(w, h, grid, act_order=act_order, blocksize=16)
        assert result.grid is grid
        torch.testing.assert_close(grid.fake_quantize(result.weight_q), result.weight_q, rtol=0, atol=1e-12)
        # each column rounded to nearest on that grid from its error-updated value
        torch.testing.assert_close(grid.fake_quantize(result.weight_updated), result.weight_q, rtol=0, atol=1e-12)
    plain = gptq_sweep(w, torch.eye(64, dtype=torch.float64), grid)
    assert torch.equal(plain.weight_q, grid.fake_quantize(w))


def test_per_head_hessians_sweep_row_blocks_separately():
    w, h0 = correlated_problem(5)
    _, h1 = correlated_problem(6)
    result = gptq_sweep(w, torch.stack([h0, h1]), bits=3, act_order=True)
    top = gptq_sweep(w[:12], h0, bits=3, act_order=True)
    bottom = gptq_sweep(w[12:], h1, bits=3, act_order=True)
    assert torch.equal(result.weight_q, torch.cat([top.weight_q, bottom.weight_q]))
    assert torch.equal(result.grid.scale, torch.cat([top.grid.scale, bottom.grid.scale]))


# --------------------------------------------------------------------------- Hessian and Cholesky


def test_accumulator_is_the_mean_over_sequences():
    x = torch.randn(6, 10, 8, dtype=torch.float64)
    acc = HessianAccumulator()
    acc.add(x[:3])
    acc.add(x[3])  # a 2-D batch counts as one sequence
    acc.add(x[4:])
    flat = x.reshape(-1, 8)
    torch.testing.assert_close(acc.hessian, 2 / 6 * flat.T @ flat)
    assert acc.nsamples == 6


def test_prepare_hessian_dead_columns_and_damping():
    h = torch.tensor([[4.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    damped, dead = prepare_hessian(h, 0.1, dead_value=3.0)
    assert dead.tolist() == [False, False, True]
    assert damped.diagonal().tolist() == pytest.approx([4.3, 2.3, 3.3])  # mean diag (4+2+3)/3 = 3
    assert h[2, 2] == 0  # input untouched
    batched, dead = prepare_hessian(torch.stack([h, 2 * h]), 0.1)
    damp = 0.1 * (8 + 4 + 1) / 3  # per matrix: the second one's own mean diagonal
    assert batched[1].diagonal().tolist() == pytest.approx([8 + damp, 4 + damp, 1 + damp])
    damp = 0.1 * (4 + 2 + 1) / 3
    assert batched[0].diagonal().tolist() == pytest.approx([4 + damp, 2 + damp, 1 + damp])


def test_cholesky_retries_with_more_damping_on_a_singular_hessian():
    v = torch.ones(6, 1, dtype=torch.float64)
    h = v @ v.T  # rank one: no Cholesky factor without damping
    upper, damp = inverse_cholesky_upper(h)
    assert damp == pytest.approx(0.01)
    torch.testing.assert_close(upper.T @ upper, torch.linalg.inv(h + damp * torch.eye(6, dtype=torch.float64)))


def test_sweep_survives_a_singular_hessian():
    w = torch.randn(16, 32)
    x = torch.randn(4, 32)
    h = 1e4 * x.T @ x - 1e-2 * torch.eye(32)  # rank 4 and slightly indefinite: fails at a tiny damping
    result = gptq_sweep(w, h, bits=3, percdamp=1e-9)
    assert result.damping > 1e-9
    assert torch.isfinite(result.weight_q).all()
    nan = gptq_sweep(w, torch.full((32, 32), float("nan")), bits=3)
    assert nan.damping == float("inf")
    assert torch.equal(nan.weight_q, round_to_nearest(w, 3))


def test_collect_hessians_hooks_the_block_inputs():
    model = random_model("opt", layers=1)
    adapter = ModelAdapter(model)
    ids = torch.randint(0, 512, (5, 16), generator=torch.Generator().manual_seed(0))
    inputs, kwargs = capture_inputs(adapter, ids, "cpu", batch_size=2)
    ctx = BlockContext([adapter.block(0)], inputs, kwargs, torch.device("cpu"), torch.float32, batch_size=2)
    hessians = collect_hessians(ctx, ["q", "k", "v", "o"])
    x = adapter.block(0).norm("attn_norm")(inputs).reshape(-1, 64)
    torch.testing.assert_close(hessians["q"], 2 / 5 * x.T @ x, rtol=1e-4, atol=1e-4)
    assert torch.equal(hessians["q"], hessians["v"]) and hessians["q"] is not hessians["v"]
    assert hessians["o"].shape == (64, 64) and not torch.allclose(hessians["o"], hessians["q"])
    assert all(not lin._forward_hooks for lin in adapter.block(0).linears().values())


# --------------------------------------------------------------------------- the method


@pytest.mark.parametrize("options,message", [({"percdamp": 0}, "percdamp=0"), ({"percdamp": -0.1}, "percdamp"),
                                             ({"blocksize": 0}, "blocksize=0"), ({"blocksize": 1.5}, "blocksize"),
                                             ({"act_order": "yes"}, "act_order"), ({"damp": 0.1}, "unknown")])
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(UserError, match=message) as e:
        get_method("gptq")(QuantSpec(bits=3), options)
    assert "\n" not in str(e.value)


def test_group_size_must_divide_every_width():
    model = random_model("llama", layers=1)  # hidden 64, MLP 128
    adapter = ModelAdapter(model)
    method = get_method("gptq")(QuantSpec(bits=3, group_size=48), {})
    with pytest.raises(UserError, match="group_size=48 does not divide"):
        quantize_model(adapter, method, torch.randint(0, 512, (2, 8)), "cpu", progress=False)


@pytest.mark.parametrize("arch", ["opt", "llama"])
@pytest.mark.parametrize("true_sequential", [True, False])
def test_method_quantizes_every_linear_on_its_grid(arch, true_sequential):
    model = random_model(arch, layers=2)
    adapter = ModelAdapter(model)
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    method = get_method("gptq")(QuantSpec(bits=3, group_size=16), {"true_sequential": true_sequential})
    result = quantize_model(adapter, method, ids, "cpu", progress=False)
    assert set(result.phases) == {"hessian", "sweep"}
    for i in range(2):
        for role, lin in adapter.block(i).linears().items():
            grid = result.grids[f"{i}.{role}"]
            assert grid.group_size == 16
            torch.testing.assert_close(grid.fake_quantize(lin.weight.data), lin.weight.data, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- the embedded models


def _quantized_ppl(model, name, bits, calibration, windows, **options):
    model = copy.deepcopy(model)
    adapter = ModelAdapter(model)
    method = get_method(name)(QuantSpec(bits=bits), options)
    quantize_model(adapter, method, calibration, "cpu", progress=False)
    return perplexity(adapter, windows, "cpu", progress=False)


@pytest.fixture
def one_thread():
    """The sweep is thousands of small ops: on a shared CPU, intra-op threads only add waiting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-llama"])
def test_gptq_quality_on_embedded_models(name, request, one_thread):
    if not os.path.exists(os.path.join(ASSETS, name, "config.json")):
        pytest.skip(f"assets/{name} is not trained yet (run experiments/train_tiny.py)")
    from experiments.data import calibration_windows, evaluation_windows

    model, tokenizer = request.getfixturevalue(name.replace("-", "_"))
    calibration = calibration_windows("wikivital", tokenizer, 32, 512, seed=0)
    windows = evaluation_windows("wikivital", tokenizer, 512)[:16]
    full = perplexity(ModelAdapter(model), windows, "cpu", progress=False)
    w4 = _quantized_ppl(model, "gptq", 4, calibration, windows)
    w3 = _quantized_ppl(model, "gptq", 3, calibration, windows)
    w3_rtn = _quantized_ppl(model, "rtn", 3, calibration, windows)
    assert w4 < 1.10 * full
    assert w3 < w3_rtn
