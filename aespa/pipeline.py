"""The block-sequential pipeline: capture, then per block quantize and propagate.

1. Capture the inputs of block 0 (and the keyword arguments the model passes to its
   blocks: attention mask, position ids, rotary embeddings) with a catcher that stops
   the forward pass there. Whatever the model passes is replayed as is, so the loop
   survives changes of the blocks' signatures across transformers releases.
2. For each block: move it to the device; if the method asks for it, run the
   full-precision block on the full-precision stream (targets, and the next block's
   full-precision inputs); let the method quantize it; run the quantized block on the
   quantized stream to get the next block's inputs; move it back.

Only one block is on the device at a time. Perplexity is computed the same way, block
by block, so a model larger than the device still evaluates.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from aespa.adapters import BlockAdapter, ModelAdapter
from aespa.quant import Grid


class _Stop(Exception):
    pass


class _Catcher(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block
        self.inputs: list[torch.Tensor] = []
        self.kwargs: dict | None = None

    def forward(self, hidden, *args, **kwargs):
        self.inputs.append(hidden.detach())
        if self.kwargs is None:
            self.kwargs = kwargs
        raise _Stop


def _to(obj, device, dtype=None):
    if torch.is_tensor(obj):
        if dtype is not None and obj.is_floating_point():
            return obj.to(device=device, dtype=dtype)
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device, dtype) for k, v in obj.items()}
    return obj


def _batch_one(obj, batch: int):
    """Keep the first batch row of tensors whose leading dim is the capture batch,
    so the block kwargs broadcast over any batch size."""
    if torch.is_tensor(obj):
        return obj[:1] if obj.dim() > 0 and obj.shape[0] == batch and batch > 1 else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_batch_one(o, batch) for o in obj)
    return obj


_DROP = ("past_key_values", "cache", "past_key_value", "use_cache", "output_attentions")


@torch.no_grad()
def capture_inputs(adapter: ModelAdapter, ids: torch.Tensor, device, batch_size: int = 8,
                   store_device="cpu") -> tuple[torch.Tensor, dict]:
    """Inputs of block 0 for every window of ``ids`` ``[n, T]`` -> ``([n, T, d], kwargs)``."""
    blocks = adapter.blocks
    outside = adapter.outside_modules()
    for m in outside:
        m.to(device)
    catcher = _Catcher(blocks[0])
    blocks[0] = catcher
    try:
        for i in range(0, ids.shape[0], batch_size):
            try:
                adapter.model(ids[i : i + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        blocks[0] = catcher.block
    first_batch = min(batch_size, ids.shape[0])
    kwargs = {k: _batch_one(v, first_batch) for k, v in (catcher.kwargs or {}).items() if k not in _DROP}
    hidden = torch.cat([h.to(store_device) for h in catcher.inputs])
    return hidden, kwargs


def block_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def run_block(module: nn.Module, x: torch.Tensor, kwargs: dict, device, dtype, batch_size: int = 8,
              store_device=None) -> torch.Tensor:
    """The block applied to every sample of ``x`` ``[n, T, d]``, in mini-batches."""
    store_device = store_device or x.device
    kw = _to(kwargs, device, dtype)
    outs = []
    for i in range(0, x.shape[0], batch_size):
        out = block_output(module(x[i : i + batch_size].to(device=device, dtype=dtype), **kw))
        outs.append(out.to(device=store_device, dtype=x.dtype))
    return torch.cat(outs)


@dataclass
class BlockContext:
    """What a method sees of one block: the block (through its adapter), the
    calibration inputs of both streams, and helpers to run it."""

    block: BlockAdapter
    inputs: torch.Tensor  # quantized-stream inputs [n, T, d]
    kwargs: dict
    device: torch.device
    dtype: torch.dtype  # compute dtype of the block during quantization (fp32)
    batch_size: int = 8
    fp_inputs: torch.Tensor | None = None  # full-precision-stream inputs (needs_fp_stream)
    fp_outputs: torch.Tensor | None = None  # full-precision block on the full-precision stream
    grids: dict[str, Grid] = field(default_factory=dict)  # role -> grid of the quantized weight
    phases: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def index(self) -> int:
        return self.block.index

    def run(self, x: torch.Tensor | None = None) -> torch.Tensor:
        """Outputs of the block (as it is now) on ``x`` (default: the quantized-stream inputs)."""
        x = self.inputs if x is None else x
        with torch.no_grad():
            return run_block(self.block.module, x, self.kwargs, self.device, self.dtype, self.batch_size)

    def call_kwargs(self) -> dict:
        """The keyword arguments of the block call, on the device (for methods that train)."""
        return _to(self.kwargs, self.device, self.dtype)

    def set_weight(self, role: str, weight: torch.Tensor, grid: Grid | None = None) -> None:
        """Write the quantized weight of a linear; keep its grid for export."""
        lin = self.block.linear(role)
        with torch.no_grad():
            lin.weight.copy_(weight.to(lin.weight.dtype))
        if grid is not None:
            self.grids[role] = grid

    @contextlib.contextmanager
    def phase(self, name: str):
        """Time a phase of the method (accumulated over blocks in the record)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - t


@dataclass
class QuantizeResult:
    phases: dict[str, float] = field(default_factory=dict)
    grids: dict[str, Grid] = field(default_factory=dict)  # "<block>.<role>" -> grid
    notes: list[str] = field(default_factory=list)
    earlier_s: float = 0.0  # quantization wall time of the earlier, interrupted segments of a resumed run


def quantize_model(adapter: ModelAdapter, method, calibration: torch.Tensor, device, batch_size: int = 8,
                   model_dtype=torch.float32, checkpoint=None, progress: bool = True) -> QuantizeResult:
    """Quantize every block of the model, in order, with ``method``.

    ``checkpoint`` (optional) persists the state after each block and restores it on a
    rerun (see ``experiments.resume``).
    """
    device = torch.device(device)
    result = QuantizeResult()
    segment_start = time.perf_counter()
    method.prepare(adapter, calibration)
    start = 0
    state = checkpoint.load(adapter, method, device) if checkpoint is not None else None
    if state is not None:
        start, q_in, fp_in, kwargs, result = state["next_block"], state["q_in"], state["fp_in"], state["kwargs"], state["result"]
        print(f"resuming at block {start} of {len(adapter.blocks)}", flush=True)
        result.notes.append(f"resumed at block {start} of {len(adapter.blocks)}")
    else:
        with torch.no_grad():
            q_in, kwargs = capture_inputs(adapter, calibration, device, batch_size, store_device=device)
        fp_in = q_in.clone() if method.needs_fp_stream else None
    n_blocks = len(adapter.blocks)
    bar = tqdm(range(start, n_blocks), desc=f"quantize ({method.name})", disable=not progress, initial=start,
               total=n_blocks)
    for i in bar:
        block = adapter.block(i)
        block.module.to(device=device, dtype=torch.float32)
        fp_out = None
        if fp_in is not None:
            with torch.no_grad():
                fp_out = run_block(block.module, fp_in, kwargs, device, torch.float32, batch_size)
        ctx = BlockContext(block, q_in, kwargs, device, torch.float32, batch_size, fp_in, fp_out)
        method.quantize_block(ctx)
        with torch.no_grad():
            q_in = run_block(block.module, q_in, kwargs, device, torch.float32, batch_size)
        fp_in = fp_out
        block.module.to(dtype=model_dtype)
        if device.type == "cuda":
            block.module.to("cpu")
        for k, v in ctx.phases.items():
            result.phases[k] = result.phases.get(k, 0.0) + v
        result.grids.update({f"{i}.{role}": g for role, g in ctx.grids.items()})
        result.notes.extend(f"block {i}: {n}" for n in ctx.notes)
        if checkpoint is not None:
            checkpoint.save(adapter, method, {"next_block": i + 1, "q_in": q_in, "fp_in": fp_in, "kwargs": kwargs,
                                              "result": result,
                                              "elapsed_s": result.earlier_s + time.perf_counter() - segment_start})
    method.finish(adapter)
    return result


@torch.no_grad()
def perplexity(adapter: ModelAdapter, windows: torch.Tensor, device, batch_size: int = 8, dtype=None,
               progress: bool = True, desc: str = "perplexity") -> float:
    """exp(mean over windows of the mean next-token NLL), computed block by block.

    ``windows`` ``[n, T]`` are non-overlapping test windows; each is a fresh context.
    """
    device = torch.device(device)
    dtype = dtype or next(adapter.model.parameters()).dtype
    hidden, kwargs = capture_inputs(adapter, windows, device, batch_size, store_device=device)
    for i in tqdm(range(len(adapter.blocks)), desc=desc, disable=not progress, leave=False):
        module = adapter.blocks[i]
        module.to(device)
        hidden = run_block(module, hidden, kwargs, device, dtype, batch_size)
        if device.type == "cuda":
            module.to("cpu")
    nll = 0.0
    for m in adapter.outside_modules():
        m.to(device)
    for i in range(0, windows.shape[0], batch_size):
        logits = adapter.logits(hidden[i : i + batch_size].to(device)).float()
        target = windows[i : i + batch_size].to(device)
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target[:, 1:].reshape(-1),
                                           reduction="none").view(target.shape[0], -1).mean(dim=1)
        nll += loss.sum().item()
    return math.exp(nll / windows.shape[0])
