"""s2h: S2HPruner structured channel pruning (and teacher-guided one-shot pruning) for PyTorch."""
from .layers import (
    S2HBatchNorm1d,
    S2HBatchNorm2d,
    S2HConv2d,
    S2HLayerNorm,
    S2HLinear,
    branch,
    current_branch,
)
from .model import S2HModel, convert
from .export import export, load, save
from .trainer import NonFiniteLossError, S2HPruner
from .reference import S2HReference
from . import data, models, oneshot, plots, sparse

__all__ = [
    "NonFiniteLossError",
    "S2HPruner",
    "S2HReference",
    "S2HBatchNorm1d",
    "S2HBatchNorm2d",
    "S2HConv2d",
    "S2HLayerNorm",
    "S2HLinear",
    "S2HModel",
    "branch",
    "convert",
    "current_branch",
    "export",
    "load",
    "data",
    "models",
    "oneshot",
    "plots",
    "sparse",
    "save",
]
