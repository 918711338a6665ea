"""Each QLLM switch changes exactly the quantity it names, read inside one block of a small random
model with planted outlier channels: the width and index map of every reassembly point
(``reassembly``, ``assembly``), the θ chosen among the candidates (``adaptive``), the cap on the
extra channels (``channel_ratio``), the merged pairs (``distance``), the windows the search measures
on (``search_samples``), the low-rank pairs and what training changes (``eec``, ``rank``,
``lora_alpha``, ``train_norms``) and the span of blocks trained together (``blocks_per_chunk``).
Training runs for at most one epoch on two windows; the whole file takes a few seconds."""
import pytest
import torch
from conftest import random_model

import baselines.qllm as qllm
from aespa.core.adapters import ModelAdapter
from aespa.core.grid import minmax_grid
from aespa.core.method import QuantSpec
from aespa.core.observe import run_block
from aespa.core.pipeline import BlockContext, capture_inputs, quantize_model
from baselines.qllm import QLLM, run_until
from baselines.qllm.reassembly import (
    ReassembledLinear,
    disassembly_counts,
    match_channels,
    pair_distance,
    reassemble,
    threshold_candidates,
)
from experiments.outliers import plant_outliers

W4A4 = QuantSpec(bits=4, act_bits=4)
CPU, F32 = torch.device("cpu"), torch.float32


def block_and_inputs(arch="llama", layers=1):
    adapter = ModelAdapter(random_model(arch, layers=layers))
    plant_outliers(adapter, channels=3, factor=32.0)
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1))
    x, kwargs = capture_inputs(adapter, ids, "cpu")
    return adapter, x, kwargs


def quantize(options, arch="llama", spec=W4A4):
    """Quantize block 0 with QLLM; returns what the block saw and became: ``searches`` (per
    reassembly point: the arguments of search_threshold, its candidates and choice), ``low_ranks``
    (what train_chunk returned; None when it did not run), ``original`` / ``weights`` / ``norms``,
    the ``linears`` and the block's ``output`` on its inputs."""
    adapter, x, kwargs = block_and_inputs(arch)
    block = adapter.block(0)
    ctx = BlockContext([block], x, kwargs, CPU, F32, fp_inputs=x)
    method = QLLM(spec, options)
    points = [g for g, _, _ in method.points(block)]
    seen = {"searches": {}, "low_ranks": None, "method": method, "block": block, "x": x, "kwargs": kwargs,
            "original": {r: lin.weight.detach().clone() for r, lin in block.linears().items()},
            "original_norms": {r: block.norm(r).weight.detach().clone() for r in block.family.norms}}
    real_search, real_train = qllm.search_threshold, method.train_chunk

    def search(channel_max, ratio, error, distance, adaptive):
        chosen, trials = real_search(channel_max, ratio, error, distance, adaptive)
        group = points[len(seen["searches"])]
        x_in = run_until(block, x[: method.search_samples], kwargs, group.roles[0])  # the block is still unchanged
        seen["searches"][group.feeder] = {"input": x_in.reshape(-1, x_in.shape[-1]), "group": group, "maxima": channel_max, "ratio": ratio, "distance": distance,
                                          "adaptive": adaptive, "trials": trials, "chosen": chosen}
        return chosen, trials

    def train(*args, **kw):
        seen["low_ranks"] = real_train(*args, **kw)
        return seen["low_ranks"]

    qllm.search_threshold = search
    method.train_chunk = train
    try:
        torch.manual_seed(0)
        method.quantize_block(ctx)
    finally:
        qllm.search_threshold = real_search
    seen["weights"] = {r: lin.weight.detach().clone() for r, lin in block.linears().items()}
    seen["linears"] = dict(block.linears())
    seen["norms"] = {r: block.norm(r).weight.detach().clone() for r in block.family.norms}
    seen["output"] = run_block(block.module, x, kwargs, "cpu", F32)
    return seen


def rtn(w):
    return minmax_grid(w, 4).fake_quantize(w)


def merged_pairs(ra):
    """The (merged-away A channel, B channel it joined) pairs of a reassembly."""
    kept = ra.source[: ra.width]
    return sorted((int(a), int(kept[s])) for a, s in zip(ra.source[ra.width :], ra.slot[ra.width :]))


# --------------------------------------------------------------------------- reassembly


def test_reassembly_off_adds_no_channel_anywhere_and_leaves_plain_rtn():
    on = quantize({"eec": False})
    off = quantize({"reassembly": False, "eec": False})
    assert off["searches"] == {} and set(on["searches"]) == {"attn_norm", "mlp_norm", "up"}
    # off: every linear keeps its own input width, no index map; norms untouched; weights = RTN of the originals
    for role, linear in off["linears"].items():
        assert not isinstance(linear, ReassembledLinear) and linear.weight.shape == off["original"][role].shape, role
        assert torch.equal(off["weights"][role], rtn(off["original"][role])), role
    assert all(torch.equal(off["norms"][r], off["original_norms"][r]) for r in off["norms"])
    # on: q/k/v, gate/up and down read a reassembled input (extra channels merged back: same width)
    for feeder, s in on["searches"].items():
        width = on["original"][s["group"].roles[0]].shape[1]
        assert s["chosen"].width == width and s["chosen"].merged == s["chosen"].extra, feeder
        if not s["chosen"].is_identity:
            assert all(isinstance(on["linears"][r], ReassembledLinear) for r in s["group"].roles), feeder
    assert on["searches"]["attn_norm"]["chosen"].extra > 0 and on["searches"]["mlp_norm"]["chosen"].extra > 0
    assert not torch.equal(on["norms"]["attn_norm"], off["norms"]["attn_norm"])
    assert not torch.equal(on["weights"]["q"], off["weights"]["q"])
    # o is no reassembly point: the same RTN weight either way
    assert not isinstance(on["linears"]["o"], ReassembledLinear) and torch.equal(on["weights"]["o"], off["weights"]["o"])


# --------------------------------------------------------------------------- assembly


def test_assembly_off_keeps_the_disassembled_channels_on_merges_as_many():
    on = quantize({"eec": False})
    off = quantize({"assembly": False, "eec": False})
    grown = 0
    for feeder in ("attn_norm", "mlp_norm", "up"):
        a, b = on["searches"][feeder], off["searches"][feeder]
        roles = a["group"].roles
        width = on["original"][roles[0]].shape[1]
        assert torch.equal(a["maxima"], b["maxima"]), feeder  # the same statistics
        # off: no distance, nothing merged, the input grows by the disassembly count
        assert b["distance"] is None
        ra = b["chosen"]
        assert ra.merged == 0 and ra.width == width + ra.extra
        assert ra.extra == int(disassembly_counts(b["maxima"], ra.threshold).sum()) - width
        expected = reassemble(b["maxima"], ra.threshold)
        assert torch.equal(ra.source, expected.source) and torch.equal(ra.slot, expected.slot)
        for role in roles:
            assert off["weights"][role].shape == (off["original"][role].shape[0], ra.width), (feeder, role)
        grown += ra.extra
        # on: the paper distance of the search input and the stacked consumers; as many merged as added
        stacked = torch.cat([on["original"][r].float() for r in roles])
        assert torch.equal(a["distance"], pair_distance(a["input"], stacked, "paper"))
        assert a["chosen"].merged == a["chosen"].extra and a["chosen"].width == width
        for role in roles:
            assert on["weights"][role].shape == on["original"][role].shape, (feeder, role)
        # the candidates with assembly are those without it that leave enough channels to merge
        on_c = [(t.threshold, t.extra) for t in a["trials"]]
        assert on_c == [(t.threshold, t.extra) for t in off["searches"][feeder]["trials"]][: len(on_c)]
    assert grown > 0
    assert sum(s["chosen"].merged for s in on["searches"].values()) > 0


# --------------------------------------------------------------------------- adaptive


def test_adaptive_off_takes_the_smallest_candidate_theta_unmeasured():
    on = quantize({"eec": False})
    off = quantize({"adaptive": False, "eec": False})
    differs = 0
    for feeder in ("attn_norm", "mlp_norm", "up"):
        a, b = on["searches"][feeder], off["searches"][feeder]
        assert a["adaptive"] is True and b["adaptive"] is False
        assert [(t.threshold, t.extra) for t in a["trials"]] == [(t.threshold, t.extra) for t in b["trials"]]
        assert len(a["trials"]) > 1, feeder
        # off: nothing measured, the smallest θ (the most extra channels) of the candidates
        assert all(t.error is None for t in b["trials"])
        assert b["chosen"].threshold == min(t.threshold for t in b["trials"])
        assert b["chosen"].extra == max(t.extra for t in b["trials"])
        # on: every candidate measured, the one with the smallest error
        assert all(t.error is not None for t in a["trials"])
        assert a["chosen"].threshold == min(a["trials"], key=lambda t: t.error).threshold
        differs += a["chosen"].threshold != b["chosen"].threshold
    assert differs > 0  # the measured best is not always the smallest θ


# --------------------------------------------------------------------------- channel_ratio


def test_channel_ratio_caps_the_extra_channels():
    adapter, x, kwargs = block_and_inputs()
    block = adapter.block(0)
    ctx = BlockContext([block], x, kwargs, CPU, F32, fp_inputs=x)
    probe = QLLM(W4A4, {})
    maxima, search_inputs, _ = probe.observe(block, x, ctx)
    extras = {}
    for ratio in (0.0, 0.02, 0.05, 0.2):
        method = QLLM(W4A4, {"channel_ratio": ratio, "adaptive": False, "assembly": False})
        chosen = method.reassemble_block(block, maxima, search_inputs, kwargs, ctx)
        for group, _, _ in method.points(block):
            m = maxima[group.roles[0]]
            budget = int(ratio * m.numel())
            free = [t.extra for t in threshold_candidates(m, 1.0)]  # every number of extra channels the grid reaches
            ra = chosen[group.feeder]
            assert ra.extra <= budget and ra.width == m.numel() + ra.extra, (ratio, group.feeder)
            assert ra.extra == max(e for e in free if e <= budget), (ratio, group.feeder)
            extras[ratio, group.feeder] = ra.extra
    assert all(extras[0.0, f] == 0 for f in ("attn_norm", "mlp_norm", "up"))
    assert extras[0.02, "attn_norm"] < extras[0.2, "attn_norm"]
    assert extras[0.05, "mlp_norm"] < extras[0.2, "mlp_norm"]


# --------------------------------------------------------------------------- distance


def test_distance_changes_the_merged_pairs_and_only_those():
    paper = quantize({"eec": False, "adaptive": False})
    ref = quantize({"eec": False, "adaptive": False, "distance": "reference"})
    differs = 0
    for feeder in ("attn_norm", "mlp_norm", "up"):
        a, b = paper["searches"][feeder], ref["searches"][feeder]
        roles = a["group"].roles
        stacked = torch.cat([paper["original"][r].float() for r in roles])
        x = a["input"]
        assert torch.equal(x, b["input"])
        assert torch.equal(a["distance"], pair_distance(x, stacked, "paper"))
        assert torch.equal(b["distance"], pair_distance(x, stacked, "reference"))
        ra, rb = a["chosen"], b["chosen"]
        # the same θ, the same disassembly, as many merged
        assert (ra.threshold, ra.extra, ra.merged, ra.width) == (rb.threshold, rb.extra, rb.merged, rb.width)
        split = disassembly_counts(a["maxima"], ra.threshold) > 1
        assert torch.equal(ra.coef[split], rb.coef[split])
        touched = {c for pair in merged_pairs(ra) + merged_pairs(rb) for c in pair}
        untouched = [c for c in range(ra.channels) if c not in touched]
        assert torch.equal(ra.coef[untouched], rb.coef[untouched])
        # the pairs: bipartite matching on each distance
        for r, d in ((ra, a["distance"]), (rb, b["distance"])):
            ea, eb = match_channels(d, split, r.extra)
            assert merged_pairs(r) == sorted(zip(ea.tolist(), eb.tolist())), feeder
        differs += merged_pairs(ra) != merged_pairs(rb)
    assert differs > 0
    assert torch.equal(paper["weights"]["o"], ref["weights"]["o"])


# --------------------------------------------------------------------------- search_samples


def test_search_samples_sets_the_windows_the_search_measures():
    adapter, x, kwargs = block_and_inputs()
    block = adapter.block(0)
    ctx = BlockContext([block], x, kwargs, CPU, F32, fp_inputs=x)
    m1, s1, y1 = QLLM(W4A4, {"search_samples": 1}).observe(block, x, ctx)
    m2, s2, y2 = QLLM(W4A4, {"search_samples": 2}).observe(block, x, ctx)
    assert torch.equal(s1, x[:1]) and torch.equal(s2, x[:2])
    # the statistics and the chunk's target: over all windows either way
    assert m1.keys() == m2.keys() == {"q", "gate", "down"} and all(torch.equal(m1[k], m2[k]) for k in m1)
    assert torch.equal(y1, y2)
    one = quantize({"eec": False, "search_samples": 1})
    two = quantize({"eec": False, "search_samples": 2})
    for feeder in ("attn_norm", "mlp_norm", "up"):
        a, b = one["searches"][feeder], two["searches"][feeder]
        assert a["input"].shape[0] == 32 and b["input"].shape[0] == 64  # tokens of 1 and 2 windows of 32
        assert torch.equal(b["input"][:32], a["input"])
        assert torch.equal(a["maxima"], b["maxima"])
        assert [(t.threshold, t.extra) for t in a["trials"]] == [(t.threshold, t.extra) for t in b["trials"]]
        assert all(ta.error != tb.error for ta, tb in zip(a["trials"], b["trials"])), feeder  # measured on more


# --------------------------------------------------------------------------- eec


def test_eec_off_trains_no_pair_and_leaves_reassembly_plus_rtn():
    off = quantize({"eec": False})
    untrained = quantize({"epochs": 0})  # reassembly + RTN through the eec=true path
    on = quantize({"epochs": 1})
    assert off["low_ranks"] is None and untrained["low_ranks"] is None
    assert [off["method"].span(i, 8) for i in range(8)] == [1] * 8
    assert [on["method"].span(i, 8) for i in range(8)] == [4, 3, 2, 1, 4, 3, 2, 1]
    for feeder in off["searches"]:  # the same reassembly with and without EEC
        a, b = off["searches"][feeder]["chosen"], on["searches"][feeder]["chosen"]
        assert torch.equal(a.source, b.source) and torch.equal(a.slot, b.slot) and torch.equal(a.coef, b.coef)
    for role in off["weights"]:
        assert torch.equal(off["weights"][role], untrained["weights"][role]), role
    assert all(torch.equal(off["norms"][r], untrained["norms"][r]) for r in off["norms"])
    assert torch.equal(off["output"], untrained["output"])
    # reassembly + RTN, independently: o is RTN of its original, q/k/v the RTN of W B
    assert torch.equal(off["weights"]["o"], rtn(off["original"]["o"]))
    qkv = off["searches"]["attn_norm"]["chosen"]
    for role in ("q", "k", "v"):
        assert torch.equal(off["weights"][role], rtn(qkv.weight(off["original"][role].float()))), role
    # on: one pair per linear, trained (B no longer zero), and the block changes
    assert set(on["low_ranks"]) == {(0, r) for r in on["weights"]}
    assert all(lr.B.abs().sum() > 0 for lr in on["low_ranks"].values())
    assert any(not torch.equal(on["weights"][r], off["weights"][r]) for r in off["weights"])
    assert not torch.equal(on["output"], off["output"])


# --------------------------------------------------------------------------- rank and lora_alpha


def installed_block(options):
    """Block 0 after the reassembly (disassembly only: widened inputs) and RTN, and its method."""
    adapter, x, kwargs = block_and_inputs()
    block = adapter.block(0)
    ctx = BlockContext([block], x, kwargs, CPU, F32, fp_inputs=x)
    method = QLLM(W4A4, {"assembly": False, "epochs": 1, **options})
    method.optimize = lambda *args: []  # the pairs as train_chunk creates them (training itself: test_qllm.py)
    maxima, _, _ = method.observe(block, x, ctx)
    reassemblies = {g.feeder: reassemble(maxima[g.roles[0]], maxima[g.roles[0]].max().item() / 5)
                    for g, _, _ in method.points(block)}
    method.install(block, reassemblies)
    return block, x, kwargs, ctx, method, reassemblies


@pytest.mark.parametrize("rank", [1, 3])
def test_rank_sets_the_shape_of_every_pair(rank):
    block, x, kwargs, ctx, method, reassemblies = installed_block({"rank": rank})
    widths = {r: ra.width for g, _, _ in method.points(block) for r in g.roles for ra in [reassemblies[g.feeder]]}
    assert len(widths) == 6 and all(ra.extra > 0 for ra in reassemblies.values())
    torch.manual_seed(0)
    low_ranks = method.train_chunk([block], x, x, kwargs, ctx)
    assert set(low_ranks) == {(0, r) for r in block.linears()}
    for role, linear in block.linears().items():
        lr = low_ranks[0, role]
        # the pair reads the reassembled (widened) input of q/k/v, gate/up and down, o's own input
        width = widths.get(role, block.linear(role).weight.shape[1])
        assert lr.A.shape == (rank, width) and lr.B.shape == (linear.out_features, rank), role
        assert torch.equal(lr.B, torch.zeros_like(lr.B)) and lr.scaling == 1.0 / rank, role


def test_lora_alpha_scales_the_pairs_contribution_by_alpha_over_rank():
    block, x, kwargs, ctx, method, _ = installed_block({"rank": 4, "lora_alpha": 2.0})
    torch.manual_seed(0)
    scaled = method.train_chunk([block], x, x, kwargs, ctx)
    block1, _, _, ctx1, method1, _ = installed_block({"rank": 4, "lora_alpha": 1.0})
    torch.manual_seed(0)
    plain = method1.train_chunk([block1], x, x, kwargs, ctx1)
    g = torch.Generator().manual_seed(0)
    for key, lr in scaled.items():
        ref = plain[key]
        assert lr.scaling == 0.5 and ref.scaling == 0.25
        assert torch.equal(lr.A, ref.A)  # the same start: only the factor differs
        with torch.no_grad():
            lr.B.copy_(torch.randn(lr.B.shape, generator=g))
            ref.B.copy_(lr.B)
        assert torch.equal(lr.delta(), 2 * ref.delta()), key
        z = torch.randn(3, lr.A.shape[1], generator=g)
        assert torch.equal(lr.correction(z), (z @ lr.A.T) @ lr.B.T * 0.5), key
        assert torch.equal(lr.correction(z), 2 * ref.correction(z)), key


# --------------------------------------------------------------------------- train_norms


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_train_norms_trains_the_norms_and_biases_only_when_on(arch):
    block = ModelAdapter(random_model(arch, layers=1)).block(0)
    on = QLLM(W4A4, {}).trainable_extras(block)
    assert QLLM(W4A4, {"train_norms": False}).trainable_extras(block) == {}
    norms = {f"{p}.{a}" for p in block.family.norms.values() for a in ("weight", "bias")
             if isinstance(getattr(block.module.get_submodule(p), a, None), torch.Tensor)}
    biases = {f"{block.family.linears[r]}.bias" for r, lin in block.linears().items() if lin.bias is not None}
    assert set(on) == norms | biases and (arch == "opt") == bool(biases)


def test_train_norms_off_leaves_the_folded_norms():
    off = quantize({"epochs": 1, "train_norms": False})
    on = quantize({"epochs": 1})
    rtn_only = quantize({"eec": False})
    for r in rtn_only["norms"]:
        assert torch.equal(off["norms"][r], rtn_only["norms"][r]), r  # only the reassembly folded into them
        assert not torch.equal(on["norms"][r], rtn_only["norms"][r]), r


# --------------------------------------------------------------------------- blocks_per_chunk


@pytest.mark.parametrize("per_chunk,spans", [(1, [1] * 5), (2, [2, 1, 2, 1, 1]), (3, [3, 2, 1, 2, 1]),
                                             (4, [4, 3, 2, 1, 1]), (8, [5, 4, 3, 2, 1])])
def test_blocks_per_chunk_sets_the_span(per_chunk, spans):
    assert [QLLM(W4A4, {"blocks_per_chunk": per_chunk}).span(i, 5) for i in range(5)] == spans
    assert [QLLM(W4A4, {"blocks_per_chunk": per_chunk, "eec": False}).span(i, 5) for i in range(5)] == [1] * 5


@pytest.mark.parametrize("options,chunks", [({"blocks_per_chunk": 2}, [[0, 1], [2, 3], [4]]),
                                            ({"blocks_per_chunk": 3}, [[0, 1, 2], [3, 4]]),
                                            ({"blocks_per_chunk": 3, "eec": False}, [[0], [1], [2], [3], [4]])])
def test_the_pipeline_hands_over_the_chunks(options, chunks):
    adapter = ModelAdapter(random_model("llama", layers=5))
    method = QLLM(W4A4, options)
    handed = []
    method.quantize_block = lambda ctx: handed.append([b.index for b in ctx.blocks])
    calibration = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(0))
    quantize_model(adapter, method, calibration, "cpu", batch_size=2, progress=False)
    assert handed == chunks
