"""The Triton kernels, one module per op, imported only when they are first needed.

triton is an optional dependency: ``import s2h_kernels`` and every CPU path work without it. The
public ops (s2h_kernels/<op>.py) define their Triton variants ``s2h::<op>_triton`` in any case;
their kernels and launchers live in this package, whose modules import triton, and load through
:func:`load` on the first call. :func:`available` tells whether triton can be imported.
"""
from __future__ import annotations

import importlib
from types import ModuleType

_available: bool | None = None
_modules: dict[str, ModuleType] = {}

INSTALL_HINT = "install it (pip install triton) or choose backend='cpu' (CPU tensors) or 'cuda' (CUDA C++)"


def available() -> bool:
    """Whether the triton package can be imported (checked once)."""
    global _available
    if _available is None:
        try:
            import triton  # noqa: F401
        except ImportError:
            _available = False
        else:
            _available = True
    return _available


def missing_message(op: str) -> str:
    return f"{op}: backend 'triton' needs the triton package, which is not installed; {INSTALL_HINT}"


def load(name: str, op: str | None = None) -> ModuleType:
    """``s2h_kernels._triton.<name>``; an ImportError naming ``op`` when triton is not installed."""
    mod = _modules.get(name)
    if mod is None:
        if not available():
            raise ImportError(missing_message(op or f"s2h::{name}_triton"))
        mod = _modules[name] = importlib.import_module(f"{__name__}.{name}")
    return mod
