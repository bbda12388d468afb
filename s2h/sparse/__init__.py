"""Sparse inference for unstructured-pruned models (docs/DESIGN.md §4).

:mod:`.modules`: the sparse layers (:class:`SparseLinear`, :class:`SparseConv2d`,
:class:`FastMaxPool2d`); :mod:`.conversion`: :func:`sparsify`, which measures dense against sparse
per layer shape and keeps the faster, folds BatchNorm and fuses ReLUs.
"""
from .conversion import AutoSparse, CalibrationCache, clear_calibration_cache, sparsify
from .modules import FastMaxPool2d, SparseConv2d, SparseLinear

__all__ = ["SparseLinear", "SparseConv2d", "AutoSparse", "FastMaxPool2d", "CalibrationCache", "sparsify",
           "clear_calibration_cache"]
