"""The runner: adapters, block-wise perplexity, RTN, records, bad input, sweeps."""
import json
import os
import subprocess
import sys

import pytest
import torch

from aespa.core.adapters import ModelAdapter
from aespa.core.errors import UserError
from aespa.core.evaluation import perplexity
from aespa.core.method import QuantSpec, get_method
from aespa.core.pipeline import quantize_model
from experiments.data import calibration_windows, evaluation_windows
from experiments.runner import run
from tests.conftest import REPO, compose

FAST = ["nsamples=4", "eval.max_windows=8", "progress=false"]


def test_adapters_describe_both_families(tiny_opt, tiny_llama):
    opt, llama = ModelAdapter(tiny_opt[0]), ModelAdapter(tiny_llama[0])
    assert opt.family.name == "opt" and llama.family.name == "llama"
    assert list(opt.block(0).linears()) == ["q", "k", "v", "o", "up", "down"]
    assert list(llama.block(0).linears()) == ["q", "k", "v", "o", "gate", "up", "down"]
    assert opt.block(0).linear("up") is tiny_opt[0].model.decoder.layers[0].fc1
    assert llama.block(3).linear("down") is tiny_llama[0].model.layers[3].mlp.down_proj
    assert (opt.geometry.num_heads, opt.geometry.num_kv_heads, opt.geometry.head_dim, opt.geometry.rotary) == (4, 4, 64, False)
    assert (llama.geometry.num_heads, llama.geometry.num_kv_heads, llama.geometry.head_dim) == (8, 2, 32)
    assert llama.geometry.rotary and llama.geometry.kv_group == 4
    assert [g.feeder for g in llama.block(0).groups] == ["attn_norm", "v", "mlp_norm", "up"]
    assert type(llama.block(0).norm("attn_norm")).__name__ == "LlamaRMSNorm"


@pytest.mark.parametrize("fixture", ["tiny_opt", "tiny_llama"])
def test_blockwise_perplexity_equals_the_models_own_loss(fixture, request):
    model, tok = request.getfixturevalue(fixture)
    windows = evaluation_windows("wikivital", tok, 512)[:6]
    with torch.no_grad():
        ref = torch.stack([model(w[None], labels=w[None]).loss for w in windows]).mean().exp().item()
    ours = perplexity(ModelAdapter(model), windows, "cpu", batch_size=4, progress=False)
    assert ours == pytest.approx(ref, rel=1e-4)


def test_pipeline_with_no_method_and_rtn_levels(tiny_opt):
    from tests.conftest import load

    model, tok = load("tiny-opt")
    adapter = ModelAdapter(model)
    windows = evaluation_windows("wikivital", tok, 512)[:16]
    calib = calibration_windows("wikivital", tok, 4, 512, 0)
    fp = perplexity(adapter, windows, "cpu", progress=False)
    quantize_model(adapter, get_method("none")(QuantSpec(bits=4)), calib, "cpu", progress=False)
    assert perplexity(adapter, windows, "cpu", progress=False) == fp
    original = {k: v.clone() for k, v in model.state_dict().items()}
    ppl = {}
    for bits in (8, 4, 2):
        model.load_state_dict(original)
        quantize_model(adapter, get_method("rtn")(QuantSpec(bits=bits)), calib, "cpu", progress=False)
        ppl[bits] = perplexity(adapter, windows, "cpu", progress=False)
    assert abs(ppl[8] / fp - 1) < 0.01
    assert ppl[4] < 1.05 * fp and ppl[2] > 1.3 * ppl[4]


def test_record_schema_and_determinism(tmp_path):
    cfg = compose("method=rtn", "bits=3", f"results_dir={tmp_path}", "force=true", *FAST)
    a = run(cfg)
    b = run(cfg)
    assert a["metrics"]["ppl"]["wikivital"] == b["metrics"]["ppl"]["wikivital"]
    files = list(tmp_path.glob("*.json"))
    assert [f.name for f in files] == [f"{a['run_id']}.json"]
    rec = json.loads(files[0].read_text())
    for key in ("schema", "run_id", "status", "model", "family", "method", "w_bits", "a_bits", "group_size", "sym",
                "seed", "calib", "metrics", "time", "memory", "env", "config", "created", "notes"):
        assert key in rec, key
    assert rec["model"] == "tiny-opt" and rec["method"] == "rtn" and rec["w_bits"] == 3
    assert rec["calib"] == {"dataset": "wikivital", "nsamples": 4, "seqlen": 512}
    assert rec["time"]["quantize_s"] > 0 and rec["memory"]["peak_rss_bytes"] > 0
    assert {"torch", "transformers", "git_commit", "device", "device_name"} <= set(rec["env"])
    assert rec["config"]["bits"] == 3 and rec["config"]["method"]["name"] == "rtn"


def test_existing_record_is_skipped(tmp_path, capsys):
    cfg = compose("method=rtn", "bits=4", f"results_dir={tmp_path}", *FAST)
    first = run(cfg)
    mtime = os.path.getmtime(tmp_path / f"{first['run_id']}.json")
    again = run(cfg)
    assert "skip:" in capsys.readouterr().out
    assert again["run_id"] == first["run_id"] and os.path.getmtime(tmp_path / f"{first['run_id']}.json") == mtime


@pytest.mark.parametrize("override,message", [
    ("bits=9", "bits=9 is not allowed; use one of 2, 3, 4, 5, 6, 7, 8, 16"),
    ("act_bits=3", "act_bits=3 is not allowed; use one of 4, 5, 6, 7, 8, 16"),
    ("act_bits=4", "is weight-only"),
    ("group_size=100", "does not divide the input width 256"),
    ("nsamples=0", "nsamples=0 is not allowed; use an integer >= 1"),
    ("seqlen=4096", "exceeds the model's context of 1024"),
    ("model.path=/no/such/model", "does not exist"),
    ("eval.datasets=[wiki103]", "unknown dataset 'wiki103'"),
    ("calib.dataset=pile", "calib.dataset='pile' is not allowed; use one of c4, wikitext2, wikivital"),
    ("device=cuda", "CUDA is not available"),
    ("dtype=int8", "dtype='int8' is not allowed; use one of auto, float16"),
])
def test_bad_input_is_one_clear_error_and_no_record(override, message, tmp_path):
    if override == "device=cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    method = "method=gptq" if override.startswith("act_bits=4") else "method=rtn"
    cfg = compose(method, f"results_dir={tmp_path}", *FAST, override)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(".", r"\.")):
        run(cfg)
    assert not list(tmp_path.iterdir())


def _cli(*args, cwd=REPO):
    env = dict(os.environ, HYDRA_FULL_ERROR="0", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "run.py", *args], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=600)


def test_cli_bad_input_exits_nonzero_with_one_line(tmp_path):
    out = _cli("model=opt-7b", f"results_dir={tmp_path}")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [out.stderr.strip()] and "allowed: llama-13b" in out.stderr
    out = _cli("bits=1", f"results_dir={tmp_path}", *FAST)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == "error: bits=1 is not allowed; use one of 2, 3, 4, 5, 6, 7, 8, 16"
    assert not list(tmp_path.iterdir())


def test_multirun_sweep_writes_one_record_per_job(tmp_path):
    out = _cli("-m", "method=rtn,gptq", "bits=3,4", f"results_dir={tmp_path}", f"hydra.sweep.dir={tmp_path}/sweep",
               *FAST)
    assert out.returncode == 0, out.stderr[-2000:]
    recs = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert sorted((r["method"], r["w_bits"]) for r in recs) == [("gptq", 3), ("gptq", 4), ("rtn", 3), ("rtn", 4)]
    assert len({r["run_id"] for r in recs}) == 4
