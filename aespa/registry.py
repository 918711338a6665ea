"""How a method plugs into the pipeline.

A method is a class registered under its config name (``conf/method/<name>.yaml``).
The pipeline calls ``quantize_block(ctx)`` once per decoder block with a
:class:`~aespa.pipeline.BlockContext`; the method changes the block's weights in place
(through ``ctx.set_weight``) or swaps linears through the block adapter.

Every module of ``baselines/`` and ``aespa/method.py`` is imported on first use, so a
new method is one file with ``@register("name")`` on its class.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass

from aespa.errors import UserError

METHODS: dict[str, type] = {}


def register(name: str):
    def deco(cls):
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
    """Base class. ``options`` is the method's own config group (``cfg.method``)."""

    name = "?"
    needs_fp_stream = False  # the pipeline also propagates the full-precision stream
    supports_act_quant = False  # has a weight-activation path (act_bits < 16)

    def __init__(self, spec: QuantSpec, options: dict | None = None):
        self.spec = spec
        self.options = dict(options or {})

    def prepare(self, adapter, calibration) -> None:
        """Called once before the block loop (e.g. to collect model-wide statistics)."""

    def quantize_block(self, ctx) -> None:
        raise NotImplementedError

    def finish(self, adapter) -> None:
        """Called once after the last block."""


@register("none")
class FullPrecision(Method):
    """No quantization: the full-precision baseline on the same protocol."""

    supports_act_quant = False

    def quantize_block(self, ctx) -> None:
        pass


_discovered = False


def _discover() -> None:
    """Import every method module once (importing one directly must not stop the others)."""
    global _discovered
    if _discovered:
        return
    import baselines

    for mod in pkgutil.iter_modules(baselines.__path__):
        importlib.import_module(f"baselines.{mod.name}")
    try:
        importlib.import_module("aespa.method")
    except ModuleNotFoundError as e:
        if e.name != "aespa.method":
            raise
    _discovered = True


def get_method(name: str) -> type:
    _discover()
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; allowed: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def act_quant_methods() -> list[str]:
    _discover()
    return sorted(n for n, c in METHODS.items() if c.supports_act_quant)
