"""Run records: one JSON file per run, written atomically, named by a hash of the
resolved configuration (so a sweep can skip what already ran)."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import tempfile

# keys of the resolved config that do not change a run's result ("experiment": the paper-table
# bookkeeping of conf/experiment/*.yaml, whose effect is in the top-level keys it sets)
NON_SEMANTIC = ("force", "progress", "logger", "results_dir", "cache_dir", "save", "save_dir", "device", "batch_size",
                "hydra", "resume", "checkpoint_dir", "experiment")
# keys that only matter when something is quantized: a full-precision run is the same run whatever they are
QUANTIZATION_ONLY = ("method", "bits", "group_size", "sym", "act_bits", "nsamples", "seed", "calib")


def is_quantized(config: dict) -> bool:
    """The runner's rule: bits=16 and act_bits=16 (or method none) is the full-precision model."""
    method = (config.get("method") or {}).get("name", "none")
    return method != "none" and (config.get("bits", 16) < 16 or config.get("act_bits", 16) < 16)


def run_id(config: dict) -> str:
    """A stable 12-hex id of the configuration that determines the result."""
    ignored = NON_SEMANTIC + (() if is_quantized(config) else QUANTIZATION_ONLY)
    semantic = {k: v for k, v in config.items() if k not in ignored}
    return hashlib.sha256(json.dumps(semantic, sort_keys=True, default=str).encode()).hexdigest()[:12]


def record_path(results_dir: str, rid: str) -> str:
    return os.path.join(results_dir, f"{rid}.json")


def atomic_write(path: str, write) -> None:
    """``write(file)`` into a unique temporary file next to ``path`` (binary), fsync, rename
    over ``path``: readers and concurrent writers never see a partial file. Unique names,
    not a PID (jobs on two nodes of a shared file system can have the same one). The
    temporary name starts with ``.tmp-``, which every reader skips."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_record(path: str, record: dict) -> None:
    """Write a run record atomically (see ``atomic_write``)."""
    atomic_write(path, lambda f: f.write(json.dumps(record, indent=2, default=str).encode()))


def read_records(folder: str) -> list[dict]:
    out = []
    for root, _, files in os.walk(folder):
        for f in sorted(files):
            if f.endswith(".json") and not f.startswith("."):
                with open(os.path.join(root, f)) as fh:
                    out.append(json.load(fh))
    return out


def git_commit(repo: str) -> str | None:
    try:
        sha = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if sha.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def hostname() -> str:
    return socket.gethostname()
