"""Export (``save=true``): compressed-tensors pack-quantized folders that reload, in a fresh
process, as the model the run evaluated; Z-Fold's ζ folded; compressed-tensors' own
decompressor reads our integers; refusals before the model loads; the record kept when an
export fails.

The fast cases run on reduced budgets (4 calibration windows and 8 test windows of 128 tokens,
aespa and Z-FOLD with one ζ round and 10 rounding iterations), each quantized once per module
and all reloaded in one fresh process. The full matrix of the issue (every weight-only method
x both tiny models x 2/3/4 bits x per-channel/g32, at the models' 512-token windows) is
``test_export_matrix``: only with ``AESPA_EXPORT_MATRIX=1`` (about an hour on one CPU thread);
with ``-s`` it prints the acceptance table."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from aespa.core.adapters import ModelAdapter
from aespa.core.errors import UserError
from aespa.core.evaluation import perplexity
from aespa.core.grid import Grid, minmax_grid
from aespa.core.pipeline import QuantizeResult
from aespa.method import zfold_groups
from experiments import export
from experiments.data import evaluation_windows
from experiments.export import ExportError, check_exportable, pack_rows, save_quantized, unpack_rows
from experiments.runner import run
from tests.conftest import REPO, compose, load

SEQLEN, WINDOWS = 128, 8
BUDGET = ["nsamples=4", f"seqlen={SEQLEN}", f"eval.max_windows={WINDOWS}", "progress=false", "resume=false"]
RUNS = {  # name -> overrides (weight-only runs: the reload must give the record's perplexity)
    "rtn-opt-w4": ["method=rtn", "bits=4"],
    "gptq-llama-w3-g32-act-order": ["model=tiny-llama", "method=gptq", "bits=3", "group_size=32",
                                    "method.act_order=true", "method.static_groups=true"],
    "omniquant-opt-w2-g32": ["method=omniquant", "bits=2", "group_size=32", "method.epochs=1"],
    "rtn-llama-w4-sym": ["model=tiny-llama", "method=rtn", "bits=4", "sym=true"],
    # the default method: q, k and v share one ζ tensor (the old crash); ζ folded into the norms and fc1
    "aespa-opt-w2-g32": ["method=aespa", "bits=2", "group_size=32", "method.iters=10", "method.zfold_rounds=1"],
    "zfold-llama-w3-g32": ["model=tiny-llama", "method=zfold", "bits=3", "group_size=32", "method.zfold_rounds=1"],
    "turboboa-llama-w2-g32": ["model=tiny-llama", "method=turboboa", "bits=2", "group_size=32"],
}
FOLDED = ("aespa-opt-w2-g32", "zfold-llama-w3-g32", "zeta-opt-w3", "zeta-llama-w2-g32")
ZETA = {  # name -> (model, bits, group_size): grids with a random ζ on every Z-Fold group
    "zeta-opt-w3": ("tiny-opt", 3, -1),
    "zeta-llama-w2-g32": ("tiny-llama", 2, 32),
}
RELOAD = """
import json, sys
import torch
from transformers import AutoModelForCausalLM
from aespa.core.adapters import ModelAdapter
from aespa.core.evaluation import perplexity

out = {}
for folder, windows in json.loads(sys.argv[1]).items():
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    out[folder] = perplexity(ModelAdapter(model), torch.load(windows), "cpu", progress=False)
print(json.dumps(out))
"""


def fresh_env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}


def reload_in_fresh_process(jobs: dict[str, str]) -> dict[str, float]:
    """Perplexity of each folder, loaded with plain ``from_pretrained`` in a new process, on
    the windows saved at ``jobs[folder]``."""
    out = subprocess.run([sys.executable, "-c", RELOAD, json.dumps(jobs)], capture_output=True, text=True,
                         cwd=REPO, env=fresh_env(), timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def windows_file(tmp, name: str, tokenizer, seqlen: int = SEQLEN, count: int | None = WINDOWS) -> tuple[str, torch.Tensor]:
    windows = evaluation_windows("wikivital", tokenizer, seqlen)
    windows = windows if count is None else windows[:count]
    path = os.path.join(tmp, f"{name}.windows.pt")
    torch.save(windows, path)
    return path, windows


def zeta_quantized(model_name: str, bits: int, group_size: int, seed: int = 0, zeta: bool = True):
    """The model with every linear on a min-max grid; with ``zeta``, the linears of each Z-Fold
    group (``aespa.method.zfold_groups``) share a random ζ in [0.5, 2] (``Grid.col_scale``), as
    aespa and Z-FOLD leave them. Returns the model, its tokenizer and the QuantizeResult."""
    model, tokenizer = load(model_name)
    adapter = ModelAdapter(model)
    generator = torch.Generator().manual_seed(seed)
    result = QuantizeResult()
    with torch.no_grad():
        for i in range(len(adapter.blocks)):
            block = adapter.block(i)
            zetas = {}
            for roles in zfold_groups(block) if zeta else ():
                shared = 0.5 + 1.5 * torch.rand(block.linear(roles[0]).in_features, generator=generator)
                zetas.update({role: shared for role in roles})  # one tensor, as aespa shares it
            for role, linear in block.linears().items():
                w = linear.weight.float()
                z = zetas.get(role)
                grid = minmax_grid(w if z is None else w / z, bits, False, group_size)
                grid.col_scale = z
                linear.weight.copy_(grid.fake_quantize(w))
                result.grids[f"{i}.{role}"] = grid
    return model, tokenizer, result


# --------------------------------------------------------------------------- the fast cases


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    """Every fast case quantized and saved; then all reloaded in one fresh process.
    name -> {folder, in_memory, reloaded, record}."""
    tmp = str(tmp_path_factory.mktemp("export"))
    cases = {}
    windows_path, windows = windows_file(tmp, "wikivital", tokenizer)
    for name, overrides in RUNS.items():
        folder = os.path.join(tmp, name)
        record = run(compose(*overrides, *BUDGET, "save=true", f"save_dir={folder}", f"results_dir={tmp}/runs"))
        cases[name] = {"folder": folder, "in_memory": record["metrics"]["ppl"]["wikivital"], "record": record}
    for name, (model_name, bits, group_size) in ZETA.items():
        folder = os.path.join(tmp, name)
        model, tok, result = zeta_quantized(model_name, bits, group_size)
        cfg = compose(f"model={model_name}", "method=zfold", f"bits={bits}", f"group_size={group_size}", *BUDGET)
        save_quantized(model, tok, result, cfg, folder)
        in_memory = perplexity(ModelAdapter(model), windows, "cpu", progress=False)
        cases[name] = {"folder": folder, "in_memory": in_memory, "record": None}
    reloaded = reload_in_fresh_process({c["folder"]: windows_path for c in cases.values()})
    for case in cases.values():
        case["reloaded"] = reloaded[case["folder"]]
    return cases


@pytest.mark.parametrize("name", list(RUNS) + list(ZETA))
def test_reload_in_a_fresh_process_gives_the_evaluated_perplexity(saved, name):
    case = saved[name]
    assert case["reloaded"] == pytest.approx(case["in_memory"], rel=1e-5), case


@pytest.mark.parametrize("name", list(RUNS) + list(ZETA))
def test_folder_is_a_compressed_tensors_checkpoint_of_packed_integers(saved, name):
    folder = saved[name]["folder"]
    config = json.load(open(os.path.join(folder, "config.json")))["quantization_config"]
    weights = config["config_groups"]["group_0"]["weights"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert config["dequantize"] is True and config["version"] == export.COMPRESSED_TENSORS_VERSION
    assert config["ignore"] == ["lm_head"] and "input_activations" not in config["config_groups"]["group_0"]
    assert weights["symmetric"] == ("sym" in name)
    sizes = linear_sizes(folder, weights["num_bits"])
    assert sizes["layers"] == (24 if "opt" in name else 28)
    assert sizes["packed"] <= weights["num_bits"] / 16 * sizes["fp16"]  # the integers: bits/16 of fp16
    assert sizes["scales"] <= (4 + weights["num_bits"] / 8) * sizes["groups"] + 4 * sizes["layers"] * 8
    assert os.path.exists(os.path.join(folder, "README.md")) and os.path.exists(os.path.join(folder, "tokenizer.json"))
    card = open(os.path.join(folder, "README.md")).read()
    assert ("folded into the norms" in card) == (name in FOLDED)  # ζ folded: no per-column factor stored
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "col_scale" in k]


@pytest.mark.parametrize("name", list(RUNS) + list(ZETA))
def test_compressed_tensors_decompressor_reads_the_saved_integers(saved, name):
    assert compressed_tensors_readback(saved[name]["folder"]) == (24 if "opt" in name else 28)


def compressed_tensors_readback(folder: str) -> int:
    """compressed-tensors' own decompressor on every packed linear of ``folder`` gives our
    integers (codes and zero points, :func:`unpack_rows`) and the weight ``(codes - zero) *
    scale``; returns the number of linears checked."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationScheme

    config = json.load(open(os.path.join(folder, "config.json")))["quantization_config"]
    scheme = QuantizationScheme.model_validate(config["config_groups"]["group_0"])
    compressor = BaseCompressor.get_value_from_registry("pack-quantized")
    bits, offset = scheme.weights.num_bits, 2 ** (scheme.weights.num_bits - 1)
    checked = 0
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for name in sorted(k[: -len(".weight_packed")] for k in keys if k.endswith(".weight_packed")):
            stored = {k: f.get_tensor(f"{name}.{k}") for k in ("weight_packed", "weight_scale", "weight_zero_point",
                                                               "weight_shape") if f"{name}.{k}" in keys}
            out_features, in_features = stored["weight_shape"].tolist()
            codes = unpack_rows(stored["weight_packed"], bits, in_features)
            theirs = unpack_from_int32(stored["weight_packed"], bits, (out_features, in_features))
            assert torch.equal(theirs.long() + offset, codes), name  # their signed integers are ours - 2^(b-1)
            back = compressor.decompress(stored, scheme)
            if scheme.weights.symmetric:
                zero = torch.full_like(stored["weight_scale"], offset, dtype=torch.int64)
            else:
                zero = unpack_rows(stored["weight_zero_point"].T, bits, out_features).T
                assert torch.equal(back["weight_zero_point"].long() + offset, zero), name
            scale = stored["weight_scale"]
            per_group = in_features // scale.shape[1]
            expected = (codes - zero.repeat_interleave(per_group, 1)).to(scale.dtype) * scale.repeat_interleave(
                per_group, 1)
            assert torch.equal(back["weight"], expected), name
            checked += 1
    return checked


def linear_sizes(folder: str, bits: int) -> dict:
    """Bytes of the quantized linears in the folder: packed integers, scales + zero points,
    and what the same weights take in fp16."""
    sizes = {"packed": 0, "scales": 0, "fp16": 0, "groups": 0, "layers": 0}
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            if key.endswith(".weight_shape"):
                sizes["fp16"] += 2 * int(t[0]) * int(t[1])
                sizes["layers"] += 1
            elif key.endswith(".weight_packed"):
                sizes["packed"] += t.numel() * 4
            elif key.endswith((".weight_scale", ".weight_zero_point")):
                sizes["scales"] += t.numel() * t.element_size()
                sizes["groups"] += t.numel() if key.endswith("scale") else 0
    return sizes


def test_run_py_on_the_saved_folder_prints_the_perplexity(saved, tmp_path):
    """``python run.py model.path=<folder> method=none``: the saved model (ζ folded) evaluated
    through the command line, the same windows."""
    case = saved["zeta-llama-w2-g32"]
    out = subprocess.run([sys.executable, "run.py", "model=tiny-llama", f"model.path={case['folder']}", "method=none",
                          f"seqlen={SEQLEN}", f"eval.max_windows={WINDOWS}", "progress=false",
                          f"results_dir={tmp_path}"], capture_output=True, text=True, cwd=REPO, env=fresh_env(),
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"perplexity: wikivital {case['in_memory']:.3f}" in out.stdout
    record = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert record["metrics"]["ppl"]["wikivital"] == pytest.approx(case["in_memory"], rel=1e-5)


def test_model_card_names_the_run(saved):
    case = saved["gptq-llama-w3-g32-act-order"]
    card = open(os.path.join(case["folder"], "README.md")).read()
    record = case["record"]
    for text in ("tiny-llama", "`gptq`", "act_order=True", "3 bits, groups of 32 input columns, asymmetric",
                 "wikivital, 4 windows of 128 tokens, seed 0", f"wikivital {record['metrics']['ppl']['wikivital']:.4f}",
                 record["run_id"], record["env"]["git_commit"] or "None", "from_pretrained",
                 f"compressed-tensors=={export.COMPRESSED_TENSORS_VERSION}", "4- and 8-bit weights only, not these 3-bit"):
        assert text in card, text


# --------------------------------------------------------------------------- integers, dtypes, packing


@pytest.mark.parametrize("bits", range(1, 9))
def test_packing_is_compressed_tensors_own(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    g = torch.Generator().manual_seed(bits)
    for cols in (1, 7, 32, 33, 100, 256):
        codes = torch.randint(0, 2**bits, (5, cols), generator=g)
        signed = (codes - 2 ** (bits - 1)).to(torch.int8)  # compressed-tensors' integers
        assert torch.equal(pack_rows(codes, bits), pack_to_int32(signed, bits))
        assert torch.equal(pack_rows(codes.T, bits).T, pack_to_int32(signed, bits, packed_dim=0))  # zero points
        assert torch.equal(unpack_rows(pack_rows(codes, bits), bits, cols), codes)
        assert torch.equal(unpack_from_int32(pack_rows(codes, bits), bits, codes.shape), signed)


def test_compressed_tensors_decompressor_reads_our_integers_and_weights(tmp_path):
    """compressed-tensors' own decompressor gives back the codes and zero points of the
    in-memory grids (ζ folded: same codes), and transformers' load reproduces the in-memory
    weights bit for bit, in float32 and in float16."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationScheme
    from transformers import AutoModelForCausalLM

    for zeta, folder in ((True, tmp_path / "zeta"), (False, tmp_path / "plain")):
        model, tok, result = zeta_quantized("tiny-llama", 3, 32, seed=1, zeta=zeta)
        save_quantized(model, tok, result, compose("model=tiny-llama", "bits=3", "group_size=32"), str(folder))
        config = json.load(open(folder / "config.json"))["quantization_config"]
        scheme = QuantizationScheme.model_validate(config["config_groups"]["group_0"])
        compressor = BaseCompressor.get_value_from_registry("pack-quantized")
        adapter = ModelAdapter(model)
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            for key, grid in result.grids.items():
                name = export.linear_name(adapter, key)
                stored = {k: f.get_tensor(f"{name}.{k}") for k in ("weight_packed", "weight_scale",
                                                                   "weight_zero_point", "weight_shape")}
                weight = model.get_submodule(name).weight
                codes = grid.quantize(weight.float())
                assert torch.equal(unpack_from_int32(stored["weight_packed"], 3, weight.shape).long() + 4, codes.long())
                back = compressor.decompress(stored, scheme)
                assert torch.equal(back["weight_zero_point"].long() + 4, grid.zero.long())
                if not zeta:
                    assert torch.equal(back["weight"], weight)
        if not zeta:
            for dtype in (torch.float32, torch.float16):
                loaded = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
                for key in result.grids:
                    name = export.linear_name(adapter, key)
                    expected = model.get_submodule(name).weight.to(dtype)
                    assert torch.equal(loaded.get_submodule(name).weight, expected), (dtype, name)


def test_fake_format_writes_the_dense_folder_and_the_codes(tmp_path):
    """``save_format=fake``: the fake-quantized weights as a plain folder, and codes, scales,
    zero points and ζ (q, k and v share one ζ tensor: the old crash) beside them."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model, tok, result = zeta_quantized("tiny-opt", 3, -1)
    folder, notes = save_quantized(model, tok, result, compose("bits=3", "save_format=fake"), str(tmp_path))
    codes = load_file(os.path.join(folder, "quantization.safetensors"))
    assert torch.equal(codes["0.q.col_scale"], codes["0.v.col_scale"]) and notes == []
    q = model.get_submodule("model.decoder.layers.0.self_attn.q_proj").weight
    assert torch.equal(result.grids["0.q"].dequantize(codes["0.q.codes"].float()), q)
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert torch.equal(loaded.get_submodule("model.decoder.layers.0.self_attn.q_proj").weight, q)


# --------------------------------------------------------------------------- refusals and failures


@pytest.mark.parametrize("overrides,message", [
    (["method=qllm", "act_bits=4"], "save_format=fake"),
    (["method=gptq", "group_size=32", "method.act_order=true"], "method.static_groups=true"),
    (["method=rtn", "bits=16", "act_bits=8"], "save_format=fake"),
])
def test_refused_before_the_model_loads(overrides, message, monkeypatch, tmp_path):
    import experiments.runner as runner

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(runner, "load_model", no_loading)
    cfg = compose(*overrides, "save=true", f"save_dir={tmp_path}/m", f"results_dir={tmp_path}/runs")
    with pytest.raises(UserError, match=message) as error:
        run(cfg)
    assert "\n" not in str(error.value)
    assert not list(tmp_path.glob("runs/*.json"))
    check_exportable(compose(*overrides, "save=true", "save_format=fake"))  # the fake folder is allowed


def test_qllm_refusal_line_through_run_py(tmp_path):
    out = subprocess.run([sys.executable, "run.py", "method=qllm", "act_bits=4", "save=true",
                          f"results_dir={tmp_path}"], capture_output=True, text=True, cwd=REPO, env=fresh_env(),
                         timeout=300)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        "error: qllm cannot be saved as compressed-tensors: its channel reassembly changes the model's architecture; "
        "save_format=fake writes the fake-quantized folder (for inspection)"]


def test_a_failed_export_keeps_the_record(monkeypatch, tmp_path, capsys):
    def broken(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(export, "save_compressed", broken)
    cfg = compose("method=rtn", *BUDGET, "save=true", f"save_dir={tmp_path}/m", f"results_dir={tmp_path}/runs")
    record = run(cfg)
    stored = json.loads(next(tmp_path.glob("runs/*.json")).read_text())
    assert stored["status"] == "ok" and "saved_to" not in stored
    assert stored["metrics"] == record["metrics"]
    assert any("not saved (compressed-tensors): No space left on device" in n for n in stored["notes"])
    assert "error: the model was not saved" in capsys.readouterr().err


def test_weight_activation_run_declares_its_activations_and_names_what_it_cannot(tmp_path):
    folder = tmp_path / "sq"
    record = run(compose("model=tiny-llama", "method=smoothquant", "bits=4", "act_bits=8", *BUDGET, "save=true",
                         f"save_dir={folder}", f"results_dir={tmp_path}/runs"))
    group = json.load(open(folder / "config.json"))["quantization_config"]["config_groups"]["group_0"]
    assert group["input_activations"] == {"num_bits": 8, "type": "int", "symmetric": False, "dynamic": True,
                                          "strategy": "token"}
    assert any("Q, K and V" in n for n in record["notes"])
    card = open(folder / "README.md").read()
    assert "Q, K and V" in card and "full precision" in card


def test_what_cannot_be_expressed_is_an_error_not_a_different_model(tmp_path):
    cfg = compose("model=tiny-opt", "bits=3")
    model, tok, result = zeta_quantized("tiny-opt", 3, -1)
    grid, fc2 = result.grids["1.down"], ModelAdapter(model).block(1).linear("down")
    grid.col_scale = -grid.col_scale  # ζ < 0 cannot cross the ReLU after fc1
    with torch.no_grad():
        fc2.weight.copy_(grid.fake_quantize(fc2.weight.float()))
    with pytest.raises(ExportError, match="ReLU"):
        save_quantized(model, tok, result, cfg, str(tmp_path / "a"))

    model, tok, result = zeta_quantized("tiny-opt", 3, -1, zeta=False)
    grid = result.grids["0.q"]
    result.grids["0.q"] = Grid(grid.scale, grid.zero - grid.zero.max() - 1, 3, -1)  # zero points below 0
    with pytest.raises(ExportError, match="zero points"):
        save_quantized(model, tok, result, cfg, str(tmp_path / "b"))

    model, tok, result = zeta_quantized("tiny-llama", 3, -1, zeta=False)
    v = ModelAdapter(model).block(0).linear("v")
    v.bias = torch.nn.Parameter(torch.zeros(v.out_features))  # a bias the LLaMA config does not have
    with pytest.raises(ExportError, match="architecture"):
        save_quantized(model, tok, result, compose("model=tiny-llama", "bits=3"), str(tmp_path / "c"))


# --------------------------------------------------------------------------- the acceptance matrix


MATRIX_METHODS = {
    "rtn": [], "gptq": ["method.act_order=true", "method.static_groups=true"],
    "aespa": ["method.iters=50", "method.zfold_rounds=2"], "zfold": ["method.zfold_rounds=2"],
    "omniquant": ["method.epochs=1"], "boa": [], "turboboa": [],
}
MATRIX_BUDGET = ["nsamples=8", "eval.max_windows=8", "progress=false", "resume=false"]


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("AESPA_EXPORT_MATRIX"), reason="the full matrix: AESPA_EXPORT_MATRIX=1")
@pytest.mark.parametrize("model_name", ["tiny-opt", "tiny-llama"])
@pytest.mark.parametrize("method", list(MATRIX_METHODS))
def test_export_matrix(method, model_name, tmp_path, tokenizer):
    """Every weight-only method x bits 2/3/4 x per-channel/g32: saved, reloaded in a fresh
    process (relative PPL difference <= 1e-5), linear weights at most bits/16 of fp16 plus
    the scales, compressed-tensors' decompressor reading our integers. Prints one table row
    per cell (run with -s; the rows are the lines that start with ``|``)."""
    from experiments.methods import load_methods

    if method not in load_methods():
        pytest.skip(f"method {method} does not exist here")
    windows, _ = windows_file(str(tmp_path), "w", tokenizer, seqlen=512, count=8)
    cells = {}
    for bits in (2, 3, 4):
        for group_size in (-1, 32):
            folder = str(tmp_path / f"{bits}-{group_size}")
            record = run(compose(f"model={model_name}", f"method={method}", *MATRIX_METHODS[method], f"bits={bits}",
                                 f"group_size={group_size}", *MATRIX_BUDGET, "save=true", f"save_dir={folder}",
                                 f"results_dir={tmp_path}/runs"))
            cells[folder] = (bits, group_size, record["metrics"]["ppl"]["wikivital"])
    reloaded = reload_in_fresh_process({folder: windows for folder in cells})
    model_fp16 = 2 * sum(p.numel() for p in load(model_name)[0].parameters())
    for folder, (bits, group_size, in_memory) in cells.items():
        sizes = linear_sizes(folder, bits)
        total = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))
        print(f"| {method} | {model_name} | W{bits} | {'channel' if group_size == -1 else 'g32'} | {in_memory:.4f} | "
              f"{reloaded[folder]:.4f} | {abs(reloaded[folder] / in_memory - 1):.1e} | "
              f"{(sizes['packed'] + sizes['scales']) / sizes['fp16']:.3f} | {total / model_fp16:.3f} |")
        assert reloaded[folder] == pytest.approx(in_memory, rel=1e-5)
        assert sizes["packed"] <= bits / 16 * sizes["fp16"]
        assert sizes["scales"] <= (4 + bits / 8) * sizes["groups"] + 4 * sizes["layers"] * 8
        assert compressed_tensors_readback(folder) == sizes["layers"]
