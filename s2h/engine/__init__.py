"""Plumbing both methods and the command line share, written once.

:mod:`.evaluation` (``evaluate``, ``recalibrate_bn``), :mod:`.fitting` (the supervised fit loop),
:mod:`.batches`, :mod:`.loaders` (seeded subsets, per-epoch batches), :mod:`.seeding` (seeds, RNG
states as tensors), :mod:`.distributed` (torchrun), :mod:`.checkpoints` (atomic writes,
``weights_only`` loads), :mod:`.plots`, :mod:`.perf` (allocator, latency). The model registry is
:func:`s2h.models.build_model`.
"""
from .checkpoints import UnsafeCheckpointError, atomic_save, load_checkpoint
from .evaluation import evaluate, recalibrate_bn
from .fitting import fit
from .perf import cpu_latency_ms, tune_cpu_allocator

__all__ = ["UnsafeCheckpointError", "atomic_save", "cpu_latency_ms", "evaluate", "fit", "load_checkpoint",
           "recalibrate_bn", "tune_cpu_allocator"]
