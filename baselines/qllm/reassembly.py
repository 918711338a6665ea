"""Channel reassembly (QLLM, Liu et al., ICLR 2024, §4.1): disassemble the outlier channels
of an activation, assemble similar channels back, and pick the threshold adaptively.

All of it is one linear map of the activation's channels, ``x' = x M``, with the
consumers' weight columns mapped the other way, ``W' = W B`` (``B`` the 0/1 pattern of
``M``), so ``x' W'ᵀ ≈ x Wᵀ``:

- **disassembly** (Eq. 3): channel i with ``max|x_i| > θ`` becomes ``T_i = ⌈max|x_i| / θ⌉``
  sub-channels carrying ``x_i / T_i`` each, its weight column repeated ``T_i`` times —
  exact, and every sub-channel's range is at most θ;
- **assembly** (Eq. 4): a channel pair (i, j) becomes one channel carrying the average
  ``(x_i + x_j) / 2`` with the summed weight column ``W_i + W_j``; the error of the pair is
  ``½ (x_i − x_j)(W_i − W_j)ᵀ``, whose squared norm is the paper's distance (Eq. 5)
  ``¼ ‖x_i − x_j‖² ‖W_i − W_j‖²``. Pairs come from bipartite soft matching (ToMe):
  even channels form set A, odd channels set B, each A channel links to its nearest B
  channel, and the r nearest links merge (several A channels may join one B channel:
  the group is averaged). Disassembled channels never merge. As many channels merge as
  disassembly added, so the width is unchanged.
- **adaptive θ** (Eq. 6, App. C): θ walks down from the largest channel maximum on the
  reference code's uniform grid, as long as the extra channels stay within
  ``channel_ratio`` of the width; every θ that changes the number of extra channels is
  tried and the one with the smallest measured error of the consuming function wins.

:class:`ChannelReassembly` holds the map as index vectors (``source``, ``slot``) and a
per-original-channel coefficient (``coef``: ``1/T_i``, ``1/group size`` or 1). Every
original channel has exactly one coefficient, so the coefficient folds into the op that
produces the activation (a norm's gain and bias; the rows of ``up``/``fc1`` before the MLP
product or ReLU), and what remains at run time is a parameter-free index map — a gather
and an ``index_add`` over channels — in front of the consuming linears
(:class:`ReassembledLinear`).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from aespa.core.actquant import QuantInputLinear
from aespa.core.grid import quantize_activation

DISTANCES = ("paper", "reference")


@dataclass
class ChannelReassembly:
    """``x'[..., slot[k]] += coef[source[k]] * x[..., source[k]]`` for every entry k.

    ``width``: number of reassembled channels; ``threshold``: the θ it was built for;
    ``extra``: channels added by disassembly; ``merged``: channels removed by assembly.
    """

    source: torch.Tensor  # [K] long: original channel of each entry
    slot: torch.Tensor  # [K] long: reassembled channel the entry adds into
    coef: torch.Tensor  # [C]: factor of each original channel
    width: int
    threshold: float = math.inf
    extra: int = 0
    merged: int = 0

    @property
    def channels(self) -> int:
        return self.coef.numel()

    @property
    def is_identity(self) -> bool:
        return self.extra == 0 and self.merged == 0

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        """The reassembled activation ``x M`` (``x``: ``[..., C]`` -> ``[..., width]``)."""
        return route(x * self.coef.to(x.dtype), self.source, self.slot, self.width)

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        """The consumers' reassembled weight ``W B`` (``[out, C]`` -> ``[out, width]``)."""
        out = w.new_zeros(w.shape[0], self.width)
        return out.index_add_(1, self.slot, w[:, self.source])


def route(x: torch.Tensor, source: torch.Tensor, slot: torch.Tensor, width: int) -> torch.Tensor:
    """The run-time op: ``out[..., slot[k]] += x[..., source[k]]``."""
    out = x.new_zeros(*x.shape[:-1], width)
    return out.index_add_(-1, slot, x.index_select(-1, source))


def identity(channels: int, device=None) -> ChannelReassembly:
    index = torch.arange(channels, device=device)
    return ChannelReassembly(index, index.clone(), torch.ones(channels, device=device), channels)


# --------------------------------------------------------------------------- disassembly and assembly


def disassembly_counts(channel_max: torch.Tensor, threshold: float) -> torch.Tensor:
    """``T_i = max(1, ⌈max|x_i| / θ⌉)``: sub-channels of every channel (Eq. 3)."""
    return torch.ceil(channel_max.float() / threshold).clamp(min=1).long()


def pair_distance(x: torch.Tensor, weight: torch.Tensor, kind: str = "paper") -> torch.Tensor:
    """Distance of every (A, B) channel pair, ``[⌈C/2⌉, ⌊C/2⌋]``, A = even channels, B = odd.

    ``x``: the activation ``[N, C]`` (calibration tokens); ``weight``: the consumers' weights
    stacked along the output ``[out, C]``.

    - ``paper`` (Eq. 5): ``‖½ x_i (W_i − W_j) + ½ x_j (W_j − W_i)‖² = ¼ ‖x_i − x_j‖² ‖W_i − W_j‖²``,
      the squared error that merging the pair adds to the consumers' output;
    - ``reference``: the official code's cheaper score ``(‖x_i − x_j‖ (Σ_k W_ki + Σ_k W_kj))²``.
    """
    x, weight = x.float(), weight.float()
    xa, xb = x[:, 0::2].T, x[:, 1::2].T
    if kind == "paper":
        dx = torch.cdist(xa, xb).pow(2)
        dw = torch.cdist(weight[:, 0::2].T, weight[:, 1::2].T).pow(2)
        return dx * dw / 4
    if kind == "reference":
        column_sum = weight.sum(dim=0)
        return (torch.cdist(xa, xb) * (column_sum[0::2, None] + column_sum[None, 1::2])).pow(2)
    raise ValueError(f"unknown distance {kind!r}; allowed: {', '.join(DISTANCES)}")


def mergeable(split: torch.Tensor) -> int:
    """How many A (even) channels can merge when the ``split`` channels are excluded."""
    if not bool((~split[1::2]).any()):
        return 0
    return int((~split[0::2]).sum())


def match_channels(distance: torch.Tensor, split: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bipartite soft matching: the ``r`` A channels nearest to a B channel, and that B channel
    (original channel indices), disassembled (``split``) channels excluded on both sides."""
    d = distance.clone()
    d[split[0::2], :] = math.inf
    d[:, split[1::2]] = math.inf
    nearest, partner = d.min(dim=1)
    chosen = nearest.argsort(stable=True)[:r]
    if r > 0 and not bool(torch.isfinite(nearest[chosen]).all()):
        raise ValueError(f"cannot merge {r} channel pairs without touching disassembled channels")
    return 2 * chosen, 2 * partner[chosen] + 1


def reassemble(channel_max: torch.Tensor, threshold: float, distance: torch.Tensor | None = None) -> ChannelReassembly:
    """Disassembly at ``threshold`` followed, when ``distance`` is given, by the assembly of as
    many channel pairs as disassembly added (so the width stays ``C``)."""
    counts = disassembly_counts(channel_max, threshold)
    channels, device = counts.numel(), counts.device
    split = counts > 1
    extra = int(counts.sum()) - channels
    merged_away = torch.zeros(channels, dtype=torch.bool, device=device)
    coef = 1.0 / counts.float()
    a = b = torch.zeros(0, dtype=torch.long, device=device)
    if distance is not None and extra > 0:
        a, b = match_channels(distance, split, extra)
        merged_away[a] = True
        group = torch.ones(channels, device=device).index_add_(0, b, torch.ones(len(b), device=device))
        coef[b] = 1.0 / group[b]
        coef[a] = 1.0 / group[b]
    own_slots = torch.where(merged_away, 0, counts)
    first_slot = torch.cumsum(own_slots, 0) - own_slots
    kept_source = torch.arange(channels, device=device).repeat_interleave(own_slots)
    width = int(own_slots.sum())
    source = torch.cat([kept_source, a])
    slot = torch.cat([torch.arange(width, device=device), first_slot[b]])
    return ChannelReassembly(source, slot, coef, width, float(threshold), extra, len(a))


# --------------------------------------------------------------------------- the threshold


@dataclass
class Trial:
    threshold: float
    extra: int
    error: float | None = None


def threshold_candidates(channel_max: torch.Tensor, channel_ratio: float,
                         distance: torch.Tensor | None = None) -> list[Trial]:
    """The thresholds of the reference code's uniform grid, from the largest channel maximum
    down by ``(max − min) / max(100, ⌊max / 0.5⌋)``, one per distinct number of extra
    channels, while the extra channels stay within ``⌊channel_ratio · C⌋`` (and, with
    assembly, within the channels that can merge). The first is ``θ = max``: no change."""
    m = channel_max.float()
    top, bottom = float(m.max()), float(m.min())
    if not top > 0:
        return [Trial(math.inf, 0)]
    steps = max(100, int(top / 0.5))
    step = (top - bottom) / steps
    budget = int(m.numel() * channel_ratio)
    trials, previous = [], None
    for k in range(steps):
        theta = top - k * step
        if theta < bottom or theta <= 0:
            break
        counts = disassembly_counts(m, theta)
        extra = int(counts.sum()) - m.numel()
        if extra > budget or (distance is not None and extra > mergeable(counts > 1)):
            break
        if extra != previous:
            trials.append(Trial(theta, extra))
            previous = extra
    return trials


def search_threshold(channel_max: torch.Tensor, channel_ratio: float, error: Callable[[ChannelReassembly], float],
                     distance: torch.Tensor | None = None, adaptive: bool = True
                     ) -> tuple[ChannelReassembly, list[Trial]]:
    """The reassembly of one point (Eq. 6): with ``adaptive``, the candidate threshold whose
    reassembly gives the smallest ``error`` (the measured output error of the consuming
    function with weight and activation fake-quant); without, the smallest candidate θ
    (the most disassembly ``channel_ratio`` allows: the reference's uniform CD). Returns the
    reassembly and the trials (with their errors when measured)."""
    trials = threshold_candidates(channel_max, channel_ratio, distance)
    if not adaptive:
        chosen = trials[-1]
        return reassemble(channel_max, chosen.threshold, distance), trials
    best, best_error = None, math.inf
    for trial in trials:
        candidate = reassemble(channel_max, trial.threshold, distance)
        trial.error = float(error(candidate))
        if trial.error < best_error:
            best, best_error = candidate, trial.error
    if best is None:  # every error non-finite: keep the channels as they are
        best = reassemble(channel_max, trials[0].threshold, distance)
    return best, trials


# --------------------------------------------------------------------------- the deployed op


class ReassembledLinear(QuantInputLinear):
    """A consumer of a reassembled activation: ``y = Q_a(route(x)) Wᵀ + b``, with ``W`` of the
    reassembled width. ``route`` is the parameter-free index map of :class:`ChannelReassembly`
    (``source``, ``slot``); ``coef`` is kept only where it could not be folded into the op
    producing ``x`` (``None`` otherwise). ``act_bits=None``: activations in full precision.

    Loading a state dict resizes the weight and the index buffers to the saved ones, so a
    block checkpoint restores into a freshly wrapped block.
    """

    def __init__(self, linear: nn.Linear, act_bits: int | None, reassembly: ChannelReassembly | None = None,
                 weight: torch.Tensor | None = None):
        nn.Module.__init__(self)
        self.out_features = linear.out_features
        self.register_parameter("weight", nn.Parameter(linear.weight.detach().clone() if weight is None else weight,
                                                       requires_grad=False))
        self.register_parameter("bias", linear.bias)
        self.in_features = self.weight.shape[1]
        self.act_bits = act_bits
        for name in ("source", "slot", "coef"):
            self.register_buffer(name, None if reassembly is None else getattr(reassembly, name).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.coef is not None:
            x = x * self.coef.to(x.dtype)
        if self.source is not None:
            x = route(x, self.source, self.slot, self.weight.shape[1])
        if self.act_bits is not None and self.act_bits < 16:
            x = quantize_activation(x, self.act_bits)
        return F.linear(x, self.weight, self.bias)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for name in ("source", "slot", "coef"):
            saved = state_dict.get(prefix + name)
            self._buffers[name] = None if saved is None else torch.empty_like(saved, device=self.weight.device)
        saved = state_dict.get(prefix + "weight")
        if saved is not None and saved.shape != self.weight.shape:
            self.weight = nn.Parameter(torch.empty_like(saved, device=self.weight.device), requires_grad=False)
            self.in_features = saved.shape[1]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        routed = "" if self.source is None else f", routed ({self.source.numel()} entries)"
        return f"in_features={self.in_features}, out_features={self.out_features}, act_bits={self.act_bits}{routed}"
