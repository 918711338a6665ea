"""Finding the methods, and offering them to Hydra as the ``method`` config group.

The core (``aespa.core``) holds the registry but imports no method. This module imports
every method module once: ``aespa.method`` and every module or sub-package of
``baselines/``, plus whatever other installed packages declare under the entry-point group
``aespa_ptq.methods`` (a method shipped in its own package needs no edit here). Each
registered method's options (its ``Options`` dataclass) then become the Hydra config
``method=<name>``: ``name`` plus every option at its default. A method defined later (a
test's temporary module) is offered by calling :func:`load_methods` again.
"""
from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
from importlib.metadata import entry_points

from aespa.core.method import METHODS, Method
from aespa.core.options import defaults, help_lines

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILTIN = ("aespa.method",)
PACKAGES = ("baselines",)
ENTRY_POINTS = "aespa_ptq.methods"
_imported = False


def load_methods() -> dict[str, type[Method]]:
    """Import every method module (once) and register every known method's config with
    Hydra's ConfigStore; returns the registry."""
    global _imported
    if not _imported:
        for name in BUILTIN:
            importlib.import_module(name)
        for package in PACKAGES:
            root = importlib.import_module(package)
            for module in pkgutil.iter_modules(root.__path__):
                importlib.import_module(f"{package}.{module.name}")
        for entry in entry_points(group=ENTRY_POINTS):
            entry.load()
        _imported = True
    store_configs()
    return METHODS


def store_configs() -> None:
    """``method=<name>`` for every registered method: its name and its options' defaults."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name, cls in METHODS.items():
        store.store(group="method", name=name, node={"name": name, **defaults(cls.Options)},
                    provider="aespa-ptq")


def describe(names: list[str] | None = None) -> str:
    """Every method (or those named), its file, and its options: default, what is allowed, help."""
    load_methods()
    lines = []
    for name in names or sorted(METHODS):
        cls = METHODS[name]
        where = os.path.relpath(inspect.getfile(cls), REPO)
        doc = " ".join((cls.__doc__ or importlib.import_module(cls.__module__).__doc__ or "").split("\n\n")[0].split())
        lines.append(f"{name}  ({where}{', weight-activation too' if cls.supports_act_quant else ''}): {doc}")
        lines += help_lines(cls.Options) or ["  (no options)"]
    return "\n".join(lines)
