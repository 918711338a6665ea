"""The "outlier" variant of a model: fixed, LLM-like activation outlier channels planted by
an exact, function-preserving rescaling — a stand-in for ranking weight-activation methods.

Small models have no activation outliers (the per-channel ``max|x|`` of their linear inputs
spreads by a factor 1.5–3 across channels), while real LLMs have a few channels tens of
times larger than the rest — the very thing SmoothQuant, OmniQuant's LET and QLLM exist
for. The variant multiplies the gain (and bias) of every norm feeding linears
(attn-norm → q, k, v; mlp-norm → fc1 | gate, up) by ``factor`` on ``channels`` fixed
channels, chosen once with ``seed`` and shared by every block (as real outlier channels
are), and divides the matching input columns of the consuming linears by ``factor``
(``aespa.core.transforms``). The full-precision function is unchanged (up to float rounding).

It is **not a real model**: its compensating weight columns are ``factor`` times smaller
than the rest, so weight-only rounding hurts it more than it would hurt a real LLM. Use
it to rank weight-activation methods, not for weight-only numbers.
"""
from __future__ import annotations

import torch

from aespa.core.adapters import ModelAdapter
from aespa.core.errors import UserError
from aespa.core.transforms import norm_fed_groups, scale_norm_inputs


def outlier_channels(hidden_size: int, channels: int, seed: int) -> torch.Tensor:
    """The planted channels: ``channels`` distinct indices drawn with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(hidden_size, generator=generator)[:channels].sort().values


@torch.no_grad()
def plant_outliers(adapter: ModelAdapter, channels: int = 4, factor: float = 64.0, seed: int = 0) -> torch.Tensor:
    """Turn the model into its outlier variant in place; returns the planted channel indices."""
    hidden = adapter.geometry.hidden_size
    if not 0 < channels < hidden:
        raise UserError(f"outliers.channels={channels} is not allowed; use 1..{hidden - 1}")
    if factor <= 0:
        raise UserError(f"outliers.factor={factor} is not allowed; use a positive factor (e.g. 64)")
    index = outlier_channels(hidden, channels, seed)
    for i in range(len(adapter.blocks)):
        block = adapter.block(i)
        for group in norm_fed_groups(block):
            norm = block.norm(group.feeder)
            scale = torch.ones(hidden, dtype=torch.float32, device=norm.weight.device)
            scale[index] = 1.0 / factor
            scale_norm_inputs(block, {group.feeder: scale.to(norm.weight.dtype)})
    return index
