"""OmniQuant: exact LET folding (both families), LWC at init, training behaviour, the
paper's defaults, and the rankings on the embedded models (few epochs and samples)."""
import copy
import math
import os

import pytest
import torch
from omegaconf import OmegaConf
from torch.func import functional_call

from aespa.core.adapters import ModelAdapter
from aespa.core.errors import UserError
from aespa.core.evaluation import perplexity
from aespa.core.grid import Grid, grid_from_range
from aespa.core.method import QuantSpec, get_method
from aespa.core.observe import block_output, run_block
from aespa.core.pipeline import BlockContext, capture_inputs, quantize_model
from aespa.core.transforms import (
    BlockTransform,
    ChannelTransform,
    fold,
    norm_fed_groups,
    query_key_channels,
    query_key_scale,
    transformed_parameters,
)
from baselines.omniquant import LWC_INIT, LearnableClipping, OmniQuant
from experiments.outliers import plant_outliers
from tests.conftest import REPO, compose, load, random_model


def random_norms(adapter, seed=0):
    """Give the norms non-trivial gains (and biases), and the linears unit-gain weights, so
    the block's output is O(1) and the transforms have something to move."""
    g = torch.Generator().manual_seed(seed)
    for i in range(len(adapter.blocks)):
        block = adapter.block(i)
        for linear in block.linears().values():
            linear.weight.data = torch.randn(linear.weight.shape, generator=g) / linear.in_features**0.5
            if linear.bias is not None:
                linear.bias.data = 0.1 * torch.randn(linear.bias.shape, generator=g)
        for group in norm_fed_groups(block):
            norm = block.norm(group.feeder)
            norm.weight.data = 1 + 0.5 * torch.randn(norm.weight.shape, generator=g)
            if getattr(norm, "bias", None) is not None:
                norm.bias.data = 0.5 * torch.randn(norm.bias.shape, generator=g)


def block_context(arch, nsamples=2, seqlen=32, layers=1):
    adapter = ModelAdapter(random_model(arch, layers=layers))
    random_norms(adapter)
    ids = torch.randint(0, 512, (nsamples, seqlen), generator=torch.Generator().manual_seed(1))
    x, kwargs = capture_inputs(adapter, ids, "cpu")
    block = adapter.block(0)
    with torch.no_grad():
        fp = run_block(block.module, x, kwargs, "cpu", torch.float32)
    return BlockContext([block], x, kwargs, torch.device("cpu"), torch.float32, 8, x.clone(), fp), fp


# --------------------------------------------------------------------------- LET is exact


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_learned_let_folds_exactly(arch):
    """Scales/shifts after a few training steps: the block's FP output with them folded
    equals the original, and the training-time transform (functional_call) is the same."""
    ctx, fp = block_context(arch)
    original = copy.deepcopy(ctx.block.module)
    method = OmniQuant(QuantSpec(bits=4, act_bits=4), {"epochs": 2, "let": True})
    from aespa.core.transforms import ChannelStatistics

    stats = ChannelStatistics()
    ctx.observe(ctx.fp_inputs, on_input=stats.hooks(["o", "q", "up"]))
    let = method.init_let(ctx.block, stats, method.uses_shift(ctx.block))
    assert ("attn_norm.shift" in let) == (arch == "opt")  # shift only for OPT weight-activation
    init = {k: v.detach().clone() for k, v in let.items()}
    linears = ctx.block.linears()
    clipping = {r: LearnableClipping(lin.out_features, lin.in_features, 4) for r, lin in linears.items()}
    method.train_block(ctx, let, clipping, None)
    assert all(not torch.equal(let[k], init[k]) for k in let)  # every scale and shift was trained
    transform = method.transform(ctx.block, let)
    with torch.no_grad():
        training_view = block_output(functional_call(ctx.block.module, transformed_parameters(ctx.block, transform),
                                                     (ctx.inputs,), ctx.call_kwargs()))
    fold(ctx.block, transform)
    folded = ctx.run(ctx.inputs)
    assert (folded - fp).abs().max().item() < 1e-4
    assert (training_view - folded).abs().max().item() < 1e-5
    now, before = dict(ctx.block.module.named_parameters()), dict(original.named_parameters())
    for role in ("q", "k", "v", "o", "up"):  # the transform really moved every pair's weights
        name = f"{ctx.block.family.linears[role]}.weight"
        assert not torch.allclose(now[name], before[name])


def test_untied_rotary_query_key_scale_is_not_exact():
    """Why the Q–K scale is tied over rotary pairs: an untied one breaks the function."""
    ctx, fp = block_context("llama")
    g = ctx.block.geometry
    n = g.num_kv_heads * g.head_dim
    untied = torch.linspace(0.3, 3.0, n)
    fold(ctx.block, BlockTransform(query_key=untied))
    assert (ctx.run(ctx.inputs) - fp).abs().max().item() > 1e-3
    ctx2, fp2 = block_context("llama")
    fold(ctx2.block, BlockTransform(query_key=query_key_scale(torch.linspace(0.3, 3.0, query_key_channels(g)), g)))
    assert (ctx2.run(ctx2.inputs) - fp2).abs().max().item() < 1e-4


def test_gqa_value_output_transform_is_exact():
    ctx, fp = block_context("llama")
    g = ctx.block.geometry
    assert g.kv_group == 2
    kv = g.num_kv_heads * g.head_dim
    hidden = g.hidden_size
    transform = BlockTransform(norms={"attn_norm": ChannelTransform(torch.linspace(0.2, 4, hidden)),
                                      "mlp_norm": ChannelTransform(torch.linspace(4, 0.2, hidden))},
                               value=ChannelTransform(torch.linspace(0.5, 2, kv)))
    fold(ctx.block, transform)
    assert (ctx.run(ctx.inputs) - fp).abs().max().item() < 1e-4


# --------------------------------------------------------------------------- LWC


@pytest.mark.parametrize("group_size", [-1, 16])
def test_lwc_at_init_is_minmax_rtn_on_the_clipped_range(group_size):
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    lwc = LearnableClipping(8, 64, bits=3, group_size=group_size)
    rows = w if group_size == -1 else w.reshape(-1, group_size)
    clip = 1 / (1 + math.exp(-LWC_INIT))
    scale, zero = grid_from_range(clip * rows.amin(dim=1), clip * rows.amax(dim=1), 3, sym=False)
    expected = Grid(scale.reshape(8, -1), zero.reshape(8, -1), 3, group_size).fake_quantize(w)
    assert torch.equal(lwc.fake_quantize(w), expected)
    grid = lwc.grid(w)
    assert torch.equal(grid.fake_quantize(w), expected)  # the folded weight is the trained one
    # the 4.0-logit clipping is real: plain min-max differs
    plain_scale, plain_zero = grid_from_range(rows.amin(dim=1), rows.amax(dim=1), 3, sym=False)
    assert not torch.equal(Grid(plain_scale.reshape(8, -1), plain_zero.reshape(8, -1), 3, group_size).fake_quantize(w),
                           expected)
    # straight-through rounding: the logits get a gradient
    lwc.fake_quantize(w).pow(2).sum().backward()
    assert lwc.upper.grad.abs().sum() > 0 and lwc.lower.grad.abs().sum() > 0


# --------------------------------------------------------------------------- defaults and bad input


def test_paper_defaults():
    opt, llama = (ModelAdapter(random_model(a, layers=1)).block(0) for a in ("opt", "llama"))
    cfg = dict(OmegaConf.to_container(compose("method=omniquant").method))  # the config a run gets
    cfg.pop("name")
    assert cfg["lwc_lr"] == 1e-2 and cfg["let_lr"] == 5e-3
    assert OmniQuant(QuantSpec(bits=2), cfg).epochs == 40
    assert OmniQuant(QuantSpec(bits=3), cfg).epochs == 20
    weight_only, w4a4 = OmniQuant(QuantSpec(bits=3), cfg), OmniQuant(QuantSpec(bits=4, act_bits=4), cfg)
    assert weight_only.uses_let(opt) and not weight_only.uses_let(llama)  # OPT LWC+LET, LLaMA LWC only
    assert w4a4.uses_let(opt) and w4a4.uses_let(llama)
    assert not weight_only.uses_shift(opt) and w4a4.uses_shift(opt) and not w4a4.uses_shift(llama)
    assert w4a4.alpha == 0.75 and weight_only.alpha == 0.5 and OmniQuant(QuantSpec(bits=6, act_bits=6), cfg).alpha == 0.5
    with pytest.raises(UserError, match="shift=true needs norms with a bias"):
        OmniQuant(QuantSpec(bits=4, act_bits=4), {"shift": True}).uses_shift(llama)
    with pytest.raises(UserError, match="let='maybe'"):
        OmniQuant(QuantSpec(bits=4), {"let": "maybe"})
    with pytest.raises(UserError, match="epochs=-1"):
        OmniQuant(QuantSpec(bits=4), {"epochs": -1})


def test_non_finite_loss_stops_the_block_with_a_note():
    ctx, _ = block_context("opt")
    ctx.fp_outputs = ctx.fp_outputs.clone()
    ctx.fp_outputs[1, 0, 0] = float("inf")  # sample 1 has an infinite target
    OmniQuant(QuantSpec(bits=3), {"epochs": 3}).quantize_block(ctx)
    assert len(ctx.notes) == 1 and "non-finite loss" in ctx.notes[0] and "epoch 0, sample 1" in ctx.notes[0]
    assert all(torch.isfinite(p).all() for p in ctx.block.module.parameters())
    assert torch.isfinite(ctx.run(ctx.inputs)).all()


# --------------------------------------------------------------------------- rankings on the embedded models


def quantized_ppl(name, method, spec, options=None, outliers=False, nsamples=8, seqlen=128, windows=24):
    from experiments.data import calibration_windows, evaluation_windows

    model, tokenizer = load(name)
    adapter = ModelAdapter(model)
    if outliers:
        plant_outliers(adapter, **OmegaConf.load(os.path.join(REPO, "conf", "model", f"{name}-outlier.yaml")).outliers)
    torch.manual_seed(0)
    calibration = calibration_windows("wikivital", tokenizer, nsamples, seqlen, seed=0)
    quantize_model(adapter, get_method(method)(spec, options or {}), calibration, "cpu", progress=False)
    return perplexity(adapter, evaluation_windows("wikivital", tokenizer, seqlen)[:windows], "cpu", progress=False)


def test_weight_only_w2_omniquant_beats_rtn_on_tiny_opt():
    rtn = quantized_ppl("tiny-opt", "rtn", QuantSpec(bits=2))
    omni = quantized_ppl("tiny-opt", "omniquant", QuantSpec(bits=2), {"epochs": 4})
    assert omni < rtn


def test_w4a4_on_tiny_llama_outlier_omniquant_beats_smoothquant_beats_rtn():
    spec = QuantSpec(bits=4, act_bits=4)
    rtn = quantized_ppl("tiny-llama", "rtn", spec, outliers=True)
    smooth = quantized_ppl("tiny-llama", "smoothquant", spec, {"alpha": 0.5}, outliers=True)
    omni = quantized_ppl("tiny-llama", "omniquant", spec, {"epochs": 6}, outliers=True)
    assert omni < smooth < rtn
