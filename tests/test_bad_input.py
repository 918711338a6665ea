"""Bad input and faults, as a user meets them: every case is the command line of run.py (run
in-process, as ``python run.py ARGS`` would), its exit status, and the one line it prints
(which names the key) or the right behaviour; none leaves a record behind."""
import json
import math
import os
import shutil

import pytest
import torch

import run as run_py
from aespa.core.errors import UserError
from experiments import records
from tests.conftest import ASSETS, REPO


@pytest.fixture
def dirs(tmp_path):
    """Separate folders for records, cache, checkpoints and Hydra's run folder."""
    d = {k: tmp_path / k for k in ("runs", "cache", "ckpt", "hydra", "models")}
    for p in d.values():
        p.mkdir()
    return d


def fast(dirs) -> list[str]:
    return ["model=tiny-opt", "method=rtn", "bits=4", "nsamples=2", "eval.max_windows=2", "progress=false",
            f"results_dir={dirs['runs']}", f"cache_dir={dirs['cache']}", f"checkpoint_dir={dirs['ckpt']}",
            f"hydra.run.dir={dirs['hydra']}/run", f"hydra.sweep.dir={dirs['hydra']}/sweep"]


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = run_py.cli(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(err: str, *expected: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    assert "Traceback" not in err
    for text in expected:
        assert text in lines[0], (text, lines[0])


def no_records(dirs) -> bool:
    return not [p for p in dirs["runs"].iterdir() if not p.name.startswith(".")]


# (case id, overrides replacing/adding to the fast run, words the error line must contain)
CASES = [
    ("bits-9", ["bits=9"], ["bits=9", "one of 2, 3, 4, 5, 6, 7, 8, 16"]),
    ("bits-1", ["bits=1"], ["bits=1", "one of 2"]),
    ("bits-float", ["bits=2.0"], ["bits=2.0", "one of 2"]),
    ("bits-text", ["bits=abc"], ["bits='abc'"]),
    ("bits-bool", ["bits=true"], ["bits=true"]),
    ("group-0", ["group_size=0"], ["group_size=0", "not 0"]),
    ("group-neg", ["group_size=-2"], ["group_size=-2", ">= -1"]),
    ("group-float", ["group_size=1.5"], ["group_size=1.5", "an integer"]),
    ("group-indivisible", ["group_size=100"], ["group_size=100", "does not divide the input width 256"]),
    ("sym-no", ["sym=no"], ["sym='no'", "true or false"]),
    ("sym-maybe", ["sym=maybe"], ["sym='maybe'", "true or false"]),
    ("sym-1", ["sym=1"], ["sym=1", "true or false"]),
    ("act-3", ["act_bits=3"], ["act_bits=3", "one of 4"]),
    ("act-weight-only", ["method=gptq", "act_bits=4"], ["'gptq' is weight-only", "act_bits < 16"]),
    ("act-float", ["act_bits=4.0"], ["act_bits=4.0"]),
    ("nsamples-0", ["nsamples=0"], ["nsamples=0", ">= 1"]),
    ("nsamples-neg", ["nsamples=-3"], ["nsamples=-3"]),
    ("nsamples-text", ["nsamples=abc"], ["nsamples='abc'", "an integer"]),
    ("nsamples-float", ["nsamples=1.5"], ["nsamples=1.5"]),
    ("nsamples-huge", ["nsamples=100000000"], ["nsamples=100000000", "GiB"]),
    ("seqlen-1", ["seqlen=1"], ["seqlen=1", ">= 2"]),
    ("seqlen-context", ["seqlen=4096"], ["seqlen=4096", "context of 1024"]),
    ("seqlen-text", ["seqlen=abc"], ["seqlen='abc'"]),
    ("seed-float", ["seed=1.5"], ["seed=1.5", "an integer"]),
    ("seed-neg", ["seed=-1"], ["seed=-1", ">= 0"]),
    ("seed-text", ["seed=abc"], ["seed='abc'"]),
    ("device-tpu", ["device=tpu"], ["device 'tpu'", "auto, cpu, cuda"]),
    ("device-index", ["device=cuda:x"], ["device=cuda:x"]),
    ("dtype-int8", ["dtype=int8"], ["dtype='int8'", "one of auto"]),
    ("batch-0", ["batch_size=0"], ["batch_size=0", ">= 1"]),
    ("batch-neg", ["batch_size=-1"], ["batch_size=-1"]),
    ("batch-float", ["batch_size=2.5"], ["batch_size=2.5"]),
    ("force-text", ["force=abc"], ["force='abc'", "true or false"]),
    ("resume-text", ["resume=abc"], ["resume='abc'"]),
    ("progress-text", ["progress=maybe"], ["progress='maybe'"]),
    ("save-text", ["save=maybe"], ["save='maybe'"]),
    ("save-format", ["save_format=gguf"], ["save_format='gguf'", "compressed-tensors"]),
    ("unknown-key-plus", ["+foo=1"], ["unknown key foo"]),
    ("unknown-key", ["foo=1"], ["foo"]),
    ("sweep-without-m", ["bits=3,4"], ["bits=3,4", "add -m"]),
    ("model-unknown", ["model=opt-7b"], ["unknown model 'opt-7b'", "llama-13b"]),
    ("model-path-missing", ["model.path=/no/such/model"], ["model.path=/no/such/model", "does not exist"]),
    ("model-seqlen", ["model.seqlen=1"], ["model.seqlen=1"]),
    ("model-unknown-key", ["+model.foo=1"], ["unknown key model.foo"]),
    ("model-hub-offline", ["model.path=facebook/opt-999m"], ["facebook/opt-999m", "offline"]),
    ("method-unknown", ["method=foo"], ["unknown method 'foo'", "gptq"]),
    ("method-key", ["method.foo=1"], ["method.foo"]),
    ("method-key-plus", ["+method.foo=1"], ["method.foo", "allowed"]),
    ("gptq-percdamp-text", ["method=gptq", "method.percdamp=abc"], ["method.percdamp='abc'", "a number > 0"]),
    ("gptq-percdamp-0", ["method=gptq", "method.percdamp=0"], ["method.percdamp=0", "> 0"]),
    ("gptq-act-order", ["method=gptq", "method.act_order=no"], ["method.act_order='no'", "true or false"]),
    ("gptq-blocksize", ["method=gptq", "method.blocksize=0"], ["method.blocksize=0", ">= 1"]),
    ("aespa-iters", ["method=aespa", "method.iters=-1"], ["method.iters=-1"]),
    ("aespa-warmup", ["method=aespa", "method.warmup=1.0"], ["method.warmup=1.0", "< 1"]),
    ("aespa-switch", ["method=aespa", "method.block_v=yes"], ["method.block_v='yes'"]),
    ("brecq-scale", ["method=brecq", "method.scale_method=minmax"], ["method.scale_method='minmax'", "mse, max"]),
    ("brecq-windows", ["method=brecq", "method.windows_per_step=0"], ["method.windows_per_step=0"]),
    ("qllm-distance", ["method=qllm", "act_bits=4", "method.distance=cosine"], ["method.distance='cosine'"]),
    ("qllm-ratio", ["method=qllm", "act_bits=4", "method.channel_ratio=1.5"], ["method.channel_ratio=1.5"]),
    ("qllm-rank", ["method=qllm", "act_bits=4", "method.rank=0"], ["method.rank=0"]),
    ("omni-let", ["method=omniquant", "method.let=maybe"], ["method.let='maybe'", "auto, true, false"]),
    ("omni-epochs", ["method=omniquant", "method.epochs=-1"], ["method.epochs=-1"]),
    ("omni-nothing", ["method=omniquant", "method.lwc=false", "method.let=false"], ["nothing to train"]),
    ("omni-shift-llama", ["model=tiny-llama", "method=omniquant", "act_bits=4", "method.shift=true"],
     ["shift=true needs norms with a bias"]),
    ("sq-alpha", ["method=smoothquant", "method.alpha=2"], ["method.alpha=2", "<= 1"]),
    ("eval-unknown", ["eval.datasets=[wiki103]"], ["wiki103", "wikivital"]),
    ("eval-max-0", ["eval.max_windows=0"], ["eval.max_windows=0", ">= 1"]),
    ("eval-max-neg", ["eval.max_windows=-1"], ["eval.max_windows=-1"]),
    ("eval-max-text", ["eval.max_windows=abc"], ["eval.max_windows='abc'"]),
    ("eval-empty", ["eval.datasets=[]"], ["nothing would be evaluated"]),
    ("eval-ptb", ["eval.datasets=[ptb-new]"], ["ptb-new", "offline", "not in the hub cache", "++data_paths.ptb"]),
    ("eval-hub-offline", ["eval.datasets=[wikitext2]"], ["wikitext2", "offline", "++data_paths.wikitext2"]),
    ("calib-unknown", ["calib.dataset=pile"], ["calib.dataset='pile'", "wikivital"]),
    ("calib-hub-offline", ["calib=c4"], ["dataset c4", "offline"]),
    ("data-path-missing", ["++data_paths.c4=/no/such/file"], ["data_paths.c4=/no/such/file", "does not exist"]),
    ("data-path-unknown", ["++data_paths.pile=/tmp"], ["data_paths.pile", "c4, wikitext2, ptb"]),
    ("zeroshot-offline", ["eval=zeroshot", "eval.zeroshot=[piqa]"], ["piqa"]),
    ("zeroshot-unknown", ["eval.zeroshot=[no_such_task]"], ["no_such_task"]),
    ("zeroshot-batch", ["eval.zeroshot_batch_size=0"], ["eval.zeroshot_batch_size=0"]),
    ("logger-unknown", ["logger=foo"], ["unknown logger 'foo'"]),
    ("logger-mode", ["logger=wandb", "logger.mode=sometimes"], ["logger.mode='sometimes'"]),
]


@pytest.mark.parametrize("case,overrides,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_no_record(case, overrides, expected, dirs, capsys):
    code, _, err = cli(capsys, *fast(dirs), *overrides)
    assert code == 2, err[-3000:]
    assert_one_error_line(err, *expected)
    assert no_records(dirs)


# --------------------------------------------------------------------------- model folders


def _copy_model(dirs, name="tiny-opt"):
    folder = dirs["models"] / name
    shutil.copytree(os.path.join(ASSETS, name), folder)
    return folder


@pytest.mark.parametrize("damage,expected", [
    ("empty", "has no config.json"),
    ("no-config", "has no config.json"),
    ("bad-config", "config.json is not a valid JSON object"),
    ("no-weights", "has no weights"),
    ("truncated", "model.safetensors is truncated"),
    ("garbage-weights", "is not a readable safetensors file"),
    ("no-tokenizer", "has no tokenizer"),
    ("a-file", "is not a folder"),
])
def test_damaged_model_folders_are_named_before_loading(damage, expected, dirs, capsys):
    folder = _copy_model(dirs)
    if damage == "empty":
        shutil.rmtree(folder)
        folder.mkdir()
    elif damage == "no-config":
        (folder / "config.json").unlink()
    elif damage == "bad-config":
        (folder / "config.json").write_text("{not json")
    elif damage == "no-weights":
        (folder / "model.safetensors").unlink()
    elif damage == "truncated":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "garbage-weights":
        (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    elif damage == "no-tokenizer":
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (folder / f).unlink()
    elif damage == "a-file":
        shutil.rmtree(folder)
        folder.write_text("not a model")
    code, _, err = cli(capsys, *fast(dirs), f"model.path={folder}")
    assert code == 2
    assert_one_error_line(err, f"model.path={folder}", expected)
    assert no_records(dirs)


@pytest.mark.parametrize("overrides,expected", [
    (["method=turboboa", "method.n_quant_rows=65"], "method.n_quant_rows=65 is above the head dimension"),
    (["group_size=100"], "group_size=100 does not divide the input width 256"),
    (["seqlen=4096"], "exceeds the model's context of 1024"),
])
def test_shape_errors_come_before_any_weight_loads(overrides, expected, dirs, capsys, monkeypatch):
    """The architecture built on the meta device from config.json is enough to refuse these."""
    import experiments.runner as runner

    def no_loading(*args, **kwargs):
        raise AssertionError("weights loaded before the shape check")

    monkeypatch.setattr(runner, "load_model", no_loading)
    code, _, err = cli(capsys, *fast(dirs), *overrides)
    assert code == 2
    assert_one_error_line(err, expected)
    assert no_records(dirs)


def test_save_dir_inside_the_model_folder_is_refused(dirs, capsys):
    folder = _copy_model(dirs)
    for target in (folder, folder / "quantized"):
        code, _, err = cli(capsys, *fast(dirs), f"model.path={folder}", "save=true", f"save_dir={target}")
        assert code == 2
        assert_one_error_line(err, f"save_dir={target}", "overwrite the source model")
    assert sorted(p.name for p in folder.iterdir()) == sorted(os.listdir(os.path.join(ASSETS, "tiny-opt")))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
@pytest.mark.parametrize("key", ["results_dir", "cache_dir", "checkpoint_dir"])
def test_read_only_folders_are_refused_up_front(key, dirs, capsys):
    target = dirs[{"results_dir": "runs", "cache_dir": "cache", "checkpoint_dir": "ckpt"}[key]]
    target.chmod(0o500)
    try:
        code, _, err = cli(capsys, *fast(dirs), f"{key}={target}")
    finally:
        target.chmod(0o700)
    assert code == 2
    assert_one_error_line(err, f"{key}={target}", "not writable")


def test_unwritable_folders_are_refused_up_front(dirs, capsys, tmp_path):
    """A path under a regular file cannot be created, whoever runs the test."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for key in ("results_dir", "cache_dir", "checkpoint_dir"):
        code, _, err = cli(capsys, *fast(dirs), f"{key}={blocker}/sub")
        assert code == 2
        assert_one_error_line(err, f"{key}={blocker}/sub", "not writable")
    code, _, err = cli(capsys, *fast(dirs), "save=true", f"save_dir={blocker}/sub")
    assert code == 2
    assert_one_error_line(err, f"save_dir={blocker}/sub", "not writable")


# --------------------------------------------------------------------------- local data files


def test_a_hub_layout_folder_without_the_split_is_named_before_loading(dirs, capsys, tmp_path):
    """A folder laid out like the hub repository that lacks the test file: one line with the
    command that fetches it, before the model loads."""
    train = "wikitext-2-raw-v1/train-00000-of-00001.parquet"
    (tmp_path / "wt2" / "wikitext-2-raw-v1").mkdir(parents=True)
    shutil.copy(os.path.join(os.path.dirname(__file__), "fixtures", "hub", "Salesforce", "wikitext", train),
                tmp_path / "wt2" / train)
    code, _, err = cli(capsys, *fast(dirs), "eval.datasets=[wikitext2]", f"++data_paths.wikitext2={tmp_path / 'wt2'}")
    assert code == 2
    assert_one_error_line(err, "lacks wikitext-2-raw-v1/test-00000-of-00001.parquet", "hf download Salesforce/wikitext")
    assert no_records(dirs)


def test_a_local_data_file_that_is_not_json_is_one_line(dirs, capsys, tmp_path):
    bad = tmp_path / "wikitext2.json"
    bad.write_text("{this is not json\n")
    code, _, err = cli(capsys, *fast(dirs), "eval.datasets=[wikitext2]", f"++data_paths.wikitext2={bad}")
    assert code == 2
    assert_one_error_line(err, f"cannot read the local dataset {bad} as json")
    assert no_records(dirs)


def test_the_data_cache_follows_the_content_of_local_files(dirs, tokenizer, tmp_path):
    """A local file edited in place gives other windows, not the cached ones."""
    from experiments.data import DataCache, evaluation_windows

    text = tmp_path / "wikitext2.json"
    text.write_text("\n".join(json.dumps({"text": f"line {i} of the first version"}) for i in range(300)))
    cache = DataCache(str(dirs["cache"]))
    first = evaluation_windows("wikitext2", tokenizer, 16, cache, {"wikitext2": str(text)})
    text.write_text("\n".join(json.dumps({"text": f"other words, row {i}"}) for i in range(300)))
    second = evaluation_windows("wikitext2", tokenizer, 16, cache, {"wikitext2": str(text)})
    assert not torch.equal(first[: len(second)], second[: len(first)])
    assert len(list(dirs["cache"].glob("*.safetensors"))) == 2


def test_documents_too_short_for_the_windows_are_one_line(tokenizer, tmp_path):
    from experiments.data import calibration_windows

    text = tmp_path / "c4.json"
    text.write_text("\n".join(json.dumps({"text": "short"}) for _ in range(5)))
    with pytest.raises(UserError, match="cannot serve windows of this length"):
        calibration_windows("c4", tokenizer, 2, 64, 0, None, {"c4": str(text)})


# --------------------------------------------------------------------------- faults


def test_an_unwritable_record_keeps_the_metrics(dirs, capsys, monkeypatch, tmp_path):
    """The results folder becomes unwritable during the run: the record is printed in full
    and written to a fallback file that is named; the exit status is 1."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    real = records.write_record

    def failing(path, record):
        if os.path.dirname(path) == str(dirs["runs"]):
            raise OSError(30, "Read-only file system")
        real(path, record)

    monkeypatch.setattr(records, "write_record", failing)
    code, out, err = cli(capsys, *fast(dirs))
    assert code == 1
    fallback = tmp_path / "aespa-ptq-records"
    saved = [json.loads(p.read_text()) for p in fallback.glob("*.json")]
    assert len(saved) == 1 and saved[0]["status"] == "ok"
    assert math.isfinite(saved[0]["metrics"]["ppl"]["wikivital"])
    assert f'"wikivital": {saved[0]["metrics"]["ppl"]["wikivital"]}' in out
    assert_one_error_line(err, "cannot write the record", str(fallback))
    assert no_records(dirs)


def test_a_model_with_nan_weights_is_a_failed_record_naming_the_tensor(dirs, capsys):
    from safetensors.torch import load_file, save_file

    folder = _copy_model(dirs)
    weights = load_file(folder / "model.safetensors")
    name = next(k for k in weights if "layers.1.self_attn.q_proj.weight" in k)
    weights[name][3, 5] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    code, _, err = cli(capsys, *fast(dirs), f"model.path={folder}")
    assert code == 1
    assert_one_error_line(err, "NaN in the loaded model", "layers.1.self_attn.q_proj.weight")
    saved = [json.loads(p.read_text()) for p in dirs["runs"].glob("*.json")]
    assert [r["status"] for r in saved] == ["failed"] and "layers.1.self_attn.q_proj" in saved[0]["error"]


def test_a_truncated_record_is_redone_not_a_traceback(dirs, capsys):
    code, _, _ = cli(capsys, *fast(dirs))
    assert code == 0
    (path,) = [p for p in dirs["runs"].glob("*.json")]
    good = json.loads(path.read_text())
    path.write_text(path.read_text()[:50])
    code, out, err = cli(capsys, *fast(dirs))
    assert code == 0 and "skip:" not in out
    assert json.loads(path.read_text())["metrics"] == good["metrics"]


def test_a_second_identical_run_waits_its_turn_with_one_line(dirs, capsys):
    """While one process holds a configuration's lock, the same configuration exits 2."""
    from omegaconf import OmegaConf

    from tests.conftest import compose

    config = OmegaConf.to_container(compose(*fast(dirs)[:-2]), resolve=True)
    rid = records.run_id(config)
    with records.RunLock(str(dirs["runs"]), rid):
        code, _, err = cli(capsys, *fast(dirs))
    assert code == 2
    assert_one_error_line(err, "another process is running this configuration", rid)
    assert no_records(dirs)
    assert cli(capsys, *fast(dirs))[0] == 0  # released: the run goes through


def test_a_sweep_with_one_bad_job_records_the_others(dirs, capsys):
    code, out, err = cli(capsys, "-m", *fast(dirs), "bits=3,9")
    assert code == 1, err[-2000:]
    saved = [json.loads(p.read_text()) for p in dirs["runs"].glob("*.json")]
    assert [(r["w_bits"], r["status"]) for r in saved] == [(3, "ok")]
    assert "error: bits=9 is not allowed" in err
    assert "sweep: 2 jobs: 1 recorded, 0 skipped (recorded before), 1 failed" in out
    (failed,) = [line for line in out.splitlines() if line.startswith("failed: job 1 (")]
    assert "bits=9" in failed and "bits=9 is not allowed" in failed


def test_tables_and_plots_skip_corrupt_and_nan_records_with_one_line_each(tmp_path, caplog):
    from experiments import plots, tables

    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "truncated.json").write_text('{"schema": 1, "run_id": "ab')
    good = {"schema": 1, "run_id": "good", "status": "ok", "model": "tiny-opt", "method": "rtn", "w_bits": 4,
            "a_bits": 16, "group_size": -1, "sym": False, "seed": 0, "calib": {}, "config": {"model": {}},
            "metrics": {"ppl": {"wikivital": 80.0}}, "time": {"quantize_s": 1.0}, "memory": {}}
    (runs / "good.json").write_text(json.dumps(good))
    nan = dict(good, run_id="nan", metrics={"ppl": {"wikivital": float("nan")}})
    (runs / "nan.json").write_text(json.dumps(nan))
    loaded = tables.load_records(runs)
    assert [r["run_id"] for r in loaded] == ["good"]
    assert "truncated.json" in caplog.text and "nan.json" in caplog.text and "not finite" in caplog.text
    frame = plots.records_frame(records.read_records(runs))
    assert list(frame["run_id"]) == ["good"]
    assert tables.main([str(REPO)[:0] + "no_such_table", "--runs", str(runs), "--out", str(tmp_path / "t")]) == 2
