"""QLLM: channel disassembly is exact, assembly's distance is Eq. 5, the reassembled range is
bounded by θ, the adaptive search keeps its best trial, the low-rank merge, folding and
chunking are exact, a run stopped after a chunk resumes bit-identical, and QLLM beats RTN at W4A4 on the
outlier variant of tiny-llama."""
import os

import pytest
import torch
from omegaconf import OmegaConf
from torch.nn import functional as F

from aespa.core.adapters import ModelAdapter
from aespa.core.checkpoint import BlockCheckpoint
from aespa.core.errors import UserError
from aespa.core.evaluation import perplexity
from aespa.core.grid import minmax_grid, quantize_activation
from aespa.core.method import QuantSpec, get_method
from aespa.core.observe import run_block
from aespa.core.pipeline import BlockContext, capture_inputs, quantize_model
from baselines.qllm import QLLM, LowRank, merge_low_rank
from baselines.qllm.reassembly import (
    ReassembledLinear,
    pair_distance,
    reassemble,
    search_threshold,
    threshold_candidates,
)
from experiments.outliers import plant_outliers
from tests.conftest import REPO, compose, load, random_model


def activation_with_outliers(tokens=64, channels=32, seed=0):
    """Activations with a few channels tens of times larger than the rest, and weights."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, channels, generator=g)
    outliers = [c for c in (3, 10, 17) if c < channels]
    x[:, outliers] *= torch.tensor([40.0, 12.0, 25.0])[: len(outliers)]
    w = torch.randn(24, channels, generator=g) / channels**0.5
    return x, w


# --------------------------------------------------------------------------- disassembly and assembly


def test_disassembly_is_exact_and_bounds_the_range():
    x, w = activation_with_outliers()
    channel_max = x.abs().amax(dim=0)
    theta = 7.5
    ra = reassemble(channel_max, theta)  # disassembly only
    counts = torch.ceil(channel_max / theta).clamp(min=1)
    assert ra.extra == int(counts.sum()) - 32 > 0 and ra.merged == 0 and ra.width == 32 + ra.extra
    assert torch.allclose(F.linear(ra.activation(x), ra.weight(w)), F.linear(x, w), atol=1e-5)
    assert ra.activation(x).abs().max() <= theta + 1e-6
    # a channel split in T carries x/T in each of its T sub-channels, weight column repeated
    i = 3
    slots = ra.slot[ra.source == i]
    assert len(slots) == counts[i]
    for s in slots:
        assert torch.allclose(ra.activation(x)[:, s], x[:, i] / counts[i])
        assert torch.equal(ra.weight(w)[:, s], w[:, i])


@pytest.mark.parametrize("kind", ["paper", "reference"])
def test_reassembly_keeps_the_width_and_bounds_the_range(kind):
    x, w = activation_with_outliers()
    channel_max = x.abs().amax(dim=0)
    distance = pair_distance(x, w, kind)
    for trial in threshold_candidates(channel_max, 0.2, distance)[1:]:
        ra = reassemble(channel_max, trial.threshold, distance)
        assert ra.width == 32 and ra.merged == ra.extra == trial.extra > 0
        assert ra.activation(x).abs().max() <= trial.threshold + 1e-5
        assert ra.extra <= int(0.2 * 32)


def test_a_very_high_threshold_is_the_identity():
    x, w = activation_with_outliers()
    channel_max = x.abs().amax(dim=0)
    ra = reassemble(channel_max, 1e9, pair_distance(x, w))
    assert ra.is_identity and ra.width == 32
    assert torch.equal(ra.activation(x), x) and torch.equal(ra.weight(w), w)
    assert threshold_candidates(channel_max, 0.0)[0].extra == 0  # the search always tries "no change" first


def test_paper_distance_is_the_merge_error_of_eq5():
    x, w = activation_with_outliers(tokens=16, channels=6)
    d = pair_distance(x, w, "paper")
    assert d.shape == (3, 3)
    for a in range(3):
        for b in range(3):
            i, j = 2 * a, 2 * b + 1
            # Eq. 5 by definition: || x_i/2 (W_i - W_j)^T + x_j/2 (W_j - W_i)^T ||^2
            eq5 = (torch.outer(x[:, i], w[:, i] - w[:, j]) / 2 + torch.outer(x[:, j], w[:, j] - w[:, i]) / 2).pow(2).sum()
            # = the error merging the pair adds: x_i W_i + x_j W_j - (x_i + x_j)/2 (W_i + W_j)
            merge = torch.outer(x[:, i], w[:, i]) + torch.outer(x[:, j], w[:, j]) - torch.outer(
                (x[:, i] + x[:, j]) / 2, w[:, i] + w[:, j])
            assert torch.allclose(d[a, b], eq5, rtol=1e-4)
            assert torch.allclose(eq5, merge.pow(2).sum(), rtol=1e-4)
    ref = pair_distance(x, w, "reference")  # the official code's score
    i, j = 2, 5
    expected = ((x[:, i] - x[:, j]).norm() * (w[:, i].sum() + w[:, j].sum())) ** 2
    assert torch.allclose(ref[1, 2], expected, rtol=1e-4)


def test_assembly_merges_the_nearest_pairs_and_never_a_split_channel():
    x, w = activation_with_outliers()
    channel_max = x.abs().amax(dim=0)
    distance = pair_distance(x, w)
    theta = threshold_candidates(channel_max, 0.2, distance)[-1].threshold
    ra = reassemble(channel_max, theta, distance)
    split = torch.ceil(channel_max / theta) > 1
    merged_away = [c for c in range(32) if c not in ra.source[: ra.width].tolist()]
    assert len(merged_away) == ra.merged and not split[merged_away].any()
    # every merged A channel went to its nearest allowed B channel
    masked = distance.clone()
    masked[:, split[1::2]] = float("inf")
    for a in merged_away:
        partner_slot = ra.slot[ra.source == a]
        partner = ra.source[: ra.width][partner_slot].item()
        assert partner == 2 * masked[a // 2].argmin().item() + 1
    # a merged channel carries the mean of its group, its weight column is the group's sum
    for s in set(ra.slot[ra.width :].tolist()):
        group = ra.source[ra.slot == s]
        assert len(group) >= 2
        assert torch.allclose(ra.activation(x)[:, s], x[:, group].mean(dim=1), atol=1e-6)
        assert torch.allclose(ra.weight(w)[:, s], w[:, group].sum(dim=1), atol=1e-6)


# --------------------------------------------------------------------------- the adaptive threshold


def test_adaptive_search_keeps_the_trial_with_the_smallest_measured_error():
    x, w = activation_with_outliers()
    channel_max = x.abs().amax(dim=0)
    distance = pair_distance(x, w)
    reference = F.linear(x, w)

    def error(ra):
        wq = minmax_grid(ra.weight(w), 4).fake_quantize(ra.weight(w))
        return F.mse_loss(F.linear(quantize_activation(ra.activation(x), 4), wq), reference).item()

    chosen, trials = search_threshold(channel_max, 0.2, error, distance)
    assert len(trials) > 3 and all(t.error is not None for t in trials)
    best = min(trials, key=lambda t: t.error)
    assert chosen.threshold == best.threshold and error(chosen) == best.error
    assert best.extra > 0  # here reassembly really helps: no change is not the best
    assert len({t.extra for t in trials}) == len(trials)  # one trial per number of extra channels
    fixed, _ = search_threshold(channel_max, 0.2, error, distance, adaptive=False)
    assert fixed.threshold == trials[-1].threshold  # non-adaptive: the most disassembly allowed


# --------------------------------------------------------------------------- low-rank correction


def test_merged_low_rank_equals_the_unmerged_forward():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(12, 20, generator=g), torch.randn(5, 20, generator=g)
    low_rank = LowRank(12, 20, rank=4, alpha=1.0)
    assert torch.equal(low_rank.B, torch.zeros(12, 4)) and low_rank.scaling == 0.25
    with torch.no_grad():
        low_rank.B.normal_(generator=g)
    unmerged = F.linear(x, w) + low_rank.correction(x)
    assert torch.allclose(F.linear(x, merge_low_rank(w, low_rank)), unmerged, atol=1e-5)
    assert not torch.allclose(F.linear(x, w), unmerged, atol=1e-2)


def test_finalize_requantizes_the_merged_weight():
    block = ModelAdapter(random_model("llama", layers=1)).block(0)
    method = QLLM(QuantSpec(bits=4, act_bits=4), {})
    fp_weights = method.install(block, {})
    low_ranks = {}
    for role, linear in block.linears().items():
        low_ranks[role] = LowRank(linear.out_features, linear.in_features, 4, 1.0)
        with torch.no_grad():
            low_ranks[role].B.normal_()
    ctx = BlockContext([block], torch.zeros(1, 1, 1), {}, torch.device("cpu"), torch.float32)
    method.finalize(ctx, block, fp_weights, {}, low_ranks)
    for role, linear in block.linears().items():
        merged = fp_weights[role] + low_ranks[role].B @ low_ranks[role].A * 0.25
        assert torch.allclose(linear.weight, minmax_grid(merged, 4).fake_quantize(merged), atol=1e-6)
        assert torch.allclose(ctx.grids[f"0.{role}"].fake_quantize(merged), linear.weight, atol=1e-6)


# --------------------------------------------------------------------------- a block: exactness of the deployed form


def block_with_outliers(arch, layers=1, seqlen=32):
    adapter = ModelAdapter(random_model(arch, layers=layers))
    plant_outliers(adapter, channels=3, factor=32.0)
    ids = torch.randint(0, 512, (2, seqlen), generator=torch.Generator().manual_seed(1))
    x, kwargs = capture_inputs(adapter, ids, "cpu")
    return adapter, x, kwargs


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_disassembled_block_and_its_folded_form_compute_the_same_function(arch):
    adapter, x, kwargs = block_with_outliers(arch)
    block = adapter.block(0)
    fp = run_block(block.module, x, kwargs, "cpu", torch.float32)
    method = QLLM(QuantSpec(bits=16), {"assembly": False})
    ctx = BlockContext([block], x, kwargs, torch.device("cpu"), torch.float32)
    maxima, _, _ = method.observe(block, x, ctx)
    reassemblies = {g.feeder: reassemble(maxima[g.roles[0]], maxima[g.roles[0]].max().item() / 5)
                    for g, _, _ in method.points(block)}
    assert all(r.extra > 0 for r in reassemblies.values())
    norms_before = {r: block.norm(r).weight.clone() for r in block.family.norms}
    method.install_reassembly(block, reassemblies)
    assert all(isinstance(block.linear(r), ReassembledLinear) for r in ("q", "k", "v", "up", "down"))
    disassembled = run_block(block.module, x, kwargs, "cpu", torch.float32)
    assert (disassembled - fp).abs().max().item() < 1e-5
    weights = {role: lin.weight.detach().clone() for role, lin in block.linears().items()}
    method.fold_coefficients(block, weights, reassemblies)
    with torch.no_grad():
        for role, lin in block.linears().items():
            lin.weight.copy_(weights[role])
    folded = run_block(block.module, x, kwargs, "cpu", torch.float32)
    assert (folded - fp).abs().max().item() < 1e-5
    assert all(block.linear(r).coef is None for r in ("q", "k", "v", "up", "down"))  # parameter-free index maps
    assert all(not torch.equal(block.norm(r).weight, norms_before[r]) for r in block.family.norms)


def test_threshold_search_runs_the_consuming_function():
    """The probe measures the consumer's error: with reassembly it is below no reassembly at
    W4A4 on a block with outliers (for q/k/v and gate/up, where the outliers are)."""
    adapter, x, kwargs = block_with_outliers("llama")
    block = adapter.block(0)
    method = QLLM(QuantSpec(bits=4, act_bits=4), {})
    ctx = BlockContext([block], x, kwargs, torch.device("cpu"), torch.float32)
    maxima, search_inputs, _ = method.observe(block, x, ctx)
    chosen = method.reassemble_block(block, maxima, search_inputs, kwargs, ctx)
    assert chosen["attn_norm"].extra > 0 and chosen["mlp_norm"].extra > 0
    assert len(ctx.notes) == 3 and "block 0: qllm attn_norm->q,k,v" in ctx.notes[0]


# --------------------------------------------------------------------------- chunks in the block pipeline


def quantize_random(arch, options, layers=3, checkpoint=None, method=None):
    adapter = ModelAdapter(random_model(arch, layers=layers))
    plant_outliers(adapter, channels=3, factor=32.0)
    g = torch.Generator().manual_seed(1)
    calibration, windows = torch.randint(0, 512, (4, 32), generator=g), torch.randint(0, 512, (2, 32), generator=g)
    torch.manual_seed(0)
    method = method or QLLM(QuantSpec(bits=4, act_bits=4), options)
    result = quantize_model(adapter, method, calibration, "cpu", batch_size=4, checkpoint=checkpoint, progress=False)
    return adapter, method, result, perplexity(adapter, windows, "cpu", progress=False)


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_chunks_of_blocks_cover_every_block(arch):
    """3 blocks in chunks of 2: EEC trains blocks 0-1 together and block 2 alone; without
    training, chunking changes nothing (the pipeline's streams stay right)."""
    adapter, method, result, _ = quantize_random(arch, {"blocks_per_chunk": 2, "epochs": 1})
    assert [h["blocks"] for h in method.history] == [[0, 1], [2]]
    assert len(result.grids) == 3 * len(adapter.block(0).linears())
    for i in range(3):
        for role, linear in adapter.block(i).linears().items():
            grid = result.grids[f"{i}.{role}"]
            assert torch.allclose(grid.fake_quantize(linear.weight.float()), linear.weight.float(), atol=1e-5)
    _, _, _, chunked = quantize_random(arch, {"blocks_per_chunk": 2, "epochs": 0})
    _, _, _, single = quantize_random(arch, {"blocks_per_chunk": 1, "epochs": 0})
    assert chunked == single


def test_a_run_stopped_after_a_chunk_resumes_bit_identical(tmp_path):
    options = {"blocks_per_chunk": 3, "epochs": 1}
    ref_adapter, _, ref_result, ref_ppl = quantize_random("llama", options, layers=4)

    class Stop(Exception):
        pass

    stopping = QLLM(QuantSpec(bits=4, act_bits=4), options)
    quantize_block = stopping.quantize_block

    def stop_at_3(ctx):
        assert [b.index for b in ctx.blocks] in ([0, 1, 2], [3])  # the pipeline hands over whole chunks
        if ctx.index == 3:
            raise Stop
        quantize_block(ctx)

    stopping.quantize_block = stop_at_3
    checkpoint = BlockCheckpoint(str(tmp_path), "qllm")
    with pytest.raises(Stop):
        quantize_random("llama", options, layers=4, checkpoint=checkpoint, method=stopping)
    assert checkpoint.progress()["next_block"] == 3  # the chunk 0-2 is checkpointed as a whole
    adapter, _, result, ppl = quantize_random("llama", options, layers=4, checkpoint=checkpoint)
    assert ppl == ref_ppl
    ref, now = ref_adapter.model.state_dict(), adapter.model.state_dict()
    assert ref.keys() == now.keys() and all(torch.equal(ref[k], now[k]) for k in ref)


def test_bad_options_fail_with_one_line():
    with pytest.raises(UserError, match="distance='cosine'"):
        QLLM(QuantSpec(bits=4, act_bits=4), {"distance": "cosine"})
    with pytest.raises(UserError, match="channel_ratio=1.5"):
        QLLM(QuantSpec(bits=4, act_bits=4), {"channel_ratio": 1.5})
    with pytest.raises(UserError, match="group_size=-1 or assembly=true"):
        QLLM(QuantSpec(bits=4, act_bits=4, group_size=32), {"assembly": False})
    with pytest.raises(UserError, match="blocks_per_chunk=0"):
        QLLM(QuantSpec(bits=4, act_bits=4), {"blocks_per_chunk": 0})


def test_paper_defaults():
    cfg = dict(OmegaConf.to_container(compose("method=qllm").method))  # the config a run gets
    assert get_method(cfg.pop("name")) is QLLM
    m = QLLM(QuantSpec(bits=4, act_bits=4), cfg)
    assert (m.rank, m.alpha, m.lr, m.epochs, m.blocks_per_chunk, m.channel_ratio, m.distance) == (
        4, 1.0, 5e-4, 10, 4, 0.2, "paper")
    assert m.reassembly and m.assembly and m.adaptive and m.eec and QLLM.needs_fp_stream and QLLM.supports_act_quant


# --------------------------------------------------------------------------- the embedded model


def quantized_ppl(method, spec, options=None, nsamples=8, seqlen=128, windows=24):
    from experiments.data import calibration_windows, evaluation_windows

    model, tokenizer = load("tiny-llama")
    adapter = ModelAdapter(model)
    plant_outliers(adapter, **OmegaConf.load(os.path.join(REPO, "conf", "model", "tiny-llama-outlier.yaml")).outliers)
    torch.manual_seed(0)
    calibration = calibration_windows("wikivital", tokenizer, nsamples, seqlen, seed=0)
    quantize_model(adapter, get_method(method)(spec, options or {}), calibration, "cpu", progress=False)
    return perplexity(adapter, evaluation_windows("wikivital", tokenizer, seqlen)[:windows], "cpu", progress=False)


def test_w4a4_on_tiny_llama_outlier_qllm_beats_rtn():
    spec = QuantSpec(bits=4, act_bits=4)
    rtn = quantized_ppl("rtn", spec)
    qllm = quantized_ppl("qllm", spec, {"epochs": 2})
    assert qllm < rtn
