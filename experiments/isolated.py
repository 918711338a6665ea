"""Run a function in a fresh process: its own peak RSS, thread count and imports (the
benchmarks measure one configuration per process)."""
from __future__ import annotations

import multiprocessing as mp
import queue as queue_module
from collections.abc import Callable

from aespa.core.errors import UserError


def _child(fn: Callable, args: tuple, threads: int | None, queue) -> None:
    try:
        if threads:
            import torch

            torch.set_num_threads(threads)
        queue.put(("ok", fn(*args)))
    except UserError as e:
        queue.put(("error", str(e)))
    except Exception as e:  # reported in the result's place; the caller goes on with the others
        queue.put(("error", f"{type(e).__name__}: {e}"))


def run_isolated(fn: Callable, *args, threads: int | None = None):
    """``fn(*args)`` in a spawned process with ``threads`` torch threads; its return value, or
    RuntimeError with the child's one-line error. ``fn`` must be importable (module level)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, threads, queue))
    proc.start()
    while True:  # a child that dies without reporting (killed, a crash in native code) ends the wait too
        try:
            status, payload = queue.get(timeout=5)
            break
        except queue_module.Empty:
            if not proc.is_alive():
                try:  # its result may have reached the queue as it exited
                    status, payload = queue.get(timeout=1)
                except queue_module.Empty:
                    status, payload = "error", f"the worker process died (exit status {proc.exitcode})"
                break
    proc.join()
    if status != "ok":
        raise RuntimeError(payload)
    return payload
