"""s2h: S2HPruner structured channel pruning and teacher-guided one-shot unstructured pruning for PyTorch.

Packages: :mod:`s2h.structured` (S2HPruner), :mod:`s2h.unstructured` (one-shot pruning),
:mod:`s2h.sparse` (sparse CPU serving), :mod:`s2h.engine` (shared plumbing), :mod:`s2h.cli`
(``python -m s2h``), :mod:`s2h.models`, :mod:`s2h.data`.
"""
from . import export as _export_module  # noqa: F401  loaded first so that the name s2h.export ends up the function
from .structured.convert import convert
from .structured.export import export
from .structured.io import load, save
from .structured.layers import S2HBatchNorm1d, S2HBatchNorm2d, S2HConv2d, S2HLayerNorm, S2HLinear
from .structured.masks import branch, current_branch
from .structured.model import S2HModel
from .structured.reference import S2HReference
from .structured.step import PAPER_SETTINGS, NonFiniteLossError, S2HPruner, StepStats
from . import data, engine, models, sparse, structured, unstructured
from . import oneshot, plots  # deprecated paths (names read from them warn)

__all__ = [
    "NonFiniteLossError",
    "PAPER_SETTINGS",
    "S2HPruner",
    "S2HReference",
    "S2HBatchNorm1d",
    "S2HBatchNorm2d",
    "S2HConv2d",
    "S2HLayerNorm",
    "S2HLinear",
    "S2HModel",
    "StepStats",
    "branch",
    "convert",
    "current_branch",
    "data",
    "engine",
    "export",
    "load",
    "models",
    "oneshot",
    "plots",
    "save",
    "sparse",
    "structured",
    "unstructured",
]
