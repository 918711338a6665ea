"""Typed method options: one dataclass per method, declared in the method's own file.

Every knob of a method is a field with its type, its default, a one-line help and its
constraint, all in one place::

    @dataclass(frozen=True)
    class Options:
        percdamp: float = option(0.01, "damping, a fraction of the mean Hessian diagonal", positive=True)
        blocksize: int = option(128, "columns per lazy-batch block", low=1)
        act_order: bool = option(False, "visit columns in decreasing H_jj")

The same declaration gives the Hydra config group entry (``method=<name>``, its defaults),
the validation of what a user sets (:func:`parse_options`: unknown keys, wrong types and
values outside the constraint are one-line :class:`~aespa.core.errors.UserError`s, before
any model loads) and the listing of ``python run.py --methods``.

Types: ``bool`` (only true/false), ``int`` (an integer, never ``2.0`` nor a boolean),
``float`` (an integer is accepted and converted), ``str``; ``X | None`` admits null.
Constraints: ``low``/``high`` (inclusive), ``positive`` (> 0), ``below`` (exclusive upper
bound), ``choices``.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any

from aespa.core.errors import UserError


@dataclasses.dataclass(frozen=True)
class Rule:
    """The constraint of one option, and how to say it to a user."""

    low: float | None = None
    high: float | None = None
    below: float | None = None
    positive: bool = False
    choices: tuple | None = None
    exclude: tuple = ()

    def check(self, value) -> bool:
        if value is None or isinstance(value, bool) and self.choices is None:
            return True
        if self.choices is not None:
            return any(value == c and type(value) is type(c) for c in self.choices)
        if isinstance(value, (int, float)) and value in self.exclude:
            return False
        if isinstance(value, (int, float)):
            if not math.isfinite(value):
                return False
            if self.positive and not value > 0:
                return False
            if self.low is not None and value < self.low:
                return False
            if self.high is not None and value > self.high:
                return False
            if self.below is not None and not value < self.below:
                return False
        return True

    def describe(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(_show(c) for c in self.choices)
        parts = []
        if self.positive:
            parts.append("> 0")
        if self.low is not None:
            parts.append(f">= {_show(self.low)}")
        if self.high is not None:
            parts.append(f"<= {_show(self.high)}")
        if self.below is not None:
            parts.append(f"< {_show(self.below)}")
        if self.exclude:
            parts.append("not " + ", ".join(_show(e) for e in self.exclude))
        return " and ".join(parts)


def option(default, help: str, *, low: float | None = None, high: float | None = None, below: float | None = None,
           positive: bool = False, choices: tuple | None = None, exclude: tuple = ()):
    """An option: its default, a one-line help, and its constraint (a mutable default, a
    list or a dict, is copied for every instance)."""
    rule = Rule(low, high, below, positive, tuple(choices) if choices is not None else None, tuple(exclude))
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, "rule": rule})
    return dataclasses.field(default=default, metadata={"help": help, "rule": rule})


def _show(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    return str(value)


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
               dict: "a mapping"}


def _types(annotation) -> tuple[tuple[type, ...], bool]:
    """The accepted base types of a field annotation, and whether null is allowed."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {}, {})  # plain builtins: bool, int, float, str, list, dict, None
    args = typing.get_args(annotation) if isinstance(annotation, types.UnionType) or \
        typing.get_origin(annotation) is typing.Union else (annotation,)
    return tuple(a for a in args if a is not type(None)), type(None) in args


def _coerce(value, accepted: tuple[type, ...]):
    """``value`` as one of the accepted types, or a ValueError; booleans are never numbers."""
    if isinstance(value, bool):
        if bool in accepted:
            return value
        raise ValueError
    if int in accepted and isinstance(value, int):
        return value
    if float in accepted and isinstance(value, (int, float)):
        return float(value)
    if str in accepted and isinstance(value, str):
        return value
    if list in accepted and isinstance(value, (list, tuple)):
        return list(value)
    if dict in accepted and isinstance(value, dict):
        return value
    raise ValueError


def fields(options_type) -> list[dataclasses.Field]:
    return list(dataclasses.fields(options_type))


def describe_field(f: dataclasses.Field) -> str:
    """What a user may set this option to, e.g. ``a number > 0`` or ``one of paper, reference``."""
    accepted, nullable = _types(f.type)
    return _describe(accepted, nullable, f.metadata.get("rule", Rule()))


def _describe(accepted: tuple, nullable: bool, rule: Rule) -> str:
    if rule.choices is not None:
        text = rule.describe()
    else:
        text = " or ".join(_TYPE_WORDS[t] for t in accepted)
        if rule.describe():
            text += " " + rule.describe()
    return text + (" (or null)" if nullable and rule.choices is None else "")


def parse_options(options_type, raw: Mapping[str, Any] | None, method: str = "method",
                  prefix: str = "method.") -> Any:
    """An instance of ``options_type`` from user values (defaults for what is not given).

    Unknown keys, wrong types and values outside a field's constraint raise a one-line
    :class:`UserError` naming ``<prefix><key>`` (``method.<key>`` for a method's options),
    the value and what is allowed.
    """
    raw = dict(raw or {})
    known = {f.name: f for f in fields(options_type)}
    unknown = sorted(set(raw) - set(known))
    what = f"{method} option " if method else ""
    if unknown:
        allowed = ", ".join(known) or "none"
        raise UserError(f"unknown {what or 'key '}{prefix}{unknown[0]}; allowed: {allowed}")
    values = {name: check_value(f"{what}{prefix}{name}", value, known[name].type, known[name].metadata.get("rule"))
              for name, value in raw.items()}
    return options_type(**values)


def check_value(label: str, value, annotation, rule: Rule | None = None) -> Any:
    """``value`` checked against a type (``int``, ``"float | None"``, ...) and a rule, and
    coerced (an integer for a float); a one-line UserError ``<label>=<value> is not allowed;
    use ...`` otherwise."""
    accepted, nullable = _types(annotation)
    rule = rule or Rule()
    try:
        if value is None:
            if not nullable:
                raise ValueError
            coerced = None
        elif rule.choices is not None:
            coerced = value
        else:
            coerced = _coerce(value, accepted)
        if not rule.check(coerced):
            raise ValueError
    except ValueError:
        shown = repr(value) if isinstance(value, str) else _show(value)
        raise UserError(f"{label}={shown} is not allowed; use {_describe(accepted, nullable, rule)}") from None
    return coerced


def defaults(options_type) -> dict:
    """The default value of every option, as plain data (the Hydra config group entry)."""
    return {f.name: f.default for f in fields(options_type)}


def help_lines(options_type) -> list[str]:
    """One line per option: name, default, what is allowed, help."""
    lines = []
    for f in fields(options_type):
        lines.append(f"  {f.name} = {_show(f.default)}  ({describe_field(f)}): {f.metadata.get('help', '')}")
    return lines


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """A method without options of its own."""
