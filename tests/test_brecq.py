"""BRECQ (baselines/brecq.py) and the analytic cost model of experiments/bench_cost.py."""
import copy
import gc
import math

import pytest
import torch

from aespa.core.adapters import ModelAdapter
from aespa.core.errors import UserError
from aespa.core.grid import minmax_grid
from aespa.core.method import QuantSpec, get_method
from aespa.core.observe import run_block
from aespa.core.pipeline import capture_inputs, quantize_model
from aespa.core.rounding import hard_quantized_weight
from baselines.brecq import lp_search_grid
from experiments.bench_cost import loss_flops
from tests.conftest import random_model


def calibration(n=8, T=32, seed=0):
    return torch.randint(0, 512, (n, T), generator=torch.Generator().manual_seed(seed))


def quantized_copy(model, method, options, bits, ids):
    model = copy.deepcopy(model)
    adapter = ModelAdapter(model)
    quantize_model(adapter, get_method(method)(QuantSpec(bits=bits), options), ids, "cpu", progress=False)
    return adapter


# --------------------------------------------------------------------------- the grid


def reference_lp_search(row: torch.Tensor, bits: int, p: float = 2.4):
    """The reference's per-channel loop (UniformAffineQuantizer, scale_method='mse'), scalar by scalar."""
    best, delta, zero = 1e10, None, None
    x_max, x_min = row.max(), row.min()
    for i in range(80):
        new_max, new_min = x_max * (1.0 - i * 0.01), x_min * (1.0 - i * 0.01)
        d = (new_max - new_min) / (2**bits - 1)
        z = (-new_min / d).round()
        q = (torch.clamp(torch.round(row / d) + z, 0, 2**bits - 1) - z) * d
        score = (row - q).abs().pow(p).mean()
        if score < best:
            best, delta, zero = score, d, z
    return delta, zero


@pytest.mark.parametrize("bits", [2, 3])
def test_lp_search_grid_matches_the_reference_loop(bits):
    w = torch.randn(12, 40, generator=torch.Generator().manual_seed(bits)) * torch.linspace(0.1, 3, 12)[:, None]
    w[3] += 2.0  # an all-positive row: the range does not contain 0
    grid = lp_search_grid(w, bits)
    for c in range(w.shape[0]):
        delta, zero = reference_lp_search(w[c], bits)
        assert torch.allclose(grid.scale[c, 0], delta, rtol=1e-6) and grid.zero[c, 0] == zero
    # the chosen grid is never worse than min-max in the L2.4 error, and clips at 2 bits
    err = lambda g: (w - g.fake_quantize(w)).abs().pow(2.4).mean(dim=1)  # noqa: E731
    assert torch.all(err(grid) <= err(minmax_grid(w, bits)) + 1e-7)
    if bits == 2:
        assert (grid.scale[:, 0] < minmax_grid(w, bits).scale[:, 0] - 1e-6).any()


def test_lp_search_grid_constant_rows_stay_finite():
    w = torch.zeros(3, 8)
    w[1] = 0.5
    g = lp_search_grid(w, 2)
    assert torch.isfinite(g.scale).all() and torch.equal(g.fake_quantize(w)[0], w[0])
    assert torch.allclose(g.fake_quantize(w)[1], w[1])


# --------------------------------------------------------------------------- rounding


def test_rounding_forced_to_nearest_is_rtn():
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    grid = minmax_grid(w, 3)
    scale, _ = grid.expanded(w.shape[1])
    nearest = torch.where(torch.round(w / scale) > torch.floor(w / scale), 1.0, -1.0)
    assert torch.equal(hard_quantized_weight(w, grid, nearest), grid.fake_quantize(w))


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_brecq_without_iterations_on_the_minmax_grid_equals_rtn(arch):
    model, ids = random_model(arch, 2), calibration()
    rtn = quantized_copy(model, "rtn", {}, 2, ids)
    brecq = quantized_copy(model, "brecq", {"iters": 0, "scale_method": "max"}, 2, ids)
    for i in range(2):
        for role, lin in rtn.block(i).linears().items():
            assert torch.equal(lin.weight, brecq.block(i).linear(role).weight), (i, role)


@pytest.mark.parametrize("arch,bits", [("opt", 2), ("llama", 3)])
def test_brecq_lowers_block_output_error_below_rtn_and_its_start(arch, bits):
    model, ids = random_model(arch, 1), calibration()
    adapter = ModelAdapter(model)
    x, kwargs = capture_inputs(adapter, ids, "cpu")
    target = run_block(adapter.blocks[0], x, kwargs, "cpu", torch.float32)

    def block_error(method, options):
        q = quantized_copy(model, method, options, bits, ids)
        out = run_block(q.blocks[0], x, kwargs, "cpu", torch.float32)
        return (out - target).pow(2).sum(-1).mean().item()

    rtn = block_error("rtn", {})
    start = block_error("brecq", {"iters": 0})  # AdaRound's start: nearest rounding on BRECQ's grid
    learned = block_error("brecq", {"iters": 40})
    assert learned < start < rtn


def test_brecq_options_are_checked():
    brecq = get_method("brecq")
    for bad in ({"scale_method": "minmax"}, {"iters": -1}, {"windows_per_step": 0}, {"lr": 0}, {"warmup": 1.0},
                {"unknown": 1}):
        with pytest.raises(UserError):
            brecq(QuantSpec(bits=2), bad)


# --------------------------------------------------------------------------- memory


def live_tensor_bytes(exclude: set[int]) -> int:
    """Bytes of every tensor storage alive in the process, except ``exclude`` (data pointers)."""
    seen, total = set(exclude), 0
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and obj.device.type != "meta":
            ptr = obj.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                total += obj.untyped_storage().nbytes()
    return total


def brecq_memory(layers: int, batch: int, scan: bool = True) -> tuple[list[int], int]:
    """(bytes resident after each block besides the model's weights and the grids it produced,
    bytes autograd keeps for backward in one BRECQ iteration) on a random OPT model."""
    model, ids = random_model("opt", layers), calibration()
    adapter = ModelAdapter(model)
    kept = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), ids]}
    method = get_method("brecq")(QuantSpec(bits=2), {"iters": 2, "windows_per_step": batch})
    resident, saved = [], []
    quantize_block = method.quantize_block

    def measured(ctx):
        quantize_block(ctx)
        if not scan:
            return
        kept.update(t.untyped_storage().data_ptr() for g in ctx.grids.values() for t in (g.scale, g.zero))
        gc.collect()
        resident.append(live_tensor_bytes(kept))

    method.quantize_block = measured

    def pack(t):
        saved.append(t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        quantize_model(adapter, method, ids, "cpu", progress=False)
    return resident, sum(saved) // (2 * layers)


def test_brecq_memory_grows_with_batch_not_with_blocks():
    _, step2_b1 = brecq_memory(2, batch=1, scan=False)
    resident2, step2_b2 = brecq_memory(2, batch=2)
    resident4, step4_b2 = brecq_memory(4, batch=2)
    _, step4_b4 = brecq_memory(4, batch=4, scan=False)
    # what stays resident between blocks (the calibration streams) is the same after every
    # block and for a model of 2 or 4 blocks: nothing accumulates per block
    assert len(set(resident2 + resident4)) == 1, (resident2, resident4)
    # what one iteration keeps for backward does not depend on the number of blocks, and is
    # affine in the batch size (fixed part: the soft weights of one block)
    assert step4_b2 == step2_b2
    assert step4_b4 - step4_b2 == 2 * (step2_b2 - step2_b1) > 0


# --------------------------------------------------------------------------- the analytic cost


def test_loss_flops_reproduce_aespa_table7():
    """aespa Table 7 (GFLOPs per iteration, 4 sequences of 2048 tokens): OPT-125M ... 13B."""
    models = [(768, 12), (1024, 16), (2048, 32), (2560, 32), (4096, 32), (5120, 40)]
    block_wise = [6.7, 7.5, 11, 15, 34, 41]
    aespa = [0.24, 0.42, 1.6, 3.2, 13, 20]

    def two_digits(x):
        return round(x, 1 - int(math.floor(math.log10(abs(x)))))

    for (d, heads), bw, ae in zip(models, block_wise, aespa):
        f = loss_flops(d, d // heads, batch=4, seqlen=2048)
        assert two_digits(f["brecq"] / 1e9) == bw and two_digits(f["aespa"] / 1e9) == ae, d
