"""What became of each job of a ``-m`` sweep, and the sweep's summary.

A job that fails (bad input, a non-finite value, a record it could not write) does not stop
the sweep: it leaves ``<sweep dir>/.status/<job>.json`` with its overrides, its status and
its error, the others go on. When the sweep ends, :class:`SweepSummary` (a Hydra callback
registered in ``conf/config.yaml``; it runs in the submitting process whatever the launcher)
prints one line per failed job and a total, and ``run.py`` exits with the number of failed
jobs as its status (0: every job recorded or skipped).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from hydra.experimental.callback import Callback

from aespa.core.io import atomic_write

STATUS = ".status"
failed_jobs = 0  # set by SweepSummary at the end of a sweep, read by run.py


def job_status(status: str, error: str | None = None) -> None:
    """Record this job's outcome in its sweep's status folder (no-op outside a sweep)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    hydra = HydraConfig.get()
    entry = {"job": hydra.job.num, "overrides": list(hydra.overrides.task), "status": status, "error": error}
    path = os.path.join(hydra.sweep.dir, STATUS, f"{hydra.job.num:05d}.json")
    atomic_write(path, lambda f: f.write(json.dumps(entry).encode()))


def in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


class SweepSummary(Callback):
    """Prints the failed jobs of a sweep and their number; ``run.py`` exits with it."""

    def on_multirun_end(self, config, **kwargs) -> None:
        global failed_jobs
        entries = [json.loads(p.read_text()) for p in sorted(Path(str(config.hydra.sweep.dir), STATUS).glob("*.json"))]
        failed = [e for e in entries if e["status"] == "failed"]
        for e in failed:
            print(f"failed: job {e['job']} ({' '.join(e['overrides'])}): {e['error']}", flush=True)
        counts = {s: sum(e["status"] == s for e in entries) for s in ("ok", "skipped", "failed")}
        print(f"sweep: {len(entries)} jobs: {counts['ok']} recorded, {counts['skipped']} skipped (recorded "
              f"before), {counts['failed']} failed", flush=True)
        failed_jobs = len(failed)
