"""Block-level checkpoints, so a killed or preempted run resumes where it stopped.

After each block the pipeline hands its state to :class:`BlockCheckpoint`, which
writes, atomically, under a folder named by the run id (a hash of the resolved
config, so state is never applied to another configuration):

- the parameters and buffers of every block quantized so far,
- both input streams (quantized, and full precision when the method uses it:
  recomputing the full-precision stream from a quantized model would be wrong),
- the block keyword arguments, the grids, phase timings and notes so far,
- the RNG states (torch, numpy, random) and the method's own state, if it has one.

A rerun of the same configuration restores all of it and continues at the next block;
on CPU the final result is bit-identical to an uninterrupted run. The checkpoint is
removed once the run's record is written. Files load with ``weights_only=True``.
"""
from __future__ import annotations

import os
import random
import shutil

import numpy as np
import torch

from aespa.quant import Grid

STATE = "state.pt"


def _grid_to_dict(g: Grid) -> dict:
    d = {"scale": g.scale.cpu(), "zero": g.zero.cpu(), "bits": g.bits, "group_size": g.group_size}
    if g.col_scale is not None:
        d["col_scale"] = g.col_scale.cpu()
    return d


def _grid_from_dict(d: dict) -> Grid:
    return Grid(d["scale"], d["zero"], d["bits"], d["group_size"], d.get("col_scale"))


class BlockCheckpoint:
    def __init__(self, root: str, run_id: str):
        self.folder = os.path.join(root, run_id)
        self.run_id = run_id

    @property
    def path(self) -> str:
        return os.path.join(self.folder, STATE)

    def save(self, adapter, method, state: dict) -> None:
        from aespa.pipeline import QuantizeResult  # noqa: F401  (documented type of state["result"])

        n = state["next_block"]
        result = state["result"]
        payload = {
            "run_id": self.run_id,
            "next_block": n,
            "blocks": [{k: v.detach().cpu() for k, v in adapter.blocks[i].state_dict().items()} for i in range(n)],
            "q_in": state["q_in"].cpu(),
            "fp_in": None if state["fp_in"] is None else state["fp_in"].cpu(),
            "kwargs": _cpu(state["kwargs"]),
            "phases": dict(result.phases),
            "grids": {k: _grid_to_dict(g) for k, g in result.grids.items()},
            "notes": list(result.notes),
            "rng": {"torch": torch.get_rng_state(), "numpy": _np_state(), "random": _py_state()},
            "method": method.state_dict() if hasattr(method, "state_dict") else {},
        }
        os.makedirs(self.folder, exist_ok=True)
        tmp = f"{self.path}.{os.getpid()}.tmp"
        torch.save(payload, tmp)
        os.replace(tmp, self.path)

    def load(self, adapter, method):
        from aespa.pipeline import QuantizeResult

        if not os.path.exists(self.path):
            return None
        try:
            payload = torch.load(self.path, weights_only=True)
        except Exception:
            return None  # unreadable (torn) state: start over
        if payload.get("run_id") != self.run_id:
            return None
        device = adapter.model.device
        for i, sd in enumerate(payload["blocks"]):
            block = adapter.block(i)
            if hasattr(method, "resume_block"):
                method.resume_block(block)
            block.module.load_state_dict(sd)
        if hasattr(method, "load_state_dict") and payload["method"]:
            method.load_state_dict(payload["method"])
        torch.set_rng_state(payload["rng"]["torch"])
        np.random.set_state(_np_restore(payload["rng"]["numpy"]))
        random.setstate(_py_restore(payload["rng"]["random"]))
        result = QuantizeResult(dict(payload["phases"]), {k: _grid_from_dict(g) for k, g in payload["grids"].items()},
                                list(payload["notes"]))
        return {"next_block": payload["next_block"], "q_in": payload["q_in"].to(device), "kwargs": payload["kwargs"],
                "fp_in": None if payload["fp_in"] is None else payload["fp_in"].to(device), "result": result}

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _cpu(obj):
    if torch.is_tensor(obj):
        return obj.cpu()
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cpu(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    return obj


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
