"""Perplexity, block by block: the protocol of GPTQ, OmniQuant, QLLM and aespa.

Non-overlapping test windows ``[n, T]``, each a fresh context; PPL = exp of the mean
over windows of the mean next-token NLL (all windows have the same length, so this is the
mean over every predicted token). The model runs one block at a time on the device, as
the quantization pipeline does, so a model larger than the device still evaluates.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from tqdm import tqdm

from aespa.core.adapters import ModelAdapter
from aespa.core.observe import run_block
from aespa.core.pipeline import capture_inputs


@torch.no_grad()
def perplexity(adapter: ModelAdapter, windows: torch.Tensor, device, batch_size: int = 8,
               dtype: torch.dtype | None = None, progress: bool = True, desc: str = "perplexity") -> float:
    """exp(mean over windows of the mean next-token NLL) of ``windows`` ``[n, T]``."""
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
