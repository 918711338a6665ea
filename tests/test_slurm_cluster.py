"""Checks against a real SLURM cluster (e.g. the one from experiments/cluster/slurm_local.sh).

Every test is marked ``slurm`` and is skipped unless ``sinfo`` answers, so the suite
passes on machines without a cluster.  Run them with::

    bash experiments/cluster/slurm_local.sh up
    pytest -m slurm tests/test_slurm_cluster.py

Each test writes into its own ``tmp_path`` (job ids restart at 1 after a wiped cluster,
so output paths keyed only by job id could be stale) and cancels its jobs on exit.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

CMD_TIMEOUT_S = 30  # one sbatch/scontrol/sacct call
TEST_BUDGET_S = 60  # whole test


def _run(*args: str, timeout: float = CMD_TIMEOUT_S, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return proc


def _controllers_refuse() -> str | None:
    """Fast pre-check: sinfo retries for ~10 s when slurmctld is down.

    Returns a reason if slurm.conf names controllers and none accepts a TCP connection;
    None when it cannot tell (no readable slurm.conf) or a controller answers.
    """
    conf = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf"))
    try:
        text = conf.read_text()
    except OSError:
        return None
    port_match = re.search(r"^\s*SlurmctldPort\s*=\s*(\d+)", text, re.M | re.I)
    port = int(port_match.group(1)) if port_match else 6817
    hosts = re.findall(r"^\s*SlurmctldHost\s*=\s*([^\s#(]+)(?:\(([^)\s]+)\))?", text, re.M | re.I)
    if not hosts:
        return None
    for name, addr in hosts:
        try:
            with socket.create_connection((addr or name, port), timeout=3):
                return None
        except OSError:
            continue
    return f"slurmctld not accepting connections on port {port} ({conf})"


def _cluster_unreachable_reason() -> str | None:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "SLURM client tools (sinfo, sbatch) are not installed"
    refused = _controllers_refuse()
    if refused:
        return "no SLURM cluster reachable: " + refused
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%P %a %D"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "sinfo did not respond within 15 s"
    except OSError as exc:
        return f"sinfo could not run: {exc}"
    if proc.returncode != 0 or not proc.stdout.strip():
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        return "no SLURM cluster reachable (sinfo: " + (msg[-1] if msg else f"exit {proc.returncode}") + ")"
    return None


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster():
    reason = _cluster_unreachable_reason()
    if reason:
        pytest.skip(reason + "; start one with: bash experiments/cluster/slurm_local.sh up")


@pytest.fixture
def jobs():
    """Job ids submitted by a test; cancelled afterwards whatever happened."""
    ids: list[str] = []
    yield ids
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=CMD_TIMEOUT_S)


def _sbatch(jobs: list[str], *args: str, timeout: float = CMD_TIMEOUT_S) -> str:
    out = _run("sbatch", "--parsable", *args, timeout=timeout).stdout.strip()
    job_id = out.split(";")[0]
    assert job_id.isdigit(), f"unexpected sbatch output: {out!r}"
    jobs.append(job_id)
    return job_id


def _wait_until(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _job_field(job_id: str, field: str) -> str:
    """A field of `scontrol show job` (completed jobs stay visible for MinJobAge)."""
    proc = _run("scontrol", "show", "job", "-o", job_id, check=False)
    match = re.search(rf"\b{field}=(\S+)", proc.stdout)
    return match.group(1) if match else ""


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)
    return path


def test_array_job_completes_in_sacct(tmp_path, jobs):
    name = f"ptq-array-{uuid.uuid4().hex[:8]}"
    since = (datetime.now() - timedelta(minutes=2)).strftime("%Y-%m-%dT%H:%M:%S")
    job_id = _sbatch(
        jobs, "--array=0-1", "-J", name, "-o", f"{tmp_path}/%A_%a.out", "--wait",
        "--wrap", "echo task=$SLURM_ARRAY_TASK_ID",
        timeout=TEST_BUDGET_S,
    )
    for task in (0, 1):
        assert _read(tmp_path / f"{job_id}_{task}.out").strip() == f"task={task}"

    probe = _run("sacct", "-n", "-X", "-j", job_id, check=False)
    if "accounting storage is disabled" in (probe.stdout + probe.stderr):
        pytest.skip("SLURM accounting is disabled (SLURM_ACCOUNTING=0): sacct cannot be checked")

    # `sacct -j <array id>` shows a single task; select by the unique job name instead
    def both_completed():
        out = _run("sacct", "-n", "-X", "-P", "--name", name, "-S", since, "-o", "JobID,State").stdout
        rows = dict(line.split("|", 1) for line in out.splitlines() if "|" in line)
        return rows if rows == {f"{job_id}_0": "COMPLETED", f"{job_id}_1": "COMPLETED"} else None

    _wait_until(both_completed, 20, f"both tasks of array job {job_id} COMPLETED in sacct")


def test_requeued_job_runs_again(tmp_path, jobs):
    out = tmp_path / "requeue.out"
    script = _script(
        tmp_path / "requeue.sh",
        'echo "start restart_count=${SLURM_RESTART_COUNT:-0}"\n'
        'if [ "${SLURM_RESTART_COUNT:-0}" -ge 1 ]; then exit 0; fi\n'
        "sleep 120\n",
    )
    job_id = _sbatch(jobs, "--requeue", "--open-mode=append", "-o", str(out), str(script))

    _wait_until(lambda: _read(out).count("start") >= 1 and _job_field(job_id, "JobState") == "RUNNING",
                30, "the first start")
    _run("scontrol", "requeue", job_id)
    # the restart waits for cred_expire (10 s with slurm_local.sh; 120 s by Slurm's default)
    _wait_until(lambda: _read(out).count("start") >= 2, 45, "the job to start a second time")
    _wait_until(lambda: _job_field(job_id, "JobState") == "COMPLETED", 15, "the requeued job to complete")

    starts = [line for line in _read(out).splitlines() if line.startswith("start")]
    assert starts == ["start restart_count=0", "start restart_count=1"], _read(out)
    assert _job_field(job_id, "Restarts") == "1"


@pytest.mark.parametrize("where", ["step", "batch"])
def test_usr2_reaches_job_trap(tmp_path, jobs, where):
    """`scancel --signal=USR2` (what submitit's preemption path relies on) reaches the trap.

    step:  the work runs under `srun` as submitit does; plain `scancel --signal` signals steps.
    batch: the trap is in the batch shell itself, which only `--full`/`--batch` signals.
    """
    out = tmp_path / "usr2.out"
    trap = (
        'trap \'echo "got USR2 in $0"; exit 0\' USR2\n'
        "echo ready\n"
        "while :; do sleep 0.2; done\n"
    )
    if where == "step":
        step = _script(tmp_path / "step.sh", trap)
        script = _script(tmp_path / "job.sh", f"srun --unbuffered {step}\n")
        scancel = ["scancel", "--signal=USR2"]
    else:
        script = _script(tmp_path / "job.sh", trap)
        scancel = ["scancel", "--full", "--signal=USR2"]
    job_id = _sbatch(jobs, "-o", str(out), str(script))

    _wait_until(lambda: "ready" in _read(out), 30, "the job to install its trap")
    _run(*scancel, job_id)
    _wait_until(lambda: _job_field(job_id, "JobState") in {"COMPLETED", "FAILED", "CANCELLED"},
                20, "the job to leave its trap")
    assert "got USR2" in _read(out), _read(out)
    assert _job_field(job_id, "JobState") == "COMPLETED", _read(out)
