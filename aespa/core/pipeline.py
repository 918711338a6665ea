"""The block-sequential pipeline: capture, then per block (or span of blocks) quantize and
propagate.

1. Capture the inputs of block 0 (and the keyword arguments the model passes to its
   blocks: attention mask, position ids, rotary embeddings) with a catcher that stops
   the forward pass there. Whatever the model passes is replayed as is, so the loop
   survives changes of the blocks' signatures across transformers releases.
2. For each span of blocks the method asks for (``Method.span``; one block for every
   method but QLLM's error correction): move the span to the device; if the method asks
   for it, run the full-precision span on the full-precision stream (its targets, and the
   next span's full-precision inputs); let the method quantize it; run the quantized span
   on the quantized stream to get the next span's inputs; move it back; checkpoint.

Only one span is on the device at a time. Perplexity (``aespa.core.evaluation``) is
computed the same way, block by block, so a model larger than the device still evaluates.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm import tqdm

from aespa.core.adapters import BlockAdapter, ModelAdapter
from aespa.core.attention import AttentionHook
from aespa.core.errors import check_finite
from aespa.core.grid import Grid
from aespa.core.observe import observe_block, run_block, to_device
from aespa.core.progress import ProgressLine, ProgressTask

if TYPE_CHECKING:
    from aespa.core.checkpoint import BlockCheckpoint
    from aespa.core.method import Method

log = logging.getLogger(__name__)


class _Stop(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for block 0: writes the inputs of each mini-batch into one stream ``[n, T, d]``
    (allocated at the first mini-batch, on ``store_device``) and stops the forward pass."""

    def __init__(self, block: nn.Module, n: int, store_device):
        super().__init__()
        self.block, self.n, self.store_device = block, n, store_device
        self.stream: torch.Tensor | None = None
        self.filled = 0
        self.kwargs: dict | None = None

    def forward(self, hidden, *args, **kwargs):
        if self.stream is None:
            self.stream = torch.empty((self.n, *hidden.shape[1:]), dtype=hidden.dtype, device=self.store_device)
        self.stream[self.filled : self.filled + hidden.shape[0]].copy_(hidden.detach())
        self.filled += hidden.shape[0]
        if self.kwargs is None:
            self.kwargs = kwargs
        raise _Stop


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
    catcher = _Catcher(blocks[0], ids.shape[0], store_device)
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
    return catcher.stream, kwargs


@dataclass
class BlockContext:
    """What a method sees of the blocks it quantizes: the blocks (through their adapter), the
    calibration inputs of both streams, and helpers to run and observe them.

    ``blocks`` is the span the method asked for (``Method.span``); for every method but one
    it is a single block, ``block``.
    """

    blocks: list[BlockAdapter]
    inputs: torch.Tensor  # quantized-stream inputs of the first block [n, T, d]
    kwargs: dict
    device: torch.device
    dtype: torch.dtype  # compute dtype of the blocks during quantization (fp32)
    batch_size: int = 8
    fp_inputs: torch.Tensor | None = None  # full-precision-stream inputs (needs_fp_stream)
    fp_outputs: torch.Tensor | None = None  # the full-precision span on the full-precision stream
    grids: dict[str, Grid] = field(default_factory=dict)  # "<block>.<role>" -> grid of the quantized weight
    phases: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # "block <i>: ..." (``note``)
    progress_line: ProgressLine | None = None  # the run's live progress line (``progress``)

    @property
    def block(self) -> BlockAdapter:
        """The first (for most methods, the only) block of the span."""
        return self.blocks[0]

    @property
    def index(self) -> int:
        return self.block.index

    def run(self, x: torch.Tensor | None = None, blocks: list[BlockAdapter] | None = None) -> torch.Tensor:
        """Outputs of the blocks (default: the span, as it is now) on ``x`` (default: the
        quantized-stream inputs)."""
        x = self.inputs if x is None else x
        with torch.no_grad():
            for b in self.blocks if blocks is None else blocks:
                x = run_block(b.module, x, self.kwargs, self.device, self.dtype, self.batch_size)
        return x

    def observe(self, inputs: torch.Tensor | None = None, *, block: BlockAdapter | None = None,
                on_input: Mapping[str, Callable] | None = None, on_output: Mapping[str, Callable] | None = None,
                attention: AttentionHook | None = None, stop: bool = True) -> torch.Tensor | None:
        """:func:`~aespa.core.observe.observe_block` on ``block`` (default: the first block)
        over ``inputs`` (default: the quantized-stream inputs)."""
        return observe_block(block or self.block, self.inputs if inputs is None else inputs, self.kwargs,
                             device=self.device, dtype=self.dtype, batch_size=self.batch_size, on_input=on_input,
                             on_output=on_output, attention=attention, stop=stop)

    def call_kwargs(self) -> dict:
        """The keyword arguments of the block call, on the device (for methods that train)."""
        return to_device(self.kwargs, self.device, self.dtype)

    def set_weight(self, role: str, weight: torch.Tensor, grid: Grid | None = None,
                   block: BlockAdapter | None = None) -> None:
        """Write the quantized weight of a linear of ``block`` (default: the first block);
        keep its grid for export."""
        block = block or self.block
        lin = block.linear(role)
        with torch.no_grad():
            lin.weight.copy_(weight.to(lin.weight.dtype))
        if grid is not None:
            self.grids[f"{block.index}.{role}"] = grid

    def progress(self, phase: str, layer: str = "", total: int | None = None) -> ProgressTask:
        """A task on the run's progress line (``aespa.core.progress``): block, ``phase``,
        ``layer``, step of ``total``, loss, elapsed, ETA; one log line when it closes."""
        line = self.progress_line if self.progress_line is not None else ProgressLine(live=False)
        return line.task(self.index, phase, layer, total)

    def note(self, text: str, block: BlockAdapter | None = None) -> None:
        """Something the record should say about ``block`` (default: the first block)."""
        self.notes.append(f"block {(block or self.block).index}: {text}")

    @contextlib.contextmanager
    def phase(self, name: str):
        """Time a phase of the method (accumulated over blocks in the record)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t = time.perf_counter()
        if self.progress_line is not None:
            self.progress_line.phase(self.index, name)
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

    def add(self, ctx: BlockContext) -> None:
        """Fold one span's phases, grids and notes into the run's result."""
        for k, v in ctx.phases.items():
            self.phases[k] = self.phases.get(k, 0.0) + v
        self.grids.update(ctx.grids)
        self.notes.extend(ctx.notes)


def quantize_model(adapter: ModelAdapter, method: Method, calibration: torch.Tensor, device, batch_size: int = 8,
                   model_dtype=torch.float32, checkpoint: BlockCheckpoint | None = None,
                   progress: bool = True) -> QuantizeResult:
    """Quantize every block of the model, in order, with ``method``.

    ``checkpoint`` (optional) persists the state after each span and restores it on a
    rerun (``aespa.core.checkpoint``).
    """
    device = torch.device(device)
    method.check(adapter)
    result = QuantizeResult()
    segment_start = time.perf_counter()
    method.prepare(adapter, calibration)
    state = checkpoint.load(adapter, method, device) if checkpoint is not None else None
    n_blocks = len(adapter.blocks)
    if state is not None:
        start, q_in, fp_in, kwargs, result = state["next_block"], state["q_in"], state["fp_in"], state["kwargs"], \
            state["result"]
        log.info(f"resuming at block {start} of {n_blocks}")
        result.notes.append(f"resumed at block {start} of {n_blocks}")
    else:
        start = 0
        q_in, kwargs = capture_inputs(adapter, calibration, device, batch_size, store_device=device)
        check_finite("the input of block 0", {"calibration stream": q_in})
        fp_in = q_in.clone() if method.needs_fp_stream else None
    bar = tqdm(total=n_blocks, initial=start, desc=f"quantize ({method.name})", disable=not progress)
    line = ProgressLine(live=progress, n_blocks=n_blocks)
    while start < n_blocks:
        end = min(n_blocks, start + max(1, method.span(start, n_blocks)))
        blocks = [adapter.block(i) for i in range(start, end)]
        for block in blocks:
            block.module.to(device=device, dtype=torch.float32)
        fp_out = None
        if fp_in is not None:
            with torch.no_grad():
                fp_out = fp_in
                for block in blocks:
                    fp_out = run_block(block.module, fp_out, kwargs, device, torch.float32, batch_size)
        ctx = BlockContext(blocks, q_in, kwargs, device, torch.float32, batch_size, fp_in, fp_out, progress_line=line)
        method.quantize_block(ctx)
        for block in blocks:
            check_finite(f"block {block.index} after quantization",
                         {f"{role} weight": lin.weight for role, lin in block.linears().items()})
        q_in = ctx.run()
        check_finite(f"the output of block {end - 1}", {"quantized stream": q_in})
        fp_in = fp_out
        for block in blocks:
            block.module.to(dtype=model_dtype)
            if device.type == "cuda":
                block.module.to("cpu")
        result.add(ctx)
        start = end
        bar.update(len(blocks))
        if checkpoint is not None:
            checkpoint.save(adapter, method, {"next_block": end, "q_in": q_in, "fp_in": fp_in, "kwargs": kwargs,
                                              "result": result,
                                              "elapsed_s": result.earlier_s + time.perf_counter() - segment_start})
    line.close()
    bar.close()
    method.finish(adapter)
    return result
