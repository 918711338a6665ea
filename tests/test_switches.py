"""Each aespa switch changes exactly the quantity it names, read inside one block: the Hessian of
each role's objective and of its OPTQ sweep, the grid (Z-Fold's ζ or not), the start point given to
rounding learning, the rounding-loss weight per role (q/k/v vs the rest), the query/key
covariances, and what is written when rounding is not learned. Rounding learning itself is
replaced by a recorder (its math is tested in test_aespa.py and test_rounding_speed.py), so each
run takes a fraction of a second. The block has a dead input channel (a zero gain in the
attention norm), so the original and the dead-zeroed weights differ."""
import pytest
import torch
from conftest import random_model

import aespa.method as aespa_method
from aespa.core.adapters import ModelAdapter
from aespa.core.grid import Grid, minmax_grid
from aespa.core.hessian import prepare_hessian, zero_dead_columns
from aespa.core.method import QuantSpec, get_method
from aespa.core.pipeline import BlockContext, capture_inputs
from aespa.core.rounding import RoundingResult
from aespa.core.sweep import gptq_sweep
from aespa.qparams import hessian_weighted_grid, zfold
from aespa.statistics import collect_block_statistics

QKV = ("q", "k", "v")
FAST = {"zfold_rounds": 2, "iters": 7}


def run(arch: str, monkeypatch, bits: int = 2, group_size: int = -1, **options):
    """Quantize block 0 of a small random model with aespa; returns what the block saw:
    ``stats`` (the statistics), ``original`` weights, ``problems`` and ``rounding`` (the
    arguments of learn_rounding), ``sweeps`` (role -> the sweep's Hessian and options),
    ``zfold`` (the calls), ``grids`` and ``weights`` (what was written)."""
    model = random_model(arch, layers=1, seed=0)
    adapter = ModelAdapter(model)
    block = adapter.block(0)
    norm = block.module.self_attn_layer_norm if arch == "opt" else block.module.input_layernorm
    norm.weight.data[5] = 0.0  # input channel 5 of q/k/v is dead
    if getattr(norm, "bias", None) is not None:
        norm.bias.data[5] = 0.0
    for role in QKV:  # large weights on the dead channel: its column holds every row's extreme
        block.linear(role).weight.data[:, 5] *= 10
    ids = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(0))
    inputs, kwargs = capture_inputs(adapter, ids, "cpu", batch_size=2)
    ctx = BlockContext([block], inputs, kwargs, torch.device("cpu"), torch.float32, batch_size=2)
    seen = {"original": {r: lin.weight.data.float().clone() for r, lin in block.linears().items()},
            "sweeps": {}, "zfold": [], "grids": {}}
    roles = list(block.linears())

    def stats(ctx, **kw):
        seen["stats"] = collect_block_statistics(ctx, **kw)
        seen["stats_kwargs"] = kw
        return seen["stats"]

    def sweep(weight, hessian, grid, **kw):
        seen["sweeps"][roles[len(seen["sweeps"])]] = {"weight": weight, "hessian": hessian, "grid": grid, **kw}
        return gptq_sweep(weight, hessian, grid, **kw)

    def fold(weights, hessians, *args, **kw):
        seen["zfold"].append({"weights": weights, "hessians": hessians, "args": args, **kw})
        return zfold(weights, hessians, *args, **kw)

    def rounding(problems, **kw):
        seen["problems"], seen["rounding"] = {p.name: p for p in problems}, kw
        return [RoundingResult(p.grid.fake_quantize(p.start), torch.zeros_like(p.weight), 0.0, 0.0) for p in problems]

    monkeypatch.setattr(aespa_method, "collect_block_statistics", stats)
    monkeypatch.setattr(aespa_method, "gptq_sweep", sweep)
    monkeypatch.setattr(aespa_method, "zfold", fold)
    monkeypatch.setattr(aespa_method, "learn_rounding", rounding)
    real_set = ctx.set_weight
    monkeypatch.setattr(ctx, "set_weight", lambda role, w, grid: (seen["grids"].__setitem__(role, grid),
                                                                   real_set(role, w, grid)))
    method = get_method("aespa")(QuantSpec(bits=bits, group_size=group_size), {**FAST, **options})
    method.quantize_block(ctx)
    seen["weights"] = {r: lin.weight.data.clone() for r, lin in block.linears().items()}
    seen["method"] = method
    return seen


def expected_objective(seen, role, percdamp=0.01, dead_value=1 / 2048, block_v=True):
    raw = seen["stats"].value_hessian if role == "v" and block_v else seen["stats"].hessians[role]
    return prepare_hessian(raw, percdamp, dead_value)


def same_grid(a: Grid, b: Grid) -> bool:
    da, db = a.to_dict(), b.to_dict()
    return da.keys() == db.keys() and all(not torch.is_tensor(v) or torch.equal(v, db[k]) for k, v in da.items())


# --------------------------------------------------------------------------- block_v


def test_block_v_changes_the_value_hessian_and_nothing_else(monkeypatch):
    on = run("llama", monkeypatch, use_zfold=False)
    off = run("llama", monkeypatch, use_zfold=False, block_v=False)
    assert on["stats_kwargs"]["value"] and not off["stats_kwargs"]["value"]
    assert off["stats"].value_hessian is None and on["stats"].value_hessian.dim() == 3
    # the objective of v and its OPTQ sweep read the attention-weighted Hessian, per head
    assert torch.equal(on["problems"]["v"].hessian, expected_objective(on, "v")[0])
    assert torch.equal(on["sweeps"]["v"]["hessian"], on["stats"].value_hessian)
    assert torch.equal(off["problems"]["v"].hessian, expected_objective(off, "v", block_v=False)[0])
    assert torch.equal(off["sweeps"]["v"]["hessian"], off["stats"].hessians["v"])
    assert on["method"].optq_hessian("v", on["stats"]) is on["stats"].value_hessian
    assert off["method"].optq_hessian("v", off["stats"]) is off["stats"].hessians["v"]
    for role in on["problems"]:
        if role != "v":  # every other role: the same objective, grid, start and weight
            a, b = on["problems"][role], off["problems"][role]
            assert torch.equal(a.hessian, b.hessian) and torch.equal(a.start, b.start), role
            assert same_grid(a.grid, b.grid) and torch.equal(on["weights"][role], off["weights"][role]), role
            assert torch.equal(on["sweeps"][role]["hessian"], on["stats"].hessians[role]), role
    assert not torch.equal(on["weights"]["v"], off["weights"]["v"])


# --------------------------------------------------------------------------- use_zfold


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_use_zfold_changes_only_the_fold_groups_grids(arch, monkeypatch):
    on = run(arch, monkeypatch)
    off = run(arch, monkeypatch, use_zfold=False)
    groups = aespa_method.zfold_groups(ModelAdapter(random_model(arch, layers=1)).block(0))
    folded = {r for g in groups for r in g}
    assert folded >= set(QKV) and (arch == "opt") == ("o" in folded)
    assert len(on["zfold"]) == len(groups)
    assert off["zfold"] == []
    for role, problem in off["problems"].items():
        # off: every grid is the Hessian-weighted clipping search on the dead-zeroed weight
        hessian, dead = expected_objective(off, role)
        weight = zero_dead_columns(off["original"][role], dead)
        assert torch.equal(problem.weight, weight), role
        assert same_grid(problem.grid, hessian_weighted_grid(weight, hessian, 2)), role
        assert problem.grid.col_scale is None and off["grids"][role] is problem.grid
    for role, problem in on["problems"].items():
        assert (problem.grid.col_scale is not None) == (role in folded), role
        if role not in folded:
            assert same_grid(problem.grid, off["problems"][role].grid), role
    for group, call in zip(groups, on["zfold"]):
        # Z-Fold of a group: its weights and objectives, the run's bits, its rounds, started at the
        # min-max grids of the original (not dead-zeroed) weights; one ζ for the whole group
        assert call["args"][:4] == (2, False, -1, FAST["zfold_rounds"])
        assert all(torch.equal(w, on["problems"][r].weight) for w, r in zip(call["weights"], group))
        assert all(torch.equal(h, on["problems"][r].hessian) for h, r in zip(call["hessians"], group))
        assert all(same_grid(g, minmax_grid(on["original"][r], 2)) for g, r in zip(call["initial_grids"], group))
        assert all(torch.equal(on["grids"][r].col_scale, on["grids"][group[0]].col_scale) for r in group)
        fresh = zfold(call["weights"], call["hessians"], 2, False, -1, FAST["zfold_rounds"],
                      initial_grids=call["initial_grids"])
        assert all(same_grid(g, on["grids"][r]) for g, r in zip(fresh.grids, group))
    assert not torch.equal(minmax_grid(on["original"]["q"], 2).scale,
                           minmax_grid(on["problems"]["q"].weight, 2).scale), "the dead column must matter"


def test_zero_zfold_rounds_is_no_zfold(monkeypatch):
    zero = run("opt", monkeypatch, zfold_rounds=0)
    assert zero["zfold"] == [] and all(p.grid.col_scale is None for p in zero["problems"].values())


# --------------------------------------------------------------------------- optq_init, act_order


@pytest.mark.parametrize("act_order", [True, False])
def test_optq_init_gives_rounding_the_sweeps_updated_weights(act_order, monkeypatch):
    seen = run("opt", monkeypatch, act_order=act_order, percdamp=0.03, dead_value=0.25, blocksize=8)
    for role, problem in seen["problems"].items():
        hessian = seen["stats"].value_hessian if role == "v" else seen["stats"].hessians[role]
        sweep = seen["sweeps"][role]
        assert torch.equal(sweep["hessian"], hessian) and sweep["grid"] is problem.grid, role
        assert (sweep["act_order"], sweep["percdamp"], sweep["dead_value"], sweep["blocksize"]) == \
            (act_order, 0.03, 0.25, 8), role
        expected = gptq_sweep(problem.weight, hessian, problem.grid, blocksize=8, percdamp=0.03,
                              act_order=act_order, dead_value=0.25)
        assert torch.equal(problem.start, expected.weight_updated), role
        assert not torch.equal(problem.start, problem.weight), role


def test_act_order_changes_the_start_point(monkeypatch):
    on = run("opt", monkeypatch, use_zfold=False)
    off = run("opt", monkeypatch, use_zfold=False, act_order=False)
    assert all(same_grid(on["problems"][r].grid, off["problems"][r].grid) for r in on["problems"])
    assert any(not torch.equal(on["problems"][r].start, off["problems"][r].start) for r in on["problems"])


def test_without_optq_init_rounding_starts_at_the_weights(monkeypatch):
    seen = run("opt", monkeypatch, optq_init=False)
    assert seen["sweeps"] == {}
    for role, problem in seen["problems"].items():
        assert problem.start is problem.weight or torch.equal(problem.start, problem.weight), role


# --------------------------------------------------------------------------- learn_rounding


def test_without_learned_rounding_the_sweeps_integers_are_written(monkeypatch):
    seen = run("opt", monkeypatch, learn_rounding=False)
    assert "problems" not in seen and seen["stats_kwargs"] == {"value": True, "query_key": False}
    for role, weight in seen["weights"].items():
        sweep = seen["sweeps"][role]
        expected = gptq_sweep(sweep["weight"], sweep["hessian"], sweep["grid"],
                              **{k: sweep[k] for k in ("blocksize", "percdamp", "act_order", "dead_value")})
        assert torch.equal(weight, expected.weight_q), role
        assert seen["grids"][role] is sweep["grid"], role


def test_without_learned_rounding_nor_optq_the_weights_are_rounded_to_nearest(monkeypatch):
    seen = run("opt", monkeypatch, learn_rounding=False, optq_init=False)
    assert "problems" not in seen and seen["sweeps"] == {}
    for role, weight in seen["weights"].items():
        _, dead = expected_objective(seen, role)
        expected = seen["grids"][role].fake_quantize(zero_dead_columns(seen["original"][role], dead))
        assert torch.equal(weight, expected), role


# --------------------------------------------------------------------------- per role: loss weight, covariances


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_rounding_problems_per_role(arch, monkeypatch):
    options = dict(round_weight=0.7, round_weight_qkv=1.9, iters=11, lr=0.02, warmup=0.3, beta_start=15.0,
                   beta_end=3.0, percdamp=0.02, dead_value=0.125)
    seen = run(arch, monkeypatch, **options)
    stats = seen["stats"]
    assert seen["rounding"]["iterations"] == 11 and seen["rounding"]["lr"] == 0.02
    assert seen["rounding"]["warmup"] == 0.3 and tuple(seen["rounding"]["beta"]) == (15.0, 3.0)
    assert set(seen["problems"]) == set(seen["original"])
    for role, problem in seen["problems"].items():
        assert problem.round_weight == (1.9 if role in QKV else 0.7), role
        covariance = {"q": stats.key_covariance, "k": stats.query_covariance}.get(role)
        assert (problem.head_covariance is None) == (covariance is None), role
        if covariance is not None:
            assert torch.equal(problem.head_covariance, covariance), role
        hessian, dead = expected_objective(seen, role, percdamp=0.02, dead_value=0.125)
        assert torch.equal(problem.hessian, hessian), role
        assert torch.equal(problem.weight, zero_dead_columns(seen["original"][role], dead)), role
        assert torch.equal(seen["weights"][role], problem.grid.fake_quantize(problem.start)), role
        assert seen["grids"][role] is problem.grid, role
    dead = expected_objective(seen, "q")[1]
    assert dead.sum() == 1 and dead[5] and seen["problems"]["q"].hessian[5, 5] > 0.125  # dead_value, then damping
    assert torch.equal(seen["weights"]["q"][:, 5], torch.zeros(seen["weights"]["q"].shape[0]))


def test_group_grids_reach_every_role(monkeypatch):
    seen = run("llama", monkeypatch, group_size=16, bits=3)
    for role, grid in seen["grids"].items():
        assert grid.group_size == 16 and grid.bits == 3 and grid.scale.shape[1] == seen["original"][role].shape[1] // 16


# --------------------------------------------------------------------------- OmniQuant


def test_learned_clipping_bounds_act_on_their_own_side():
    """LWC: the upper logit scales the row maximum, the lower one the row minimum (never swapped)."""
    from baselines.omniquant import LearnableClipping

    w = torch.tensor([[-2.0, 1.0, 4.0], [-1.0, 0.5, 3.0]])
    clip = LearnableClipping(2, 3, bits=2)
    with torch.no_grad():
        clip.upper.fill_(0.0)  # σ = 1/2 on the maximum
        clip.lower.fill_(2.0)  # σ(2) on the minimum
    s = torch.sigmoid(torch.tensor(2.0))
    grid = clip.grid(w)
    hi, lo = torch.tensor([2.0, 1.5]), -s * torch.tensor([2.0, 1.0])
    torch.testing.assert_close(grid.scale[:, 0], (hi - lo) / 3)
    assert torch.equal(grid.zero[:, 0], torch.round(-lo / grid.scale[:, 0]))
    plain = LearnableClipping(2, 3, bits=2, learnable=False).grid(w)  # the raw min-max range
    torch.testing.assert_close(plain.scale[:, 0], torch.tensor([6.0, 4.0]) / 3)


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_omniquant_let_and_shift_switches(arch):
    """LET on/off and the shift: which transform parameters exist, for weight-only and W/A runs."""
    from baselines.omniquant import OmniQuant

    block = ModelAdapter(random_model(arch, layers=1)).block(0)
    for spec, options, let, shift in [(QuantSpec(bits=4, act_bits=4), {}, True, arch == "opt"),
                                      (QuantSpec(bits=4, act_bits=4), {"let": False}, False, arch == "opt"),
                                      (QuantSpec(bits=4, act_bits=4), {"shift": False}, True, False),
                                      (QuantSpec(bits=3), {"let": True}, True, False)]:
        method = OmniQuant(spec, options)
        assert method.uses_let(block) == let, (spec, options)
        assert method.uses_shift(block) == shift, (spec, options)


# --------------------------------------------------------------------------- GPTQ


def gptq_block(monkeypatch, options, damping=None):
    """Block 0 of a small OPT quantized by GPTQ with spies on the Hessians, the residual statistics
    and each linear's call; ``damping``: what every linear's sweep reports (its notes)."""
    import baselines.gptq as gptq_module
    from aespa.core.hessian import collect_hessians
    from aespa.core.residual import collect_residual_statistics

    model = random_model("opt", layers=1, seed=0)
    adapter = ModelAdapter(model)
    ids = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(0))
    inputs, kwargs = capture_inputs(adapter, ids, "cpu", batch_size=2)
    block = adapter.block(0)
    ctx = BlockContext([block], inputs, kwargs, torch.device("cpu"), torch.float32, batch_size=2,
                       fp_inputs=inputs + 0.01 * torch.randn(inputs.shape, generator=torch.Generator().manual_seed(1)))
    seen = {"hessians": [], "residuals": [], "linears": [], "notes": []}
    original = {f"{block.family.linears[r]}.weight": lin.weight.detach().clone() for r, lin in block.linears().items()}

    def hessians(ctx, roles):
        seen["hessians"].append(tuple(roles))
        return collect_hessians(ctx, roles)

    def residuals(ctx, roles, **kw):
        seen["residuals"].append((tuple(roles), kw))
        return collect_residual_statistics(ctx, roles, **kw)

    monkeypatch.setattr(gptq_module, "collect_hessians", hessians)
    monkeypatch.setattr(gptq_module, "collect_residual_statistics", residuals)
    monkeypatch.setattr(ctx, "note", seen["notes"].append)
    method = get_method("gptq")(QuantSpec(bits=3), options)
    real = method.quantize_linear

    def linear(weight, hessian, residual):
        seen["linears"].append({"weight": weight.clone(), "hessian": hessian, "residual": residual})
        result = real(weight, hessian, residual)
        if damping is not None:
            result.damping = damping
        return result

    method.quantize_linear = linear
    method.quantize_block(ctx)
    seen.update(ctx=ctx, original=original, block=block)
    return seen


def test_gptq_true_sequential_collects_a_hessian_per_group(monkeypatch):
    on = gptq_block(monkeypatch, {})
    off = gptq_block(monkeypatch, {"true_sequential": False})
    groups = [g.roles for g in on["block"].groups]
    assert on["hessians"] == groups and off["hessians"] == [tuple(on["block"].linears())]
    # later groups see the quantized earlier ones: o's Hessian differs, q's does not
    assert torch.equal(on["linears"][0]["hessian"], off["linears"][0]["hessian"])
    assert not torch.equal(on["linears"][3]["hessian"], off["linears"][3]["hessian"])


def test_gptq_alpha_scales_the_residual_term(monkeypatch):
    plain = gptq_block(monkeypatch, {})
    assert plain["residuals"] == [] and all(c["residual"] is None for c in plain["linears"])
    assert plain["ctx"].fp_inputs is not None  # the stream is there: alpha alone decides
    gptaq = gptq_block(monkeypatch, {"alpha": 0.25})
    assert "residual" in gptaq["ctx"].phases and "residual" not in plain["ctx"].phases  # its own timed phase
    roles = list(gptaq["block"].linears())
    assert [r for r, _ in gptaq["residuals"]] == [g.roles for g in gptaq["block"].groups]
    fp = gptaq["residuals"][0][1]["fp_params"]
    assert fp.keys() == gptaq["original"].keys() and all(torch.equal(fp[k], v) for k, v in gptaq["original"].items())
    for call, role in zip(gptaq["linears"], roles):
        assert call["residual"] is not None and call["residual"].shape == call["hessian"].shape, role
    # D = alpha · T · E[(x_fp - x_q) x_qᵀ] (the Hessian's scale: 2/N Σ over N windows of T tokens)
    ctx = gptaq["ctx"]
    from aespa.core.residual import collect_residual_statistics

    ctx.block.module.load_state_dict({**ctx.block.module.state_dict(), **gptaq["original"]})
    stats = collect_residual_statistics(ctx, ("q", "k", "v"), fp_params=gptaq["original"])
    assert stats.inputs["q"].abs().max() > 1e-4  # (a shift of the whole stream would vanish in the norm)
    torch.testing.assert_close(gptaq["linears"][0]["residual"], 0.25 * 16 * stats.inputs["q"], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("damping,note", [(0.01, None), (0.01 * (1 + 1e-7), None), (0.01 * (1 + 1e-6), None),
                                          (0.01 * (1 + 2e-6), "used 0.01"), (0.1, "used 0.1"),
                                          (float("inf"), "used inf (rounded to nearest)")])
def test_gptq_notes_a_raised_damping(monkeypatch, damping, note):
    seen = gptq_block(monkeypatch, {}, damping=damping)
    if note is None:
        assert seen["notes"] == []
    else:
        assert len(seen["notes"]) == 6 and seen["notes"][0] == f"gptq q: Cholesky failed at percdamp=0.01; {note}"


@pytest.mark.parametrize("options", [{"refine_qparam": True}, {"qparam": "hessian"}, {"qparam": "mse"}])
def test_gptq_each_qparam_stage_runs_alone_and_changes_the_weights(monkeypatch, options):
    plain = gptq_block(monkeypatch, {})["block"]
    staged = gptq_block(monkeypatch, options)["block"]
    assert any(not torch.equal(a.weight, b.weight) for a, b in zip(plain.linears().values(),
                                                                 staged.linears().values()))


# --------------------------------------------------------------------------- aespa's grids and their progress


class ProgressRecorder:
    """Stands for BlockContext.progress: the tasks opened, their steps, log lines and close."""

    def __init__(self):
        self.tasks = []

    def __call__(self, phase, layer="", total=None):
        task = {"args": (phase, layer, total), "steps": [], "logs": [], "closed": []}
        self.tasks.append(task)

        class Task:
            def update(self, step, loss=None):
                task["steps"].append((step, loss))

            def log(self, message):
                task["logs"].append(message)

            def close(self, summary=True):
                task["closed"].append(summary)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.close()

        return Task()


@pytest.mark.parametrize("sym,group_size,rounds", [(False, -1, 1), (True, 16, 2)])
def test_quantization_parameters_fold_groups_and_the_rest(sym, group_size, rounds):
    from aespa.statistics import QuadraticObjective

    block = ModelAdapter(random_model("llama", layers=1, seed=0)).block(0)
    g = torch.Generator().manual_seed(0)
    original = {r: lin.weight.data.float().clone() for r, lin in block.linears().items()}
    weights = {r: w * (1 + 0.1 * torch.rand(w.shape[1], generator=g)) for r, w in original.items()}  # not the original
    objectives = {}
    for r, w in weights.items():
        x = torch.randn(3 * w.shape[1], w.shape[1], generator=g)
        objectives[r] = QuadraticObjective(x.T @ x / x.shape[0] + 0.1 * torch.eye(w.shape[1]), None)
    spec = QuantSpec(bits=2, sym=sym, group_size=group_size)
    method = get_method("aespa")(spec, {"zfold_rounds": rounds})
    progress = ProgressRecorder()
    grids = method.quantization_parameters(block, original, weights, objectives, progress)
    groups = aespa_method.zfold_groups(block)
    assert [t["args"] for t in progress.tasks] == [("qparams", " ".join(grp), rounds) for grp in groups]
    for grp, task in zip(groups, progress.tasks):
        seen = []
        result = zfold([weights[r] for r in grp], [objectives[r].hessian for r in grp], 2, sym, group_size, rounds,
                       initial_grids=[minmax_grid(original[r], 2, sym, group_size) for r in grp],
                       on_round=lambda i, loss: seen.append((i, loss)))
        assert task["steps"] == seen and len(seen) >= 1 and task["closed"] == [False]
        assert task["logs"] == [f"Z-Fold: {result.rounds} rounds kept, loss {result.initial_loss:.4g} -> "
                                f"{result.loss:.4g}"]
        for r, grid in zip(grp, result.grids):
            assert same_grid(grids[r], grid), r
    folded = {r for grp in groups for r in grp}
    assert set(grids) == set(original) and folded < set(grids)
    for r in set(grids) - folded:
        assert same_grid(grids[r], hessian_weighted_grid(weights[r], objectives[r].hessian, 2, sym, group_size)), r
    quiet = method.quantization_parameters(block, original, weights, objectives)  # no progress: the same grids
    assert all(same_grid(quiet[r], grids[r]) for r in grids)


def test_aespa_block_opens_its_progress_tasks(monkeypatch):
    recorder, notes = ProgressRecorder(), []
    monkeypatch.setattr(BlockContext, "progress", lambda self, phase, layer="", total=None: recorder(phase, layer, total))
    monkeypatch.setattr(BlockContext, "note", lambda self, text, block=None: notes.append(text))
    seen = run("opt", monkeypatch)
    groups = aespa_method.zfold_groups(ModelAdapter(random_model("opt", layers=1)).block(0))
    roles = ["q", "k", "v", "o", "up", "down"]
    assert [t["args"] for t in recorder.tasks] == [("qparams", " ".join(g), 2) for g in groups] + \
        [("rounding", " ".join(roles), 7)]
    assert recorder.tasks[-1]["logs"] == [f"{r}: loss 0 at the start, 0 rounded" for r in roles]
    seen["rounding"]["on_step"](3, 0.5)  # rounding's steps move the rounding task
    assert recorder.tasks[-1]["steps"] == [(3, 0.5)]
    assert notes == []  # every Cholesky factor at the damping asked for


@pytest.mark.parametrize("damping,noted", [(0.01, False), (0.01 * (1 + 1e-6), False), (0.01 * (1 + 2e-6), True),
                                           (0.015, True)])
def test_aespa_notes_a_raised_damping_of_its_sweeps(monkeypatch, damping, noted):
    import dataclasses

    notes = []
    monkeypatch.setattr(BlockContext, "note", lambda self, text, block=None: notes.append(text))
    real = gptq_sweep
    monkeypatch.setitem(globals(), "gptq_sweep", lambda *a, **kw: dataclasses.replace(real(*a, **kw), damping=damping))
    run("opt", monkeypatch)
    expected = [f"aespa {r}: Cholesky failed at percdamp=0.01; used {damping:g}" for r in ("q", "k", "v", "o", "up",
                                                                                             "down")]
    assert notes == (expected if noted else [])


def test_gptq_linear_hands_every_option_to_its_grid_search_and_sweep():
    from aespa.core.clip_search import search_grid

    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 32, generator=g)
    x = torch.randn(64, 32, generator=g)
    h = 2 * x.T @ x / 64
    h[:, 3] = h[3, :] = 0  # a dead input channel
    residual = 0.05 * torch.randn(32, 32, generator=g)
    options = {"act_order": True, "static_groups": True, "blocksize": 8, "percdamp": 0.02}
    sweep_kw = {"blocksize": 8, "percdamp": 0.02, "act_order": True, "static_groups": True}

    def quantize(spec, opts, weight=w, hessian=h, r=residual):
        return get_method("gptq")(spec, opts).quantize_linear(weight, hessian, r)

    spec = QuantSpec(bits=3, sym=True, group_size=16)
    # the grid search (stage 1) on the damped Hessian and the dead-zeroed weight, then the sweep
    H, dead = prepare_hessian(h, 0.02)
    grid = search_grid(zero_dead_columns(w, dead), 3, True, 16, mode="mse", hessian=H)
    result = quantize(spec, {**options, "qparam": "mse"})
    expected = gptq_sweep(w, h, grid, bits=3, sym=True, group_size=16, residual=residual, **sweep_kw)
    assert torch.equal(result.weight_q, expected.weight_q) and same_grid(result.grid, expected.grid)
    assert not same_grid(grid, search_grid(zero_dead_columns(w, dead), 3, True, 16, mode="hessian", hessian=H))
    assert not same_grid(grid, search_grid(zero_dead_columns(w, dead), 3, False, 16, mode="mse", hessian=H))
    # the reference's grids: every sweep option reaches the sweep
    plain = quantize(spec, options)
    assert torch.equal(plain.weight_q, gptq_sweep(w, h, None, bits=3, sym=True, group_size=16, residual=residual,
                                                  **sweep_kw).weight_q)
    for change in ({"sym": False}, {"act_order": False}, {"static_groups": False}, {"residual": None}):
        kw = {**sweep_kw, "sym": True, "residual": residual, **change}
        assert not torch.equal(plain.weight_q, gptq_sweep(w, h, None, bits=3, group_size=16, **kw).weight_q), change
    # dynamic groups: the block size changes the grids (groups start inside a block of columns)
    dynamic = quantize(QuantSpec(bits=3, group_size=16), {"blocksize": 8}, r=None)
    assert torch.equal(dynamic.weight_q, gptq_sweep(w, h, None, bits=3, group_size=16, blocksize=8).weight_q)
    assert not torch.equal(dynamic.weight_q, gptq_sweep(w, h, None, bits=3, group_size=16, blocksize=128).weight_q)
    # the search runs in the weight's dtype
    assert quantize(spec, {"qparam": "hessian"}).grid.scale.dtype == torch.float32
    assert quantize(spec, {"qparam": "hessian"}, w.double(), h.double(), residual.double()).grid.scale.dtype == \
        torch.float64


def test_gptq_refinement_gets_the_damped_hessian_and_the_dead_zeroed_residual():
    from aespa.core.scale_refine import refine_grid

    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 32, generator=g)
    x = torch.randn(64, 32, generator=g)
    h = 2 * x.T @ x / 64
    h[:, 3] = h[3, :] = 0
    residual = 0.05 * torch.randn(32, 32, generator=g)
    spec = QuantSpec(bits=3, group_size=16)
    result = get_method("gptq")(spec, {"refine_qparam": True, "n_iters": 2}).quantize_linear(w, h, residual)
    H, dead = prepare_hessian(h, 0.01)
    sweep = gptq_sweep(w, h, None, bits=3, group_size=16, residual=residual)
    weight, grid = refine_grid(zero_dead_columns(w, dead), sweep.weight_q, sweep.grid, H, iters=2,
                               residual=zero_dead_columns(residual, dead))
    assert torch.equal(result.weight_q, weight) and same_grid(result.grid, grid)
    for other in ({"residual": None}, {"iters": 1}):
        kw = {"iters": 2, "residual": zero_dead_columns(residual, dead), **other}
        assert not torch.equal(weight, refine_grid(zero_dead_columns(w, dead), sweep.weight_q, sweep.grid, H,
                                                   **kw)[0]), other
    # no refinement sweeps: the sweep's own grid and weights
    none = get_method("gptq")(spec, {"refine_qparam": True, "n_iters": 0}).quantize_linear(w, h, residual)
    assert torch.equal(none.weight_q, sweep.weight_q) and same_grid(none.grid, sweep.grid)


def test_gptq_refuses_what_it_cannot_refine_and_asks_for_the_fp_stream_only_with_alpha():
    from aespa.core.errors import UserError

    gptq = get_method("gptq")
    with pytest.raises(UserError, match=r"^gptq option method\.refine_qparam=true needs integer weights to refine; "
                                        r"use bits 2\.\.8 or method\.refine_qparam=false$"):
        gptq(QuantSpec(bits=16), {"refine_qparam": True})
    message = (r"^gptq option method\.refine_qparam=true cannot refine act_order's dynamic groups \(not contiguous "
               r"columns\); use method\.static_groups=true or method\.qparam=hessian$")
    dynamic = {"refine_qparam": True, "act_order": True}
    with pytest.raises(UserError, match=message):
        gptq(QuantSpec(bits=3, group_size=16), dynamic)
    gptq(QuantSpec(bits=15), {"refine_qparam": True})
    gptq(QuantSpec(bits=3), dynamic)  # per channel: nothing dynamic
    gptq(QuantSpec(bits=3, group_size=16), {**dynamic, "static_groups": True})
    gptq(QuantSpec(bits=3, group_size=16), {**dynamic, "qparam": "hessian"})
    assert gptq(QuantSpec(bits=3), {}).needs_fp_stream is False
    assert gptq(QuantSpec(bits=3), {"alpha": 0.5}).needs_fp_stream is True
