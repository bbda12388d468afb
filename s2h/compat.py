"""Old module paths that still work for one release: each warns (DeprecationWarning) on use.

A shim module is ``__getattr__, __dir__ = moved(__name__, "s2h.new.home", ...)``: an attribute
read from it is looked up in the new modules, in order, and warns with the new path.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Callable

__all__ = ["moved"]


def moved(old: str, *new: str, renamed: dict[str, str] | None = None) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for a deprecated module ``old`` whose names now live in ``new``."""
    renamed = dict(renamed or {})

    def getattr_(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        target = renamed.get(name, name)
        for path in new:
            mod = importlib.import_module(path)
            if hasattr(mod, target):
                where = f"{path}.{target}"
                warnings.warn(f"{old}.{name} is deprecated; use {where}", DeprecationWarning, stacklevel=2)
                return getattr(mod, target)
        raise AttributeError(f"module {old!r} has no attribute {name!r} (it moved to {', '.join(new)})")

    def dir_() -> list[str]:
        names = set(renamed)
        for path in new:
            names.update(n for n in dir(importlib.import_module(path)) if not n.startswith("_"))
        return sorted(names)

    return getattr_, dir_
