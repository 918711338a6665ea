"""How a method plugs into the pipeline: the :class:`Method` protocol and the registry.

A method is a class registered under its config name with ``@register("name")``. It
declares its knobs as a frozen dataclass ``Options`` (``aespa.core.options``); the
pipeline (``aespa.core.pipeline.quantize_model``) calls, in order:

- ``prepare(model, calibration)`` once, before the first block;
- ``quantize_block(ctx)`` once per block (or per span of blocks, ``span``), with a
  :class:`~aespa.core.pipeline.BlockContext`: the method changes the block's weights in
  place (``ctx.set_weight``) or swaps linears through the block adapter;
- ``finish(model)`` once, after the last block.

Resuming a killed run (``aespa.core.checkpoint``) needs three more, with no-op defaults:
``state_dict()`` / ``load_state_dict(state)`` for the method's own state between blocks
(e.g. a random generator), and ``restore_block(block)``, which re-creates the structural
changes ``quantize_block`` made to a block (wrapped linears, attention hooks) before the
block's saved tensors are loaded into it.

The core never imports a method: methods register themselves when their module is
imported, and the application imports them (``experiments.methods``).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from aespa.core.actquant import install_activation_quantizers
from aespa.core.adapters import BlockAdapter, ModelAdapter
from aespa.core.errors import UserError
from aespa.core.grid import check_group_size
from aespa.core.options import NoOptions, parse_options

if TYPE_CHECKING:
    from aespa.core.pipeline import BlockContext

METHODS: dict[str, type[Method]] = {}


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: make a :class:`Method` available as ``method=<name>``."""

    def deco(cls: type[Method]) -> type[Method]:
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


@dataclass(frozen=True)
class QuantSpec:
    """The top-level quantization knobs of a run."""

    bits: int = 4
    group_size: int = -1
    sym: bool = False
    act_bits: int = 16

    @property
    def weight_only(self) -> bool:
        return self.act_bits >= 16


@dataclass(frozen=True)
class Footprint:
    """A method's own cost for one block, as the resource plan (``experiments.plan``) counts it.

    ``state_bytes``: what it keeps on the device through the block beyond the block and the
    calibration streams (statistics, Hessians); ``work_bytes``: the transient peak of its own
    work on top of that (a grid search's candidates, rounding or optimiser state, a sweep's
    copies); ``passes``: forward passes of the block over the calibration set, the propagation
    to the next block included; ``flops``: its work beyond those passes;
    ``attention_observed``: a pass materialises the attention probabilities; ``knob``: the
    option that lowers its memory, if any."""

    state_bytes: int = 0
    work_bytes: int = 0
    passes: float = 1.0
    flops: float = 0.0
    attention_observed: bool = False
    knob: str = ""


def activation_bytes(block: BlockAdapter, windows: int, seqlen: int, attention_probs: bool) -> int:
    """fp32 activations alive at the peak of one pass of ``block`` over ``windows`` windows of
    ``seqlen`` tokens, per token the larger of the attention part (the input, q, k, v, their
    head-major copies: 6·d) and the MLP part (input and output, 2·d, and its hidden
    activations: 2·ff, 3·ff gated); with the probabilities materialised, also the scores and
    probabilities (2·windows·heads·T²). Validated against measured peaks (tests/test_plan.py)."""
    tokens = windows * seqlen
    linears = block.linears()
    d, ffn = block.geometry.hidden_size, linears["up"].out_features
    size = tokens * max(6 * d, 2 * d + (3 if "gate" in linears else 2) * ffn)
    if attention_probs:
        size += 2 * windows * block.geometry.num_heads * seqlen * seqlen
    return 4 * size


def block_flops(block: BlockAdapter, windows: int, seqlen: int) -> float:
    """FLOPs of one forward pass of ``block`` over ``windows`` windows: its linears and the
    attention core (scores and their product with the values)."""
    tokens = windows * seqlen
    g = block.geometry
    linear = sum(m.out_features * m.in_features for m in block.linears().values())
    return 2.0 * tokens * linear + 4.0 * tokens * seqlen * g.num_heads * g.head_dim


def hessian_footprint(block: BlockAdapter, tokens: int, sequential: bool = True) -> tuple[int, int, float]:
    """GPTQ-style work on a block: bytes of the fp32 Hessians kept while their pass runs (the
    largest input group's when ``sequential``, else every group's), bytes of the sweep of the
    largest linear (five in x in matrices: the damped copy, its Cholesky factor, the inverse,
    the inverse's Cholesky factor and a transient; three copies of the weight; measured),
    and FLOPs: the accumulation (2·tokens·in² per group), the inverse (in³) and the sweep
    (2·out·in²) of every linear."""
    linears = block.linears()
    widths = [linears[g.roles[0]].in_features for g in block.groups]
    hessians = max(widths) ** 2 if sequential else sum(w * w for w in widths)
    sweep = max(5 * m.in_features ** 2 + 3 * m.out_features * m.in_features for m in linears.values())
    flops = sum(2.0 * tokens * w * w for w in widths)
    flops += sum(m.in_features ** 3 + 2.0 * m.out_features * m.in_features ** 2 for m in linears.values())
    return 4 * hessians, 4 * sweep, flops


class Method:
    """Base class of every quantization method (see the module docstring)."""

    name: ClassVar[str] = "?"
    Options: ClassVar[type] = NoOptions  # the method's knobs (a frozen dataclass of ``option`` fields)
    needs_fp_stream: ClassVar[bool] = False  # the pipeline also propagates the full-precision stream
    supports_act_quant: ClassVar[bool] = False  # has a weight-activation path (act_bits < 16)

    def __init__(self, spec: QuantSpec, options=None):
        self.spec = spec
        self.options = options if isinstance(options, self.Options) else \
            parse_options(self.Options, options, self.name)

    # ------------------------------------------------------------------ the pipeline's calls

    def check(self, model: ModelAdapter) -> None:
        """Refuse a model this method cannot quantize with this spec (one-line UserError).
        Default: the group size divides the input width of every linear."""
        if self.spec.bits < 16 and self.spec.group_size != -1:
            for role, linear in model.block(0).linears().items():
                check_group_size(linear.in_features, self.spec.group_size, f"the {role} projection")

    def prepare(self, model: ModelAdapter, calibration: torch.Tensor) -> None:
        """Called once before the first block (e.g. to collect model-wide statistics)."""

    def span(self, index: int, n_blocks: int) -> int:
        """How many blocks, from block ``index``, the next ``quantize_block`` call gets (1)."""
        return 1

    def quantize_block(self, ctx: BlockContext) -> None:
        raise NotImplementedError

    def finish(self, model: ModelAdapter) -> None:
        """Called once after the last block."""

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict:
        """The method's own state between blocks (tensors and plain data), for a checkpoint."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""

    def footprint(self, block: BlockAdapter, windows: int, seqlen: int, batch_size: int) -> Footprint:
        """The plan's estimate of this method on ``block`` with ``windows`` calibration windows
        of ``seqlen`` tokens (:class:`Footprint`). Default: round to nearest while propagating,
        nothing kept."""
        return Footprint()

    def restore_block(self, block: BlockAdapter) -> None:
        """Re-create the structural changes ``quantize_block`` made to ``block`` before its
        saved tensors are loaded. Default: the activation quantizers of a weight-activation run."""
        if self.supports_act_quant and not self.spec.weight_only:
            install_activation_quantizers(block, self.spec.act_bits)


@register("none")
class FullPrecision(Method):
    """No quantization: the full-precision baseline on the same protocol."""

    def quantize_block(self, ctx: BlockContext) -> None:
        pass


def get_method(name: str) -> type[Method]:
    """The method registered as ``name`` (its module must have been imported)."""
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; allowed: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def act_quant_methods() -> list[str]:
    return sorted(n for n, c in METHODS.items() if c.supports_act_quant)
