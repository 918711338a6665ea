"""Function-preserving per-channel transforms of a decoder block ("equivalent transforms").

A channel j of the activation ``X`` flowing from a producer into its consumer linears is
divided by a scale ``s_j`` (after subtracting a shift ``δ_j``) and the consumers absorb the
inverse, so the block computes exactly the same function (OmniQuant Eq. 3–5; SmoothQuant
Eq. 3; Outlier Suppression+):

    Y = X Wᵀ + b = ((X - δ) ⊘ s) (W ⊙ s)ᵀ + (b + W δ)

Three kinds of pairs exist in a block (read from the family description: a group of
linears and the op feeding it, ``aespa.core.adapters.LinearGroup``):

- **norm → linears** (attn-norm → q, k, v; mlp-norm → fc1 | gate, up): the norm's gain (and
  bias) is divided by s after subtracting δ; each consumer's input columns are multiplied
  by s and its bias gains ``W δ``. A shift needs a norm with a bias (LayerNorm, not RMSNorm).
- **v → o**: rows of ``W_v`` (and ``b_v - δ``) divided by s; the matching input columns of
  ``W_o`` multiplied by s, ``b_o += W_o δ``. Exact because every row of the attention
  probabilities sums to one (``P (V - δ) = P V - δ``). With grouped-query attention s lives
  on the kv-head channels and is repeated over each group's query heads on the o side.
- **Q–K affinity**: rows of ``W_q`` (``b_q``) divided by s, rows of ``W_k`` (``b_k``)
  multiplied by s, so every ``q·k`` is unchanged. s lives on the kv-head channels
  (repeated over the group's query heads). For rotary families RoPE mixes the dimension
  pairs (i, i + d/2) of each head, so the transform is exact only when both share one
  scale: :func:`query_key_scale` ties them.

Never on the second MLP linear (fc2 / down): its input comes through the non-linearity.

The transform is one pure function (:func:`transformed_parameters`), differentiable in
the scales and shifts, used unchanged both while training them (OmniQuant's LET through
``torch.func.functional_call``) and when folding them into the weights (:func:`fold`).
Users: OmniQuant LET, SmoothQuant, the outlier variant of the embedded models, QLLM.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from aespa.core.adapters import BlockAdapter, Geometry, LinearGroup, get_path
from aespa.core.errors import UserError


@dataclass
class ChannelTransform:
    """Divide channel j by ``scale[j]`` after subtracting ``shift[j]`` (``None``: no shift)."""

    scale: torch.Tensor
    shift: torch.Tensor | None = None


@dataclass
class BlockTransform:
    """The equivalent transform of one block.

    ``norms``: feeder-norm role ("attn_norm", "mlp_norm") -> transform of the hidden channels
    it feeds; ``value``: transform of ``v``'s output channels ``[kv_heads * head_dim]``;
    ``query_key``: the affinity scale over ``k``'s output channels ``[kv_heads * head_dim]``.
    """

    norms: dict[str, ChannelTransform] = field(default_factory=dict)
    value: ChannelTransform | None = None
    query_key: torch.Tensor | None = None


# --------------------------------------------------------------------------- pairs and shapes


def norm_fed_groups(block: BlockAdapter) -> list[LinearGroup]:
    """The groups of linears that read a norm's output (the norm → linears pairs)."""
    return [g for g in block.groups if g.feeder in block.family.norms]


def refuse_residual_fed(block: BlockAdapter, method: str, allowed: str) -> None:
    """One line when linears of the block read the residual stream itself (post-LayerNorm OPT,
    OPT-350M): ``method`` folds a transform into the norm before q/k/v and fc1, and there is none."""
    residual_fed = [r for g in block.groups if not block.family.foldable(g.feeder) for r in g.roles]
    if residual_fed:
        raise UserError(f"{method} folds a transform into the norms that feed q/k/v and fc1; the "
                        f"{block.family.name} family (post-LayerNorm OPT, e.g. OPT-350M) has no such norm: "
                        f"{', '.join(residual_fed)} read the residual stream; {allowed}")


def expand_kv(channels: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """A per-channel vector over the kv heads ``[kv_heads * d]`` repeated for every query
    head of each group ``[heads * d]`` (identity without grouped-query attention)."""
    kv, d = geometry.num_kv_heads, geometry.head_dim
    return channels.view(kv, 1, d).expand(kv, geometry.kv_group, d).reshape(-1)


def reduce_kv(channels: torch.Tensor, geometry: Geometry, how: str = "amax") -> torch.Tensor:
    """A per-channel statistic over the query heads ``[heads * d]`` reduced (``amax`` or
    ``mean``) over each kv group to ``[kv_heads * d]``; the inverse direction of :func:`expand_kv`."""
    kv, d = geometry.num_kv_heads, geometry.head_dim
    return getattr(channels.view(kv, geometry.kv_group, d), how)(dim=1).reshape(-1)


def query_key_channels(geometry: Geometry) -> int:
    """Number of free Q–K scales: one per kv-head channel, one per rotary pair with RoPE."""
    n = geometry.num_kv_heads * geometry.head_dim
    return n // 2 if geometry.rotary else n


def query_key_scale(free: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """The Q–K scale over ``[kv_heads * d]`` from its free values: with RoPE, dimensions
    i and i + d/2 of each head share one value (RoPE rotates exactly these pairs)."""
    if not geometry.rotary:
        return free
    kv, d = geometry.num_kv_heads, geometry.head_dim
    return free.view(kv, 1, d // 2).expand(kv, 2, d // 2).reshape(-1)


# --------------------------------------------------------------------------- the three pair transforms


def scale_norm(weight: torch.Tensor, bias: torch.Tensor | None, t: ChannelTransform) -> tuple:
    """Norm output ``y`` -> ``(y - δ) / s``: gain / s, bias (b - δ) / s."""
    if t.shift is not None and bias is None:
        raise ValueError("a shift needs a norm with a bias (LayerNorm); this norm has none")
    new_bias = None if bias is None else (bias - (0 if t.shift is None else t.shift)) / t.scale
    return weight / t.scale, new_bias


def scale_input_columns(weight: torch.Tensor, bias: torch.Tensor | None, t: ChannelTransform) -> tuple:
    """Consumer of ``(x - δ) / s``: columns times s, bias + W δ (W before scaling)."""
    new_bias = bias
    if t.shift is not None:
        new_bias = weight @ t.shift if bias is None else bias + weight @ t.shift
    return weight * t.scale[None, :], new_bias


def scale_output_rows(weight: torch.Tensor, bias: torch.Tensor | None, t: ChannelTransform) -> tuple:
    """Producer of ``(y - δ) / s``: rows divided by s, bias (b - δ) / s."""
    if bias is None and t.shift is not None:
        bias = torch.zeros_like(t.shift)
    new_bias = None if bias is None else (bias - (0 if t.shift is None else t.shift)) / t.scale
    return weight / t.scale[:, None], new_bias


# --------------------------------------------------------------------------- a whole block


def _names(block: BlockAdapter):
    fam = block.family
    linear = lambda role, attr: f"{fam.linears[role]}.{attr}"  # noqa: E731
    norm = lambda role, attr: f"{fam.norms[role]}.{attr}"  # noqa: E731
    return linear, norm


def transformed_parameters(block: BlockAdapter, transform: BlockTransform) -> dict[str, torch.Tensor]:
    """The parameters the transform changes, by their names inside ``block.module``
    (ready for ``torch.func.functional_call``). Pure and differentiable in the scales and
    shifts; the block itself is not modified.

    Order: norm → linears, then v → o, then Q–K (the later ones act on the results of the
    earlier ones, e.g. ``v``'s bias after the attn-norm shift).
    """
    linear_name, norm_name = _names(block)
    new: dict[str, torch.Tensor | None] = {}

    def current(name: str):
        return new[name] if name in new else getattr(get_path(block.module, name.rpartition(".")[0]),
                                                     name.rpartition(".")[2], None)

    for group in norm_fed_groups(block):
        t = transform.norms.get(group.feeder)
        if t is None:
            continue
        w, b = norm_name(group.feeder, "weight"), norm_name(group.feeder, "bias")
        new[w], new[b] = scale_norm(current(w), current(b), t)
        for role in group.roles:
            w, b = linear_name(role, "weight"), linear_name(role, "bias")
            new[w], new[b] = scale_input_columns(current(w), current(b), t)
    geometry = block.geometry
    if transform.value is not None:
        t = transform.value
        w, b = linear_name("v", "weight"), linear_name("v", "bias")
        new[w], new[b] = scale_output_rows(current(w), current(b), t)
        wide = ChannelTransform(expand_kv(t.scale, geometry), None if t.shift is None else expand_kv(t.shift, geometry))
        w, b = linear_name("o", "weight"), linear_name("o", "bias")
        new[w], new[b] = scale_input_columns(current(w), current(b), wide)
    if transform.query_key is not None:
        s = transform.query_key
        w, b = linear_name("q", "weight"), linear_name("q", "bias")
        new[w], new[b] = scale_output_rows(current(w), current(b), ChannelTransform(expand_kv(s, geometry)))
        w, b = linear_name("k", "weight"), linear_name("k", "bias")
        new[w], new[b] = scale_output_rows(current(w), current(b), ChannelTransform(1.0 / s))
    return {k: v for k, v in new.items() if v is not None}


@torch.no_grad()
def fold(block: BlockAdapter, transform: BlockTransform) -> None:
    """Apply the transform to the block's parameters in place (a linear without a bias
    gets one when a shift needs it)."""
    for name, value in transformed_parameters(block, transform).items():
        path, _, attr = name.rpartition(".")
        module = get_path(block.module, path)
        param = getattr(module, attr, None)
        if param is None:
            setattr(module, attr, nn.Parameter(value.detach().to(module.weight.dtype)))
        else:
            param.copy_(value.detach())


def scale_norm_inputs(block: BlockAdapter, scales: dict[str, torch.Tensor],
                      shifts: dict[str, torch.Tensor] | None = None) -> None:
    """Fold per-channel scales (and shifts) into the norm → linears pairs of ``block``
    (``scales``: feeder-norm role -> ``s``). SmoothQuant's migration and the outlier variant."""
    shifts = shifts or {}
    fold(block, BlockTransform(norms={r: ChannelTransform(s, shifts.get(r)) for r, s in scales.items()}))


# --------------------------------------------------------------------------- statistics and the smoothing formula


@dataclass
class ChannelStatistics:
    """Per-input-channel statistics of some linears' inputs, by role, fed window by window
    (in calibration order) by :meth:`hooks` during a pass of the block
    (``BlockContext.observe``).

    ``absmax``: max over all calibration tokens of ``|x_j|`` (SmoothQuant's act scales);
    ``midpoint``: the Outlier-Suppression+ shift ``(max_j + min_j) / 2``, tracked over the
    calibration windows as an exponential moving average (0.99 old, 0.01 new), as
    OmniQuant's ``generate_act_scale_shift.py`` does.
    """

    absmax: dict[str, torch.Tensor] = field(default_factory=dict)
    midpoint: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, role: str, x: torch.Tensor) -> None:
        """A mini-batch of inputs ``[b, T, d]`` of the linear ``role``."""
        for window in x.detach().float():  # [T, d], in calibration order
            window = window.reshape(-1, window.shape[-1])
            absmax, mid = window.abs().amax(dim=0), (window.amax(dim=0) + window.amin(dim=0)) / 2
            if role in self.absmax:
                self.absmax[role] = torch.maximum(self.absmax[role], absmax)
                self.midpoint[role] = 0.99 * self.midpoint[role] + 0.01 * mid
            else:
                self.absmax[role], self.midpoint[role] = absmax, mid

    def hooks(self, roles) -> dict:
        """Input callbacks for ``BlockContext.observe(on_input=...)``."""
        return {role: (lambda x, r=role: self.add(r, x)) for role in roles}


def smoothing_scale(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's migration scale (Eq. 4): ``s_j = max|X_j|^α / max|W_{:,j}|^(1-α)``,
    both maxima and the result clamped to >= 1e-5 as in the reference codes."""
    return (act_absmax.clamp(min=1e-5).pow(alpha) / weight_absmax.clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)
