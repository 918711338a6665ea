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
