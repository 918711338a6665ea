"""Block-level checkpoints, so a killed or preempted run resumes where it stopped.

After each block the pipeline hands its state to :class:`BlockCheckpoint`, which
writes, under a folder named by the run id (a hash of the resolved config, so state
is never applied to another configuration):

- ``block-<i>.pt``: the parameters and buffers of block ``i``, written once, when the
  block is quantized (so the I/O per block stays constant, not quadratic in depth); a
  method that changes a block's structure (activation quantizers, reassembled linears:
  modules and hooks, not tensors) re-creates it in ``Method.restore_block(block)`` before
  the tensors are loaded,
- ``state.pt``: both input streams of the next block (quantized, and full precision
  when the method uses it: recomputing the full-precision stream from a quantized
  model would be wrong), the block keyword arguments, the grids, phase timings,
  quantization wall time and notes so far, the RNG states (torch CPU and CUDA, numpy,
  random) and the method's own state (``Method.state_dict``),
- ``progress.json``: ``{"run_id", "next_block", "n_blocks"}``, for people and scripts
  watching a run.

Every file is written to a unique temporary file in the same folder, flushed to disk
and renamed over the old one, so a process killed at any moment (SIGKILL, preemption,
node failure) leaves the previous complete state; ``state.pt`` is renamed last, so it
never names a block whose file is missing. A rerun of the same configuration restores
all of it and continues at the next block; on CPU the final result is bit-identical
to an uninterrupted run. The checkpoint is removed once the run's record is written.
Files load with ``weights_only=True``.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
from typing import TYPE_CHECKING

import numpy as np
import torch

from aespa.core.adapters import ModelAdapter
from aespa.core.grid import Grid
from aespa.core.io import atomic_write
from aespa.core.observe import to_device

if TYPE_CHECKING:
    from aespa.core.method import Method

STATE = "state.pt"
PROGRESS = "progress.json"
log = logging.getLogger(__name__)


class BlockCheckpoint:
    def __init__(self, root: str, run_id: str):
        self.folder = os.path.join(root, run_id)
        self.run_id = run_id

    @property
    def path(self) -> str:
        return os.path.join(self.folder, STATE)

    def block_path(self, i: int) -> str:
        return os.path.join(self.folder, f"block-{i:04d}.pt")

    def progress(self) -> dict | None:
        """The last completed state as ``{"run_id", "next_block", "n_blocks"}``, or None."""
        try:
            with open(os.path.join(self.folder, PROGRESS)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def save(self, adapter: ModelAdapter, method: Method, state: dict) -> None:
        n = state["next_block"]
        result = state["result"]
        for i in range(n):  # normally only block n-1; earlier ones if their file is missing
            if i == n - 1 or not os.path.exists(self.block_path(i)):
                block = {"weights": {k: v.detach().cpu() for k, v in adapter.blocks[i].state_dict().items()}}
                atomic_write(self.block_path(i), lambda f, b=block: torch.save(b, f))
        rng = {"torch": torch.get_rng_state(), "numpy": _np_state(), "random": _py_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        payload = {
            "run_id": self.run_id,
            "next_block": n,
            "q_in": state["q_in"].cpu(),
            "fp_in": None if state["fp_in"] is None else state["fp_in"].cpu(),
            "kwargs": to_device(state["kwargs"], "cpu"),
            "phases": dict(result.phases),
            "elapsed_s": float(state.get("elapsed_s", 0.0)),
            "grids": {k: g.to_dict() for k, g in result.grids.items()},
            "notes": list(result.notes),
            "rng": rng,
            "method": method.state_dict(),
        }
        atomic_write(self.path, lambda f: torch.save(payload, f))
        progress = {"run_id": self.run_id, "next_block": n, "n_blocks": len(adapter.blocks)}
        atomic_write(os.path.join(self.folder, PROGRESS), lambda f: f.write(json.dumps(progress).encode()))

    def load(self, adapter: ModelAdapter, method: Method, device=None) -> dict | None:
        """Restore the saved state into ``adapter``/``method`` and the RNGs; returns the
        pipeline state (streams and kwargs on ``device``), or None when there is none."""
        from aespa.core.pipeline import QuantizeResult

        if not os.path.exists(self.path):
            return None
        try:
            payload = torch.load(self.path, weights_only=True)
            blocks = [torch.load(self.block_path(i), weights_only=True) for i in range(payload["next_block"])]
        except Exception as e:  # cannot happen with atomic writes, unless files were edited or lost
            log.warning(f"cannot read the checkpoint in {self.folder} ({type(e).__name__}: {e}); starting over")
            return None
        if payload.get("run_id") != self.run_id:
            return None
        device = torch.device(device) if device is not None else adapter.model.device
        for i, saved in enumerate(blocks):
            block = adapter.block(i)
            method.restore_block(block)  # structural changes first (modules and hooks), then the tensors
            block.module.load_state_dict(saved["weights"])
        method.load_state_dict(payload["method"])
        rng = payload["rng"]
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])
        np.random.set_state(_np_restore(rng["numpy"]))
        random.setstate(_py_restore(rng["random"]))
        result = QuantizeResult(dict(payload["phases"]), {k: Grid.from_dict(g) for k, g in payload["grids"].items()},
                                list(payload["notes"]), float(payload.get("elapsed_s", 0.0)))
        return {"next_block": payload["next_block"], "q_in": payload["q_in"].to(device),
                "kwargs": to_device(payload["kwargs"], device),
                "fp_in": None if payload["fp_in"] is None else payload["fp_in"].to(device), "result": result}

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


# RNG states as plain containers (tensors, ints, lists), loadable with weights_only=True
def _np_state():
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def _np_restore(d):
    return (d["name"], d["keys"].numpy().astype(np.uint32), d["pos"], d["has_gauss"], d["gauss"])


def _py_state():
    version, internal, gauss = random.getstate()
    return {"version": version, "internal": list(internal), "gauss": gauss}


def _py_restore(d):
    return (d["version"], tuple(d["internal"]), d["gauss"])
