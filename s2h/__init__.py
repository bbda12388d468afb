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
from . import data, models, oneshot, plots, sparse

__all__ = [
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
