"""The CPU kernels' configuration, read by the C++ side once (csrc/cpu/cpu_isa.h, docs/DESIGN.md §5).

``S2H_CPU_ISA`` (avx512 | avx2 | scalar | auto) picks the instruction-set level of every CPU kernel;
``S2H_SPMM_*`` are the sparse kernels' tuning knobs (csrc/cpu/spmm_tuning.h). Both are read from
the environment on first use; :func:`environment` changes them for a block (tests, measurements).
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

from . import _C


def active_isa() -> str:
    """The ISA level the CPU kernels run: ``"avx512"``, ``"avx2"`` or ``"scalar"``. A RuntimeError
    when S2H_CPU_ISA holds a bad value."""
    return _C.cpu_isa()


def best_isa() -> str:
    """The best ISA level this CPU runs."""
    return _C.best_cpu_isa()


def reload() -> None:
    """Re-reads S2H_CPU_ISA and S2H_SPMM_* from ``os.environ``. Not while kernels run on other threads."""
    _C.reload_cpu_config()


@contextlib.contextmanager
def environment(**variables: str | None) -> Iterator[None]:
    """Sets (a string) or unsets (None) the given variables for the block, re-read by the kernels;
    restores and re-reads them after. ``environment(S2H_CPU_ISA="avx2", S2H_SPMM_STREAM="0")``."""
    old = {name: os.environ.get(name) for name in variables}
    try:
        for name, value in variables.items():
            _set(name, value)
        reload()
        yield
    finally:
        for name, value in old.items():
            _set(name, value)
        reload()


def _set(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
