"""Architecture twins (experiments/twins.py): every paper model config carries the facts of its
real architecture; its reduced twin (2 blocks, a few heads' width, 64-token windows) keeps every
feature, runs end to end through the runner (RTN, GPTQ, aespa, OmniQuant, evaluation), writes a
record and resumes after a kill; OPT-350M's post-LayerNorm family evaluates block by block
exactly as the model's own loss; and the twin's mistakes are one line each."""
import glob
import math
import os

import pytest
import torch
import yaml

import run as run_py
from aespa.core.adapters import ModelAdapter
from aespa.core.evaluation import perplexity
from aespa.core.method import QuantSpec, get_method
from aespa.core.pipeline import quantize_model
from experiments import records, twins
from experiments.data import DataCache, calibration_windows, evaluation_windows
from experiments.runner import run
from tests.conftest import REPO, compose

CONFIGS = {os.path.basename(p)[:-5]: yaml.safe_load(open(p)) for p in sorted(glob.glob(f"{REPO}/conf/model/*.yaml"))}
PAPER_MODELS = sorted(name for name, cfg in CONFIGS.items() if "arch" in cfg)
VOCAB = 8192  # the project's tokenizer (assets/tokenizer)
LLAMA3_ROPE = ("++model.arch.rope_scaling={rope_type:llama3,factor:8.0,low_freq_factor:1.0,high_freq_factor:4.0,"
               "original_max_position_embeddings:8192}", "model.arch.max_position_embeddings=131072")
# one twin per distinct set of architecture features: (model config, extra overrides)
FEATURES = {
    "opt-preln": ("opt-1.3b", ()),
    "opt-postln": ("opt-350m", ()),                        # post-LayerNorm, 512 <-> 1024 projection
    "llama-mha": ("llama-2-7b", ()),
    "llama-gqa": ("llama-2-70b", ()),                      # 64 heads / 8 kv-heads
    "llama3-rope-scaling": ("llama-3-8b", LLAMA3_ROPE),    # untied, GQA, rope type llama3 (Llama-3.1's)
    "mistral-sliding": ("mistral-7b", ("++model.arch.sliding_window=16",)),  # a window shorter than the context
}
METHOD_KNOBS = {"rtn": (), "gptq": (), "aespa": ("method.iters=5", "method.zfold_rounds=1"),
                "omniquant": ("method.epochs=1",)}


def narrow(name: str) -> int:
    """A twin width of head dimension 4 (even, for RoPE) that keeps every head."""
    return 4 * CONFIGS[name]["arch"]["num_attention_heads"]


def twin_overrides(name: str, tmp_path, *extra: str) -> list[str]:
    return [f"model={name}", "model.twin=true", f"model.twin_hidden={narrow(name)}", "seqlen=64", "nsamples=4",
            "calib=wikivital", "eval.datasets=[wikivital]", "eval.max_windows=2", "progress=false", "bits=3",
            f"results_dir={tmp_path}/runs", f"checkpoint_dir={tmp_path}/ckpt", *extra]


def twin_model(name: str, *extra: str, seed: int = 0):
    cfg = compose(f"model={name}", "model.twin=true", f"model.twin_hidden={narrow(name)}", *extra)
    return twins.build_twin(cfg.model, seed)


# --------------------------------------------------------------------------- the facts


def test_every_model_config_is_a_paper_model_with_facts_or_an_embedded_folder():
    assert "opt-350m" in PAPER_MODELS and len(PAPER_MODELS) == 18
    for name, cfg in CONFIGS.items():
        local = os.path.isdir(os.path.join(REPO, cfg["path"]))
        assert local != ("arch" in cfg), name  # the embedded models are folders; every other has its facts


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_architecture_config_is_the_real_model(name):
    """architecture_config builds the full-size architecture (on the meta device here): its
    parameter count is the model's size, its geometry the facts'."""
    from transformers import AutoModelForCausalLM

    arch = CONFIGS[name]["arch"]
    config = twins.architecture_config(CONFIGS[name])
    assert config.model_type == arch["model_type"] and config.num_hidden_layers == arch["num_hidden_layers"]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters()) / 1e9
    assert params == pytest.approx(CONFIGS[name]["size_b"], rel=0.1)
    adapter = ModelAdapter(model)
    assert adapter.geometry.num_heads == arch["num_attention_heads"]
    assert adapter.geometry.num_kv_heads == arch.get("num_key_value_heads", arch["num_attention_heads"])
    assert adapter.family.name == {"opt": "opt-postln" if not arch.get("do_layer_norm_before", True) else "opt",
                                   "llama": "llama", "mistral": "llama"}[arch["model_type"]]


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_reduced_twin_keeps_every_feature(name):
    arch = CONFIGS[name]["arch"]
    model, tok = twin_model(name)
    c, geo = model.config, ModelAdapter(model).geometry
    heads, kv = arch["num_attention_heads"], arch.get("num_key_value_heads", arch["num_attention_heads"])
    assert (c.num_hidden_layers, c.hidden_size, c.vocab_size, len(tok)) == (2, narrow(name), VOCAB, VOCAB)
    assert (geo.num_heads, geo.num_kv_heads, geo.head_dim) == (heads, kv, 4)
    assert len(ModelAdapter(model).blocks) == 2
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == arch["tie_word_embeddings"]
    if arch["model_type"] == "opt":
        assert c.do_layer_norm_before == arch["do_layer_norm_before"]
        assert c.word_embed_proj_dim * arch["hidden_size"] == arch["word_embed_proj_dim"] * c.hidden_size
        assert (model.model.decoder.project_in is None) == (arch["word_embed_proj_dim"] == arch["hidden_size"])
        assert (model.model.decoder.final_layer_norm is None) == (not arch["do_layer_norm_before"])
        assert model.model.decoder.layers[0].fc1.out_features == 4 * c.hidden_size
    else:
        assert c.rope_parameters["rope_theta"] == arch["rope_theta"]
        assert c.rope_parameters["rope_type"] == (arch["rope_scaling"] or {}).get("rope_type", "default")
        assert getattr(c, "sliding_window", None) == arch.get("sliding_window")
        inter = model.model.layers[0].mlp.up_proj.out_features
        assert inter == round(arch["intermediate_size"] * c.hidden_size / arch["hidden_size"])
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["opt-350m", "llama-3-8b"])
def test_the_same_seed_builds_the_same_twin_bit_for_bit(name):
    a, b, other = (twin_model(name, seed=seed)[0].state_dict() for seed in (0, 0, 1))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    q = next(k for k in a if "q_proj.weight" in k)
    assert not torch.equal(a[q], other[q])


def test_llama3_rope_scaling_reaches_the_twin():
    model, _ = twin_model("llama-3-8b", *LLAMA3_ROPE)
    rope = model.config.rope_parameters
    assert (rope["rope_type"], rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]) == \
        ("llama3", 8.0, 1.0, 4.0)
    plain, _ = twin_model("llama-3-8b")
    assert not torch.equal(model.model.rotary_emb.inv_freq, plain.model.rotary_emb.inv_freq)


# --------------------------------------------------------------------------- block-wise evaluation


def sharpened(model, windows):
    """The twin with its output embedding scaled so the logits' spread is 3: confident
    predictions, so a perplexity far from a uniform guess that any mistake in the block-wise path
    would move (a random twin's logits are nearly flat)."""
    with torch.no_grad():
        spread = model(windows[:1]).logits.std().item()
        model.get_output_embeddings().weight.mul_(3 / spread)
    return model


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_blockwise_perplexity_equals_the_models_own_loss(feature):
    name, extra = FEATURES[feature]
    model, tok = twin_model(name, *extra)
    windows = evaluation_windows("wikivital", tok, 64)[:6]
    model = sharpened(model, windows)
    with torch.no_grad():
        ref = torch.stack([model(w[None], labels=w[None]).loss for w in windows]).mean().exp().item()
    ours = perplexity(ModelAdapter(model), windows, "cpu", batch_size=4, progress=False)
    assert ours == pytest.approx(ref, rel=1e-4)
    assert ours > 4 * VOCAB  # far from a uniform guess: the comparison has teeth
    if feature == "mistral-sliding":  # the window is live: without it the same weights predict otherwise
        full, _ = twin_model(name)
        full.load_state_dict(model.state_dict())
        assert perplexity(ModelAdapter(full), windows, "cpu", batch_size=4, progress=False) != pytest.approx(ours)


def test_gptq_layer_loss_is_below_rtns_on_the_twins():
    """Block 0 of the GQA and the post-LayerNorm twins: tr(ΔW H ΔWᵀ) of every linear, H from the
    full-precision inputs (the same for both methods), is lower with GPTQ than with RTN."""
    for name in ("llama-2-70b", "opt-350m"):
        model, tok = twin_model(name)
        adapter = ModelAdapter(model)
        calibration = calibration_windows("wikivital", tok, 4, 64, 0, DataCache(os.path.join(REPO, ".cache", "data")))
        original = {k: v.clone() for k, v in model.state_dict().items()}
        hessians, hooks = {}, []
        for role, linear in adapter.block(0).linears().items():
            def hook(module, args, output, role=role):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                hessians[role] = hessians.get(role, 0) + x.T @ x
            hooks.append(linear.register_forward_hook(hook))
        with torch.no_grad():
            model(calibration)
        for h in hooks:
            h.remove()
        loss = {}
        for method in ("rtn", "gptq"):
            model.load_state_dict(original)
            quantize_model(adapter, get_method(method)(QuantSpec(bits=3)), calibration, "cpu", progress=False)
            for role, linear in adapter.block(0).linears().items():
                delta = linear.weight.double() - original[f"{adapter.family.blocks}.0.{adapter.family.linears[role]}.weight"]
                loss[method, role] = torch.trace(delta @ hessians[role] @ delta.T).item()
        for role in hessians:
            assert loss["gptq", role] < loss["rtn", role], (name, role, loss["gptq", role], loss["rtn", role])


# --------------------------------------------------------------------------- end to end


def check_record(record: dict, name: str, tmp_path) -> None:
    assert record["status"] == "ok" and record["model"] == f"{name}-twin"
    assert record["model_fingerprint"].startswith("twin:")
    assert record["twin"] == {"layers": 2, "hidden": narrow(name), "vocab": VOCAB}
    assert os.path.exists(tmp_path / "runs" / f"{record['run_id']}.json")
    ppl = record["metrics"]["ppl"]["wikivital"]
    assert math.isfinite(ppl) and 0.5 * VOCAB < ppl < 2 * VOCAB  # a random model: about a uniform guess


class Stop(Exception):
    """Stands for a kill in the middle of a block."""


def killed_in_block_1(monkeypatch, method: str):
    """The registered ``method`` raises Stop when the pipeline reaches block 1; returns the undo."""
    method_cls = get_method(method)
    quantize_block = method_cls.quantize_block

    def stop_in_block_1(self, ctx):
        if ctx.index == 1:
            raise Stop
        quantize_block(self, ctx)

    monkeypatch.setattr(method_cls, "quantize_block", stop_in_block_1)
    return lambda: monkeypatch.setattr(method_cls, "quantize_block", quantize_block)


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_every_paper_model_twin_runs_rtn_is_killed_resumes_and_records(name, tmp_path, monkeypatch):
    """RTN and evaluation end to end: stopped in block 1 (no record), rerun, resumed at block 1,
    recorded; the record is a twin's, under another run id than the real model's."""
    from omegaconf import OmegaConf

    cfg = compose(*twin_overrides(name, tmp_path, "method=rtn"))
    undo = killed_in_block_1(monkeypatch, "rtn")
    with pytest.raises(Stop):
        run(cfg)
    assert not list((tmp_path / "runs").glob("*.json"))
    undo()
    record = run(cfg)
    check_record(record, name, tmp_path)
    assert "resumed at block 1 of 2" in record["notes"]
    assert record["family"] == ("opt-postln" if name == "opt-350m" else name.split("-")[0].replace("mistral", "llama"))
    real = compose(*twin_overrides(name, tmp_path, "method=rtn", "model.twin=false"))
    assert records.run_id(OmegaConf.to_container(real, resolve=True)) != record["run_id"]


@pytest.mark.slow
@pytest.mark.parametrize("name", PAPER_MODELS)
def test_every_paper_model_twin_runs_gptq_and_omniquant(name, tmp_path):
    ppl = {}
    for method in ("gptq", "omniquant"):
        record = run(compose(*twin_overrides(name, tmp_path, f"method={method}", *METHOD_KNOBS[method])))
        check_record(record, name, tmp_path)
        ppl[method] = record["metrics"]["ppl"]["wikivital"]
    assert ppl["gptq"] != ppl["omniquant"]


@pytest.mark.slow
@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_aespa_runs_on_every_feature_set(feature, tmp_path):
    """aespa (5 rounding steps, one Z-Fold round) on each distinct architecture: its statistics
    (post-RoPE covariances, GQA, sliding-window attention probabilities), Z-Fold where ζ folds."""
    name, extra = FEATURES[feature]
    if feature == "llama-gqa":  # 64 heads: head dimension 2 keeps the clipping search of its MLP short
        extra = (*extra, "model.twin_hidden=128")
    record = run(compose(*twin_overrides(name, tmp_path, "method=aespa", *METHOD_KNOBS["aespa"], *extra)))
    assert record["status"] == "ok" and math.isfinite(record["metrics"]["ppl"]["wikivital"])
    assert set(record["time"]["phases"]) == {"statistics", "qparams", "optq_init", "rounding"}


@pytest.mark.slow
@pytest.mark.parametrize("feature,method", [("opt-postln", "aespa"), ("llama-gqa", "gptq"),
                                            ("mistral-sliding", "omniquant")])
def test_a_killed_twin_resumes_to_the_uninterrupted_result(feature, method, tmp_path, monkeypatch):
    """Stopped in block 1, rerun: it resumes at block 1 and ends with the perplexity of a run
    that was never stopped (the twin is rebuilt from the same seed)."""
    name, extra = FEATURES[feature]
    args = ["method=" + method, *METHOD_KNOBS[method], *extra]
    whole = run(compose(*twin_overrides(name, tmp_path / "whole", *args)))
    undo = killed_in_block_1(monkeypatch, method)
    with pytest.raises(Stop):
        run(compose(*twin_overrides(name, tmp_path / "killed", *args)))
    undo()
    resumed = run(compose(*twin_overrides(name, tmp_path / "killed", *args)))
    assert "resumed at block 1 of 2" in resumed["notes"]
    assert resumed["run_id"] == whole["run_id"]
    assert resumed["metrics"]["ppl"] == whole["metrics"]["ppl"]


# --------------------------------------------------------------------------- OPT-350M's refusals, bad input


def cli(capsys, *args: str) -> tuple[int, str]:
    code = run_py.cli(list(args))
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err[-3000:]
    return lines[0]


@pytest.mark.parametrize("overrides,expected", [
    (["method=smoothquant", "act_bits=8"], "smoothquant folds a transform into the norms that feed q/k/v and fc1"),
    (["method=omniquant", "method.let=true"], "omniquant's LET (method.let=true) folds a transform"),
    (["method=qllm", "act_bits=8"], "qllm's channel reassembly folds a transform"),
])
def test_opt_350m_refuses_what_folds_into_a_norm_before_any_weight_loads(overrides, expected, tmp_path, capsys,
                                                                         monkeypatch):
    def no_building(*args, **kwargs):
        raise AssertionError("the twin was built before the check")

    monkeypatch.setattr(twins, "build_twin", no_building)
    code, err = cli(capsys, *twin_overrides("opt-350m", tmp_path), *overrides)
    line = one_line(err)
    assert code == 2 and expected in line and "opt-postln" in line and "q, k, v, up read the residual stream" in line
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").glob("*.json"))


@pytest.mark.slow
@pytest.mark.parametrize("args", [
    ("method=zfold", "method.zfold_rounds=1"), ("method=boa",), ("method=turboboa", "method.n_quant_rows=4"),
    ("method=brecq", "method.iters=5"), ("method=qllm", "act_bits=4", "method.reassembly=false", "method.epochs=1"),
    ("method=rtn", "act_bits=4"),
], ids=["zfold", "boa", "turboboa", "brecq", "qllm-eec-only", "rtn-w4a4"])
def test_the_other_methods_run_on_opt_350m(args, tmp_path):
    """Every method that needs only the linears' inputs runs on the post-LayerNorm family."""
    record = run(compose(*twin_overrides("opt-350m", tmp_path, *args)))
    check_record(record, "opt-350m", tmp_path)


def test_opt_350m_omniquant_auto_is_lwc_only(tmp_path):
    record = run(compose(*twin_overrides("opt-350m", tmp_path, "method=omniquant", "method.epochs=1", "act_bits=8")))
    check_record(record, "opt-350m", tmp_path)
    assert record["a_bits"] == 8
    block = ModelAdapter(twin_model("opt-350m")[0]).block(0)
    assert not get_method("omniquant")(QuantSpec(bits=3, act_bits=8)).uses_let(block)
    assert get_method("omniquant")(QuantSpec(bits=3, act_bits=8)).uses_let(ModelAdapter(twin_model("opt-125m")[0]).block(0))


@pytest.mark.parametrize("overrides,expected", [
    (["model=tiny-opt", "model.twin=true"], ["model.twin=true", "model.path=assets/tiny-opt is a local model folder"]),
    (["model=opt-1.3b", "model.twin=true", "model.twin_hidden=100"],
     ["model.twin_hidden=100 breaks the head geometry of opt-1.3b", "multiple of 32", "model.twin_hidden=96"]),
    (["model=llama-3-8b", "model.twin=true", "model.twin_hidden=96"],
     ["model.twin_hidden=96 breaks the head geometry", "multiple of 64 (an even head dimension for RoPE)"]),
    (["model=llama-3-8b", "model.twin=true", "model.arch.num_key_value_heads=5"],
     ["model.arch: num_attention_heads=32 is not a multiple of num_key_value_heads=5"]),
    (["model=opt-125m", "~model.arch", "model.twin=true"],
     ["model 'opt-125m' has no architecture facts (model.arch)", "model.twin=true cannot build it"]),
    (["model=opt-125m", "model.twin=true", "model.twin_layers=13"], ["model.twin_layers=13", "use 1..12"]),
    (["model=opt-125m", "model.twin=true", "model.twin_hidden=1536"], ["model.twin_hidden=1536 is wider than opt-125m"]),
    (["model=opt-125m", "model.twin=yes"], ["model.twin='yes'", "true or false"]),
])
def test_twin_mistakes_are_one_line_before_anything_loads(overrides, expected, tmp_path, capsys):
    args = ["method=rtn", "calib=wikivital", "eval.datasets=[wikivital]", "progress=false",
            f"results_dir={tmp_path}/runs", f"checkpoint_dir={tmp_path}/ckpt", *overrides]
    code, err = cli(capsys, *args)
    line = one_line(err)
    assert code == 2
    for text in expected:
        assert text in line, (text, line)
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").glob("*.json"))
