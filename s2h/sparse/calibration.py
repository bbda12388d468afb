"""Dense against sparse, measured so that a busy machine cannot fool the choice (docs/DESIGN.md §4).

Every decision here compares two (or more) modules on the same input by **interleaved rounds**:
each round times one call of every variant back to back (the order rotates from round to round),
and the decision is the **median over rounds of the per-round ratio** ``t_dense / t_variant``.
Load from other processes that lasts longer than one round slows both sides of the ratio alike and
cancels; a spike shorter than a round hits one side of one round and is discarded by the median.
A variant is chosen only when that median beats the baseline by a safety margin (``min_speedup``).
On one thread the clock is the thread's CPU time (``time.thread_time``), which does not advance
while another process holds the core; on more threads it is wall time.

The clock is a parameter (``timer(module, args) -> seconds`` for one call), so the decision logic
can be tested with a fake, deterministic timer.
"""
from __future__ import annotations

import logging
import statistics
import time
import warnings
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from .modules import conv_padding

__all__ = ["CalibrationCache", "clear_calibration_cache", "layer_key", "wall_timer", "paired_ratio",
           "decide_layer", "fastest_model", "AutoSparse", "Timer"]

log = logging.getLogger("s2h.sparse")

Timer = Callable[[nn.Module, tuple], float]
"""``timer(module, args)``: seconds taken by one call ``module(*args)`` (under ``torch.no_grad``)."""


class CalibrationCache(dict):
    """Layer timings per layer key (see :func:`layer_key`): ``(dense_s, sparse_s, median ratio)``."""


def clear_calibration_cache() -> None:
    """Deprecated no-op: timings are cached per ``sparsify`` call (or in the ``cache=`` you pass), not
    per process, so there is nothing global to clear."""
    warnings.warn("s2h.sparse.clear_calibration_cache is deprecated and does nothing: calibration timings are "
                  "cached per sparsify() call (pass cache=CalibrationCache() to share them)", DeprecationWarning,
                  stacklevel=2)


def layer_key(module: nn.Module, in_shape: tuple, sparsity: float) -> tuple:
    w = module.weight
    geo: tuple = ()
    if isinstance(module, nn.Conv2d):
        geo = (module.kernel_size, module.stride, conv_padding(module), module.dilation, module.groups)
    return (type(module).__name__, tuple(w.shape), geo, tuple(in_shape), round(sparsity, 2), w.dtype, str(w.device),
            torch.get_num_threads())


def _device_of(args: Sequence[Any]) -> torch.device:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
    return torch.device("cpu")


def wall_timer(module: nn.Module, args: tuple) -> float:
    """One call of ``module(*args)``: thread CPU time on one CPU thread (immune to other processes
    taking the core), wall time otherwise (CUDA synchronised)."""
    device = _device_of(args)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        module(*args)
        torch.cuda.synchronize(device)
        return time.perf_counter() - t0
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    t0 = clock()
    module(*args)
    return clock() - t0


def paired_ratio(baseline: nn.Module, variants: Sequence[nn.Module], args: tuple, rounds: int,
                 timer: Optional[Timer] = None) -> tuple[float, list[float], list[float]]:
    """Interleaved rounds of ``baseline`` and each variant on ``args`` (one warm-up call each first).

    Returns the baseline's median time, each variant's median time and each variant's median over
    rounds of ``t_baseline / t_variant`` (seconds; the ratio > 1 means the variant is faster)."""
    timer = wall_timer if timer is None else timer
    mods = [baseline, *variants]
    times: list[list[float]] = [[] for _ in mods]
    with torch.no_grad():
        for m in mods:
            timer(m, args)
        for r in range(max(1, rounds)):
            order = list(range(len(mods)))
            k = r % len(mods)
            for i in order[k:] + order[:k]:      # rotate: nobody always runs first
                times[i].append(max(timer(mods[i], args), 1e-12))
    base = times[0]
    ratios = [statistics.median(b / v for b, v in zip(base, t)) for t in times[1:]]
    return statistics.median(base), [statistics.median(t) for t in times[1:]], ratios


def decide_layer(name: str, dense: nn.Module, sparse: nn.Module, in_shape: tuple, sparsity: float, rounds: int,
                 min_speedup: float, report: Optional[list], cache: CalibrationCache,
                 timer: Optional[Timer] = None) -> bool:
    """True when ``sparse`` beats ``dense`` by ``min_speedup`` (median of interleaved paired ratios)."""
    key = layer_key(dense, in_shape, sparsity)
    if key not in cache:
        x = torch.randn(in_shape, dtype=dense.weight.dtype, device=dense.weight.device)
        td, (ts,), (ratio,) = paired_ratio(dense, [sparse], (x,), rounds, timer)
        cache[key] = (td, ts, ratio)
    td, ts, ratio = cache[key]
    use = ratio >= min_speedup
    log.info("%s: %s %s sparsity %.1f%% input %s: dense %.3f ms, sparse %.3f ms, paired median %.2fx "
             "(needs %.2fx) -> %s", name, type(dense).__name__, tuple(dense.weight.shape), 100 * sparsity,
             tuple(in_shape), td * 1e3, ts * 1e3, ratio, min_speedup, "sparse" if use else "dense")
    if report is not None:
        report.append(dict(name=name, kind=type(dense).__name__, weight_shape=tuple(dense.weight.shape),
                           sparsity=sparsity, input_shape=tuple(in_shape), dense_ms=td * 1e3, sparse_ms=ts * 1e3,
                           speedup=ratio, choice="sparse" if use else "dense"))
    return use


def fastest_model(baseline: nn.Module, candidates: dict[str, nn.Module], args: tuple, rounds: int,
                  min_speedup: float, timer: Optional[Timer] = None) -> tuple[Optional[str], dict[str, float]]:
    """The whole-model guard: the candidate with the best median paired speedup over ``baseline``, or
    None when no candidate beats it by ``min_speedup``.  Also returns every candidate's speedup."""
    names = list(candidates)
    _, _, ratios = paired_ratio(baseline, [candidates[n] for n in names], args, rounds, timer)
    speedups = dict(zip(names, ratios))
    best = max(names, key=speedups.__getitem__) if names else None
    if best is None or speedups[best] < min_speedup:
        return None, speedups
    return best, speedups


class AutoSparse(nn.Module):
    """A layer whose dense/sparse choice is made on its first input of each shape (measured).

    Keeps both the dense module and its sparse replacement; ``choices`` maps input shapes to
    ``"dense"`` / ``"sparse"``.  Used by ``sparsify`` for convs when no ``example_inputs`` are given.
    """

    def __init__(self, name: str, dense: nn.Module, sparse: nn.Module, sparsity: float, reps: int = 7,
                 min_speedup: float = 1.1, report: Optional[list] = None, cache: CalibrationCache | None = None,
                 timer: Optional[Timer] = None):
        super().__init__()
        self._cache = CalibrationCache() if cache is None else cache
        self.dense, self.sparse = dense, sparse
        self.layer_name, self.layer_sparsity = name, sparsity
        self.reps, self.min_speedup, self._report, self._timer = reps, min_speedup, report, timer
        self.choices: dict[tuple, str] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = tuple(x.shape)
        choice = self.choices.get(shape)
        if choice is None:
            use = decide_layer(self.layer_name, self.dense, self.sparse, shape, self.layer_sparsity, self.reps,
                               self.min_speedup, self._report, self._cache, self._timer)
            choice = self.choices[shape] = "sparse" if use else "dense"
        return (self.sparse if choice == "sparse" else self.dense)(x)
