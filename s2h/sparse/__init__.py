"""Sparse inference for unstructured-pruned models (docs/DESIGN.md §4).

:mod:`.modules`: the sparse layers (:class:`SparseLinear`, :class:`SparseConv2d`,
:class:`FastMaxPool2d`); :mod:`.calibration`: dense against sparse by interleaved paired timings
(per layer and the whole-model guard); :mod:`.conversion`: :func:`sparsify`, which keeps a sparse
layer only where it is measured faster, folds BatchNorm, fuses ReLUs and never returns a model
slower than the one it was given; :mod:`.export`: :func:`densify` (the dense masked model, e.g.
for ONNX).
"""
from .calibration import AutoSparse, CalibrationCache, clear_calibration_cache, wall_timer
from .conversion import GUARD_MIN_SPEEDUP, sparsify
from .export import densify
from .modules import FastMaxPool2d, SparseConv2d, SparseLinear

__all__ = ["SparseLinear", "SparseConv2d", "AutoSparse", "FastMaxPool2d", "CalibrationCache", "sparsify",
           "densify", "clear_calibration_cache", "wall_timer", "GUARD_MIN_SPEEDUP"]
