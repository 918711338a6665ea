"""Sweeps: the paper-table experiments (conf/experiment/), the launchers (conf/hydra/launcher/),
idempotent reruns, resuming killed or preempted runs, and concurrent writers.

The ``slurm`` tests run against a real cluster (experiments/cluster/slurm_local.sh up) and
are skipped, with the reason, when none answers.
"""
from __future__ import annotations

import glob
import json
import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from experiments import records, tables
from tests.conftest import ASSETS, REPO, compose
from tests.test_slurm_cluster import _cluster_unreachable_reason

FAST = ["eval.max_windows=8", "progress=false"]
# the run that is killed / preempted: slow enough per block (~1 s) to be stopped inside one
RESUMED = ["model=tiny-opt", "bits=3", "nsamples=8", *FAST]
# GPTQ only: every method's resume (BRECQ's random mini-batches included) is checked bit for bit
# in-process by tests/test_resume.py; this checks the process-level path (SIGKILL, new process)
KILLED = {"gptq": ["method=gptq"]}
N_BLOCKS = 4
CMD_TIMEOUT_S = 30

needs_tiny_opt = pytest.mark.skipif(not os.path.exists(os.path.join(ASSETS, "tiny-opt", "config.json")),
                                    reason="assets/tiny-opt is not trained yet (python -m experiments.train_tiny)")


# ----------------------------------------------------------------------------- the sweeps


def sweep_jobs(*overrides: str) -> list[list[str]]:
    """The jobs ``python run.py -m <overrides>`` launches: Hydra's basic sweeper expansion of
    ``hydra.sweeper.params`` (from the experiment) and the command-line sweeps."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    with initialize_config_dir(config_dir=os.path.join(REPO, "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=[o for o in overrides if "," not in o],
                            return_hydra_config=True)
    params = [f"{k}={v}" for k, v in (cfg.hydra.sweeper.params or {}).items()]
    parsed = OverridesParser.create().parse_overrides([*params, *overrides])
    return BasicSweeper.split_arguments(parsed, None)[0]


def planned_record(job: list[str]) -> dict:
    """What a job's record will say about its configuration (the runner's fields)."""
    from omegaconf import OmegaConf

    cfg = compose(*job)
    config = OmegaConf.to_container(cfg, resolve=True)
    quantized = config["bits"] < 16 or config["act_bits"] < 16
    return {"status": "ok", "run_id": records.run_id(config), "model": config["model"]["name"],
            "method": config["method"]["name"] if quantized else "none", "w_bits": config["bits"],
            "a_bits": config["act_bits"], "group_size": config["group_size"], "seed": config["seed"],
            "calib": {"dataset": config["calib"]["dataset"], "nsamples": config["nsamples"]}, "config": config}


PROTOCOLS = {  # table -> (calibration set, seed, test sets); nsamples 128 of the models' 2048 tokens everywhere
    "aespa_table1": ("c4", 0, ["wikitext2", "c4-new", "ptb-new"]),
    "aespa_layerwise": ("c4", 0, ["wikitext2", "c4-new", "ptb-new"]),
    "gptq_opt": ("c4", 0, ["wikitext2", "c4-new", "ptb-new"]),
    "aespa_cost": ("c4", 0, ["wikitext2", "c4-new", "ptb-new"]),
    "omniquant_weight_only": ("wikitext2", 2, ["wikitext2", "c4"]),
    "weight_activation": ("wikitext2", 2, ["wikitext2", "c4"]),
    "tiny": ("wikivital", 0, ["wikivital"]),
}
NO_MODEL_CONFIG = {"gptq_opt": {"opt-175b"}}  # table columns without conf/model/<name>.yaml


@pytest.mark.parametrize("name", sorted(PROTOCOLS))
def test_table_experiment_expands_to_exactly_the_cells_of_its_table(name):
    spec = tables.load_spec(name, Path(REPO) / "conf" / "tables")
    rows = tables.table_rows(spec)
    jobs = sweep_jobs(f"+experiment={name}")
    models = [dict(o.split("=", 1) for o in job)["model"] for job in jobs]
    assert sorted(set(models)) == sorted(set(spec["models"]) - NO_MODEL_CONFIG.get(name, set()))
    assert len(jobs) == len(rows) * len(set(models))  # one job per cell, no duplicates

    # every job of one model (composed and resolved) fills exactly one row, and every row is filled
    calib, seed, test_sets = PROTOCOLS[name]
    first = [job for job, model in zip(jobs, models) if model == models[0]]
    filled, run_ids = [], set()
    for job in first:
        rec = planned_record(job)
        run_ids.add(rec["run_id"])
        hits = [i for i, row in enumerate(rows) if tables.matching_records([rec], row)]
        assert len(hits) == 1, (job, hits)
        filled.append(hits[0])
        assert rec["config"]["eval"]["datasets"] == test_sets
        if rec["method"] != "none":
            assert (rec["calib"]["dataset"], rec["seed"], rec["calib"]["nsamples"]) == (calib, seed, 128)
            assert rec["config"]["method"]["name"] == rec["method"]
    assert sorted(filled) == list(range(len(rows))) and len(run_ids) == len(rows)


def test_a_table_row_runs_with_the_methods_own_knobs_and_the_cli_narrows_the_sweep():
    jobs = sweep_jobs("+experiment=omniquant_weight_only", "model=llama-2-70b",
                      "experiment.row=omniquant-w2g64,gptq-w3g128")
    assert len(jobs) == 2
    omni, gptq = (planned_record(job)["config"] for job in jobs)
    assert (omni["method"]["name"], omni["bits"], omni["group_size"], omni["act_bits"]) == ("omniquant", 2, 64, 16)
    assert omni["method"]["lwc"] is True and omni["calib"]["dataset"] == "wikitext2" and omni["seed"] == 2
    assert (gptq["method"]["name"], gptq["bits"], gptq["group_size"]) == ("gptq", 3, 128)
    assert gptq["method"]["percdamp"] == 0.01 and gptq["model"]["name"] == "llama-2-70b"
    # the bookkeeping of the table does not enter the run id: the same run as without the experiment
    plain = planned_record(["model=llama-2-70b", "method=gptq", "bits=3", "group_size=128", "calib=wikitext2",
                            "seed=2", "eval.datasets=[wikitext2,c4]"])
    assert planned_record(jobs[1])["run_id"] == plain["run_id"]


def test_full_precision_runs_are_one_run_whatever_the_quantization_knobs():
    a = planned_record(["+experiment=aespa_table1", "model=opt-125m", "experiment.row=fp16"])
    b = planned_record(["+experiment=gptq_opt", "model=opt-125m", "experiment.row=fp16"])
    c = planned_record(["model=opt-125m", "method=none", "calib=wikitext2", "seed=2", "bits=3"])
    assert a["run_id"] == b["run_id"] == c["run_id"]
    d = planned_record(["+experiment=weight_activation", "model=opt-6.7b", "experiment.row=fp16"])
    e = planned_record(["+experiment=aespa_table1", "model=opt-6.7b", "experiment.row=fp16"])
    assert d["run_id"] != e["run_id"]  # other test sets: another run


def test_smoke_experiment_sweeps_the_embedded_default():
    jobs = sweep_jobs("+experiment=smoke")
    recs = [planned_record(job) for job in jobs]
    assert sorted((r["model"], r["method"], r["w_bits"]) for r in recs) == sorted(
        (m, q, b) for m in ("tiny-opt", "tiny-llama") for q in ("rtn", "gptq") for b in (3, 4))
    assert all(r["calib"]["nsamples"] <= 16 and r["config"]["eval"]["max_windows"] <= 32 for r in recs)


def _launcher(launcher: str, model: str) -> dict:
    import hydra_plugins.sized_slurm_launcher  # noqa: F401  (installed by requirements.txt; registers by_size)
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.utils import setup_globals
    from omegaconf import OmegaConf

    setup_globals()
    with initialize_config_dir(config_dir=os.path.join(REPO, "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=[f"hydra/launcher={launcher}", f"model={model}"],
                            return_hydra_config=True)
    return OmegaConf.to_container(cfg.hydra.launcher, resolve=True)


def test_slurm_resources_grow_with_the_model():
    small, mid, large = (_launcher("slurm", m) for m in ("tiny-opt", "opt-1.3b", "llama-2-70b"))
    assert small["_target_"] == "hydra_plugins.sized_slurm_launcher.SizedSlurmLauncher"
    assert small["gpus_per_node"] is None and mid["gpus_per_node"] == large["gpus_per_node"] == 1
    assert small["cpus_per_task"] == 1 < mid["cpus_per_task"] < large["cpus_per_task"] == 16
    assert small["mem_gb"] == 8 < mid["mem_gb"] == 11 < large["mem_gb"] == 218
    assert small["timeout_min"] == 60 < mid["timeout_min"] == 99 < large["timeout_min"] == 2160
    assert large["max_num_timeout"] > 0  # timed-out jobs requeue
    assert re.fullmatch(r".*multirun/.*/\.submitit/\d{8}-\d{6}/%j", small["submitit_folder"])
    local, joblib = _launcher("local", "tiny-opt"), _launcher("joblib", "tiny-opt")
    assert local["_target_"].endswith("LocalLauncher") and joblib["n_jobs"] == 2


@needs_tiny_opt
@pytest.mark.parametrize("launcher", ["local", "joblib"])
def test_local_launchers_run_a_sweep(launcher, tmp_path):
    out = _run_cli("-m", f"hydra/launcher={launcher}", "model=tiny-opt", "method=none", "eval.max_windows=2,4",
                   "progress=false", f"results_dir={tmp_path / 'runs'}", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert out.returncode == 0, out.stderr[-3000:]
    recs = _records(tmp_path / "runs")
    assert sorted(r["config"]["eval"]["max_windows"] for r in recs) == [2, 4]


# ----------------------------------------------------------------------------- concurrency


def _join_all(workers, timeout: float = 120) -> None:
    """Join every worker; one that hangs is killed and fails the test instead of the suite."""
    deadline = time.monotonic() + timeout
    for p in workers:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [p for p in workers if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung, f"{len(hung)} worker(s) still running after {timeout:.0f} s"
    assert [p.exitcode for p in workers] == [0] * len(workers)


def _write_records(folder: str, worker: int, barrier, rounds: int) -> None:
    big = {"weights": list(range(50_000))}
    barrier.wait()
    for r in range(rounds):
        records.write_record(os.path.join(folder, f"worker-{worker}.json"), {"worker": worker, "round": r, **big})
        records.write_record(os.path.join(folder, "shared.json"), {"worker": worker, "round": r, **big})


def test_eight_processes_writing_records_at_once_leave_eight_valid_records(tmp_path):
    ctx = mp.get_context("spawn")  # fork after torch's thread pools exist can deadlock the child
    barrier = ctx.Barrier(9)
    workers = [ctx.Process(target=_write_records, args=(str(tmp_path), w, barrier, 5)) for w in range(8)]
    for p in workers:
        p.start()
    barrier.wait()
    torn = 0
    while any(p.is_alive() for p in workers):  # a reader never sees a partial record
        try:
            json.loads((tmp_path / "shared.json").read_text())
        except FileNotFoundError:
            pass
        except ValueError:
            torn += 1
    _join_all(workers)
    assert torn == 0
    found = {p.name: json.loads(p.read_text()) for p in tmp_path.iterdir()}
    assert sorted(found) == sorted([f"worker-{w}.json" for w in range(8)] + ["shared.json"])
    assert all(found[f"worker-{w}.json"] == {"worker": w, "round": 4, "weights": list(range(50_000))}
               for w in range(8))


def _put_cache(root: str, barrier) -> None:
    import torch

    from experiments.data import DataCache

    barrier.wait()
    for _ in range(5):
        DataCache(root).put("same-key", torch.arange(200_000))


def test_concurrent_writers_of_one_cache_entry_leave_it_valid(tmp_path):
    import torch

    from experiments.data import DataCache

    ctx = mp.get_context("spawn")  # fork after torch's thread pools exist can deadlock the child
    barrier = ctx.Barrier(8)
    workers = [ctx.Process(target=_put_cache, args=(str(tmp_path), barrier)) for _ in range(8)]
    for p in workers:
        p.start()
    _join_all(workers)
    assert torch.equal(DataCache(str(tmp_path)).get("same-key"), torch.arange(200_000))
    assert os.listdir(tmp_path) == ["same-key.safetensors"]


# ----------------------------------------------------------------------------- resuming a killed run


def _run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HYDRA_FULL_ERROR="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "run.py", *args], cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=timeout)


def _progress(checkpoints: Path) -> dict | None:
    """The progress manifest of the single run checkpointing under ``checkpoints``."""
    for path in glob.glob(str(checkpoints / "*" / "progress.json")):
        try:
            return json.loads(Path(path).read_text())
        except (OSError, ValueError):
            return None
    return None


def _wait_until(predicate, timeout: float, what: str, interval: float = 0.005):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _records(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def uninterrupted_ppl(folder: Path, method: list[str]) -> float:
    """Perplexity of the configuration run without interruption (and without checkpoints),
    in a fresh process like the runs it is compared with (same threads, nothing set by other tests)."""
    out = _run_cli(*RESUMED, *method, f"results_dir={folder}", "resume=false")
    assert out.returncode == 0, out.stderr[-3000:]
    (record,) = _records(folder)
    return record["metrics"]["ppl"]["wikivital"]


@needs_tiny_opt
@pytest.mark.parametrize("method", list(KILLED))
def test_run_killed_in_block_2_resumes_at_block_2_with_the_same_ppl(tmp_path, method):
    args = [*RESUMED, *KILLED[method], f"results_dir={tmp_path / 'runs'}", f"checkpoint_dir={tmp_path / 'ckpt'}"]
    proc = subprocess.Popen([sys.executable, "run.py", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_until(lambda: (_progress(tmp_path / "ckpt") or {}).get("next_block", 0) >= 2 or proc.poll() is not None,
                    240, "block 2 to start")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    assert _progress(tmp_path / "ckpt")["next_block"] == 2  # it died inside block 2
    assert not list((tmp_path / "runs").glob("*.json"))

    out = _run_cli(*args)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming at block 2 of 4" in out.stdout
    (record,) = _records(tmp_path / "runs")
    assert "resumed at block 2 of 4" in record["notes"]
    assert record["metrics"]["ppl"]["wikivital"] == uninterrupted_ppl(tmp_path / "uninterrupted", KILLED[method])
    assert not os.listdir(tmp_path / "ckpt")  # removed with the record


# ----------------------------------------------------------------------------- SLURM


@pytest.fixture(scope="module")
def slurm():
    reason = _cluster_unreachable_reason()
    if reason:
        pytest.skip(reason + "; start one with: bash experiments/cluster/slurm_local.sh up")


def _sh(*args: str, check: bool = True) -> str:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=CMD_TIMEOUT_S)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def _sacct(name: str, since: str) -> dict[str, str] | None:
    """JobID -> State of the job allocations named ``name``; None without accounting."""
    proc = subprocess.run(["sacct", "-n", "-X", "-P", "--name", name, "-S", since, "-o", "JobID,State"],
                          capture_output=True, text=True, timeout=CMD_TIMEOUT_S)
    if "accounting storage is disabled" in proc.stdout + proc.stderr:
        return None
    return dict(line.split("|", 1) for line in proc.stdout.splitlines() if "|" in line)


def _sacct_settled(name: str, since: str, n_jobs: int) -> dict[str, str] | None:
    """``_sacct`` once all ``n_jobs`` have ended there (the accounting lags the job's exit by seconds)."""
    def settled():
        jobs = _sacct(name, since)
        return {"jobs": jobs} if jobs is None or (len(jobs) == n_jobs and "RUNNING" not in jobs.values()
                                                 and "COMPLETING" not in jobs.values()) else None

    return _wait_until(settled, 60, f"{n_jobs} jobs named {name} to end in sacct", interval=0.5)["jobs"]


def _job_logs(sweep_dir: Path) -> str:
    """Everything the jobs of a sweep printed (submitit's stdout and stderr files)."""
    return "".join(Path(p).read_text() for p in sorted(glob.glob(str(sweep_dir / ".submitit" / "*" / "*" / "*_log.*"))))


def _slurm_sweep(tmp_path: Path, name: str, sweep: str, *overrides: str) -> list[str]:
    return ["-m", "hydra/launcher=slurm", f"hydra.launcher.name={name}", f"hydra.sweep.dir={tmp_path / sweep}",
            f"results_dir={tmp_path / 'runs'}", f"checkpoint_dir={tmp_path / 'ckpt'}", *overrides]


@needs_tiny_opt
@pytest.mark.slurm
def test_slurm_sweep_writes_four_records_through_sbatch_and_a_rerun_skips_them(slurm, tmp_path):
    name = f"ptq-sweep-{uuid.uuid4().hex[:8]}"
    since = (datetime.now() - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%S")
    sweep = ["model=tiny-opt", "method=rtn,gptq", "bits=3,4", "nsamples=4", *FAST]
    out = _run_cli(*_slurm_sweep(tmp_path, name, "first", *sweep), timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    recs = _records(tmp_path / "runs")
    assert sorted((r["method"], r["w_bits"]) for r in recs) == [("gptq", 3), ("gptq", 4), ("rtn", 3), ("rtn", 4)]
    assert all(r["status"] == "ok" and 1 < r["metrics"]["ppl"]["wikivital"] < 1e4 for r in recs)
    assert len({r["run_id"] for r in recs}) == 4
    jobs = _sacct_settled(name, since, 4)
    if jobs is not None:
        print("sacct after the sweep:", jobs)
        assert sorted(jobs.values()) == ["COMPLETED"] * 4 and all(re.fullmatch(r"\d+_[0-3]", j) for j in jobs)
    subdirs = sorted(f"bits={b},eval.max_windows=8,method={m},model=tiny-opt,nsamples=4" for b in (3, 4)
                     for m in ("gptq", "rtn"))
    assert sorted(p.name for p in (tmp_path / "first").iterdir()) == [".status", ".submitit", *subdirs, "multirun.yaml"]
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*.json")}

    again = _run_cli(*_slurm_sweep(tmp_path, name, "again", *sweep), timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _job_logs(tmp_path / "again").count("skip: a record of this configuration exists") == 4
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*.json")} == mtimes
    jobs = _sacct_settled(name, since, 8)
    if jobs is not None:
        print("sacct after the rerun:", jobs)
        assert sorted(jobs.values()) == ["COMPLETED"] * 8


@needs_tiny_opt
@pytest.mark.slurm
def test_slurm_job_preempted_mid_quantization_requeues_resumes_and_ends_with_the_same_ppl(
        slurm, tmp_path):
    name = f"ptq-preempt-{uuid.uuid4().hex[:8]}"
    since = (datetime.now() - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%S")
    env = dict(os.environ, HYDRA_FULL_ERROR="1")
    proc = subprocess.Popen([sys.executable, "run.py", *_slurm_sweep(tmp_path, name, "sweep", *RESUMED, *KILLED["gptq"])], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        _wait_until(lambda: (_progress(tmp_path / "ckpt") or {}).get("next_block", 0) >= 1 or proc.poll() is not None,
                    180, "the job to finish block 0")
        job = _sh("squeue", "-h", "-n", name, "-o", "%i").split()
        assert len(job) == 1, (job, proc.poll())
        _sh("scancel", "--signal=USR2", job[0])
        # requeued: it leaves RUNNING, and its checkpoint says where it stopped
        _wait_until(lambda: _sh("squeue", "-h", "-j", job[0], "-o", "%T", check=False).strip() not in ("RUNNING", ""),
                    60, "the job to be requeued", interval=0.2)
        stopped_at = _progress(tmp_path / "ckpt")["next_block"]
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            subprocess.run(["scancel", "-n", name], capture_output=True, timeout=CMD_TIMEOUT_S)
    assert proc.returncode == 0, out[-3000:]
    assert 1 <= stopped_at < N_BLOCKS
    logs = _job_logs(tmp_path / "sweep")
    assert "Caught signal SIGUSR2" in logs and "Requeued" in logs, logs[-3000:]
    assert f"resuming at block {stopped_at} of {N_BLOCKS}" in logs
    (record,) = _records(tmp_path / "runs")
    assert f"resumed at block {stopped_at} of {N_BLOCKS}" in record["notes"]
    reference = uninterrupted_ppl(tmp_path / "uninterrupted", KILLED["gptq"])
    assert record["metrics"]["ppl"]["wikivital"] == reference
    print(f"preempted after block {stopped_at - 1}, resumed at block {stopped_at}; "
          f"PPL {record['metrics']['ppl']['wikivital']!r} (uninterrupted {reference!r})")
    jobs = _sacct_settled(name, since, 1)
    if jobs is not None:
        assert list(jobs.values()) == ["COMPLETED"]
        history = _sh("sacct", "-n", "-X", "-P", "-D", "--name", name, "-S", since, "-o", "JobID,State,Start")
        print("sacct -D:", history)
        assert "REQUEUED" in history or "PREEMPTED" in history
