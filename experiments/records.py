"""Run records: one JSON file per run, written atomically, named by a hash of the
resolved configuration (so a sweep can skip what already ran)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import socket
import subprocess
from pathlib import Path

from aespa.core.errors import UserError
from aespa.core.io import atomic_write

log = logging.getLogger(__name__)

# keys of the resolved config that do not change a run's result ("experiment": the paper-table
# bookkeeping of conf/experiment/*.yaml, whose effect is in the top-level keys it sets)
NON_SEMANTIC = ("force", "progress", "logger", "results_dir", "cache_dir", "save", "save_dir", "save_format", "device",
                "batch_size", "hydra", "resume", "checkpoint_dir", "experiment", "plan", "plan_tflops")
# keys that only matter when something is quantized: a full-precision run is the same run whatever they are
QUANTIZATION_ONLY = ("method", "bits", "group_size", "sym", "act_bits", "nsamples", "seed", "calib")


def is_quantized(config: dict) -> bool:
    """The runner's rule: bits=16 and act_bits=16 (or method none) is the full-precision model."""
    method = (config.get("method") or {}).get("name", "none")
    return method != "none" and (config.get("bits", 16) < 16 or config.get("act_bits", 16) < 16)


# model keys that only matter for an architecture twin (model.twin=true, experiments/twins.py): a run
# of the real model is the same run whatever they are
TWIN_ONLY = ("arch", "twin", "twin_layers", "twin_hidden")


def run_id(config: dict) -> str:
    """A stable 12-hex id of the configuration that determines the result."""
    ignored = NON_SEMANTIC + (() if is_quantized(config) else QUANTIZATION_ONLY)
    semantic = {k: v for k, v in config.items() if k not in ignored}
    model = semantic.get("model")
    if isinstance(model, dict) and not model.get("twin"):
        semantic["model"] = {k: v for k, v in model.items() if k not in TWIN_ONLY}
    return hashlib.sha256(json.dumps(semantic, sort_keys=True, default=str).encode()).hexdigest()[:12]


def record_path(results_dir: str, rid: str) -> str:
    return os.path.join(results_dir, f"{rid}.json")


def read_record(path: str) -> dict | None:
    """The record at ``path``, or None when there is none; an unreadable one (a truncated
    file) is reported in one warning line and treated as absent, so the run is redone."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
        if isinstance(record, dict) and "run_id" in record:
            return record
        raise ValueError("not a run record")
    except (OSError, ValueError) as e:
        log.warning(f"ignoring the unreadable record {path} ({' '.join(str(e).split())}); the run is redone")
        return None


class RunLock:
    """One process at a time per configuration: an exclusive ``flock`` on
    ``<results_dir>/.lock-<run_id>``, held for the whole run. A second process with the
    same configuration gets a one-line UserError instead of racing on the record. The lock
    file is removed when the run ends (while still locked), so a finished run leaves only its
    record."""

    def __init__(self, results_dir: str, rid: str):
        self.path = os.path.join(results_dir, f".lock-{rid}")
        self.rid = rid
        self.file = None

    def __enter__(self) -> RunLock:
        import fcntl

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.file = open(self.path, "a")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.close()
            raise UserError(f"another process is running this configuration now (run id {self.rid}, lock "
                            f"{self.path}); wait for its record, or change a setting") from None
        return self

    def __exit__(self, *exc) -> None:
        import fcntl

        with contextlib.suppress(OSError):
            os.unlink(self.path)
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


def write_record(path: str, record: dict) -> None:
    """Write a run record atomically (see ``atomic_write``)."""
    atomic_write(path, lambda f: f.write(json.dumps(record, indent=2, default=str).encode()))


def read_records(folder: str | os.PathLike) -> list[dict]:
    """Every run record (a JSON object with ``schema`` and ``run_id``) under ``folder``,
    recursively, in path order. Temporary files (``.tmp-*``) and other JSON (e.g. wandb's)
    are skipped; an unreadable or truncated file is skipped with one warning line naming
    it, and so is a record whose perplexity is not a finite number. A missing folder means
    no runs yet."""
    records = []
    for path in sorted(Path(folder).rglob("*.json")) if Path(folder).is_dir() else []:
        if path.name.startswith("."):
            continue
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            log.warning(f"skipping unreadable record {path}: {' '.join(str(e).split())}")
            continue
        if not (isinstance(record, dict) and "schema" in record and "run_id" in record):
            continue
        bad = [k for k, v in ((record.get("metrics") or {}).get("ppl") or {}).items()
               if isinstance(v, float) and not math.isfinite(v)]
        if bad and record.get("status") == "ok":
            log.warning(f"skipping the record {path}: its perplexity on {', '.join(bad)} is not finite")
            continue
        records.append(record)
    return records


def git_commit(repo: str) -> str | None:
    try:
        sha = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if sha.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def hostname() -> str:
    return socket.gethostname()
