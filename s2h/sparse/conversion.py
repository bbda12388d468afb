"""``sparsify``: replace pruned layers by sparse ones where that is measured faster (docs/DESIGN.md §4).

``sparsify(model)`` replaces pruned ``nn.Linear`` / ``nn.Conv2d`` layers by :class:`SparseLinear`
/ :class:`SparseConv2d`, which run the s2h_kernels sparse kernels (CSR weights, C++ on the CPU:
AVX-512/AVX2 micro-kernel, no im2col for convs; Triton or CUDA C++ on a GPU).

Which layers go sparse is measured, not guessed: for every candidate layer (weight sparsity >=
``min_sparsity``) ``sparsify`` times the dense layer and its sparse replacement on an input of the
layer's real shape and keeps whichever is faster (sparse must win by ``min_speedup``).  Timings
are cached per (layer kind, weight shape, conv geometry, input shape, density, dtype, device,
threads) in a :class:`CalibrationCache`, so the repeated blocks of a ResNet are timed once. The
cache belongs to one ``sparsify`` call (and its :class:`AutoSparse` layers) unless you pass one in
(``cache=``) to share timings between calls; nothing is cached process-wide.  Every decision is logged on the
``s2h.sparse`` logger (INFO) and can be collected with ``report=[]``.

Input shapes come from ``example_inputs`` (one forward pass with hooks).  Without them, a Linear
layer is timed at batch 1 and a conv layer defers its decision to its first forward call: it is
wrapped in :class:`AutoSparse`, which keeps both versions, times them on the first input of each
new shape and then runs the faster one.

For an ``eval()`` model that torch.fx can trace, BatchNorm is folded into the preceding conv first
and a ReLU after a sparse layer runs in its epilogue (``fuse=True``); ``nn.MaxPool2d`` runs on
oneDNN (:class:`FastMaxPool2d`, ``fast_pool=True``): both give the same results and are what a
CPU deployment wants; both can be turned off.

Inference only: sparse layers have no backward.  ``sparsify`` returns a copy of the model (unless
``inplace=True``) with every parameter frozen (``requires_grad=False``), so running it without
``torch.no_grad()`` works; feeding a tensor that requires grad raises a clear error.
"""
from __future__ import annotations

import copy
import logging
import time
import warnings
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .modules import FastMaxPool2d, SparseConv2d, SparseLinear, conv_padding, weight_sparsity

__all__ = ["AutoSparse", "CalibrationCache", "sparsify", "clear_calibration_cache", "layer_key"]

log = logging.getLogger("s2h.sparse")


# ----------------------------------------------------------------------------------------------
# Calibration: dense vs sparse, measured per layer shape
# ----------------------------------------------------------------------------------------------

class CalibrationCache(dict):
    """Dense and sparse timings (seconds) per layer key (see :func:`layer_key`)."""


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


def _time(fn: Callable[[], Any], reps: int, device: torch.device) -> float:
    """Best of ``reps`` timed calls after one warm-up (best-of is robust to a busy machine)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        fn()
        sync()
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            sync()
            best = min(best, time.perf_counter() - t0)
    return best


def _measure(dense: nn.Module, sparse: nn.Module, in_shape: tuple, sparsity: float, reps: int,
             cache: CalibrationCache) -> tuple[float, float]:
    key = layer_key(dense, in_shape, sparsity)
    if key not in cache:
        x = torch.randn(in_shape, dtype=dense.weight.dtype, device=dense.weight.device)
        # Interleave the two so that both see the same machine load.
        td, ts = float("inf"), float("inf")
        for _ in range(2):
            td = min(td, _time(lambda: dense(x), reps, x.device))
            ts = min(ts, _time(lambda: sparse(x), reps, x.device))
        cache[key] = (td, ts)
    return cache[key]


def _decide(name: str, dense: nn.Module, sparse: nn.Module, in_shape: tuple, sparsity: float, reps: int,
            min_speedup: float, report: Optional[list], cache: CalibrationCache) -> bool:
    td, ts = _measure(dense, sparse, in_shape, sparsity, reps, cache)
    use = ts * min_speedup < td
    log.info("%s: %s %s sparsity %.1f%% input %s: dense %.3f ms, sparse %.3f ms (%.2fx) -> %s", name,
             type(dense).__name__, tuple(dense.weight.shape), 100 * sparsity, tuple(in_shape), td * 1e3, ts * 1e3,
             td / ts if ts > 0 else float("inf"), "sparse" if use else "dense")
    if report is not None:
        report.append(dict(name=name, kind=type(dense).__name__, weight_shape=tuple(dense.weight.shape),
                           sparsity=sparsity, input_shape=tuple(in_shape), dense_ms=td * 1e3, sparse_ms=ts * 1e3,
                           choice="sparse" if use else "dense"))
    return use


class AutoSparse(nn.Module):
    """A layer whose dense/sparse choice is made on its first input of each shape (measured).

    Keeps both the dense module and its sparse replacement; ``choices`` maps input shapes to
    ``"dense"`` / ``"sparse"``.
    """

    def __init__(self, name: str, dense: nn.Module, sparse: nn.Module, sparsity: float, reps: int = 5,
                 min_speedup: float = 1.0, report: Optional[list] = None, cache: CalibrationCache | None = None):
        super().__init__()
        self._cache = CalibrationCache() if cache is None else cache
        self.dense, self.sparse = dense, sparse
        self.layer_name, self.layer_sparsity = name, sparsity
        self.reps, self.min_speedup, self._report = reps, min_speedup, report
        self.choices: dict[tuple, str] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = tuple(x.shape)
        choice = self.choices.get(shape)
        if choice is None:
            use = _decide(self.layer_name, self.dense, self.sparse, shape, self.layer_sparsity, self.reps,
                          self.min_speedup, self._report, self._cache)
            choice = self.choices[shape] = "sparse" if use else "dense"
        return (self.sparse if choice == "sparse" else self.dense)(x)


def _input_shapes(model: nn.Module, names: Sequence[str], example_inputs) -> dict[str, tuple]:
    shapes: dict[str, tuple] = {}
    modules = dict(model.named_modules())
    hooks = []
    for n in names:
        def hook(mod, args, n=n):
            shapes.setdefault(n, tuple(args[0].shape))
        hooks.append(modules[n].register_forward_pre_hook(hook))
    try:
        args = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        with torch.no_grad():
            model(*args)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold eval-mode BatchNorm into the preceding conv / linear (torch.fx); model unchanged if it
    cannot be traced."""
    if model.training:
        log.info("fuse: model is in training mode, BatchNorm not folded (call model.eval() first)")
        return model
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    try:
        from torch.fx.experimental.optimization import fuse as fx_fuse

        folded = fx_fuse(model, inplace=True)
    except Exception as e:  # noqa: BLE001  (untraceable model: keep it as it is)
        log.info("fuse: torch.fx could not trace the model (%s: %s); BatchNorm not folded", type(e).__name__, e)
        return model
    log.info("fuse: folded %d BatchNorm layers into their convs",
             sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
             - sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules()))
    return folded


_RELU_FUNCTIONS = {torch.relu, torch.relu_, F.relu}


def _fuse_relu(gm: nn.Module) -> int:
    """In a torch.fx GraphModule, fold ``relu(sparse_layer(x))`` into the sparse layer's epilogue."""
    if not isinstance(gm, torch.fx.GraphModule):
        return 0
    modules = dict(gm.named_modules())
    fused = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), (SparseConv2d, SparseLinear)):
            continue
        if len(node.users) != 1:
            continue
        user = next(iter(node.users))
        is_relu = ((user.op == "call_module" and type(modules.get(user.target)) is nn.ReLU)
                   or (user.op == "call_function" and user.target in _RELU_FUNCTIONS and not user.kwargs)
                   or (user.op == "call_method" and user.target in ("relu", "relu_")))
        if not is_relu or user.args[0] is not node or len(user.args) != 1:
            continue
        modules[node.target].relu = True
        user.replace_all_uses_with(node)
        gm.graph.erase_node(user)
        fused += 1
    if fused:
        gm.graph.lint()
        gm.recompile()
    return fused


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _candidates(model: nn.Module, min_sparsity: float, exclude: Sequence[str],
                report: Optional[list]) -> list[tuple[str, nn.Module, float]]:
    """(name, layer, weight sparsity) of every Linear / zero-padded Conv2d at or above ``min_sparsity``."""
    candidates: list[tuple[str, nn.Module, float]] = []
    for name, mod in model.named_modules():
        if name in exclude or type(mod) not in (nn.Linear, nn.Conv2d):
            continue
        if isinstance(mod, nn.Conv2d) and mod.padding_mode != "zeros":
            log.info("%s: padding_mode=%s -> dense", name, mod.padding_mode)
            continue
        s = weight_sparsity(mod.weight)
        if s < min_sparsity:
            log.info("%s: %s sparsity %.1f%% < min_sparsity %.1f%% -> dense", name, type(mod).__name__, 100 * s,
                     100 * min_sparsity)
            if report is not None:
                report.append(dict(name=name, kind=type(mod).__name__, weight_shape=tuple(mod.weight.shape),
                                   sparsity=s, choice="dense (below min_sparsity)"))
            continue
        candidates.append((name, mod, s))
    return candidates


def sparsify(model: nn.Module, min_sparsity: float = 0.5, example_inputs=None, calibrate: bool = True,
             min_speedup: float = 1.0, reps: int = 5, exclude: Sequence[str] = (), inplace: bool = False,
             report: Optional[list] = None, fast_pool: bool = True, fuse: bool = True,
             cache: CalibrationCache | None = None) -> nn.Module:
    """Replace pruned ``nn.Linear`` / ``nn.Conv2d`` layers by sparse ones where that is faster.

    Args:
        model: a pruned model (zeros in the weights), ideally in ``eval()`` mode.
        min_sparsity: layers whose weight has a smaller fraction of zeros stay dense, untimed.
        example_inputs: a tensor (or tuple of forward arguments) with the deployment input shape;
            used to time each layer at its real input shape.  Without it, see the module docstring.
        calibrate: time dense vs sparse per layer (default).  ``False``: every layer above
            ``min_sparsity`` goes sparse.
        min_speedup: sparse must be this much faster than dense to be chosen.
        reps: timed calls per variant (best of).
        exclude: module names (as in ``named_modules``) to leave alone.
        inplace: modify ``model`` instead of a deep copy.
        report: a list that receives one dict per candidate layer (name, shapes, timings, choice).
        fast_pool: also replace ``nn.MaxPool2d`` by :class:`FastMaxPool2d` (same result, oneDNN
            instead of torch's scalar NCHW kernel on the CPU).
        fuse: for a model in ``eval()`` mode that torch.fx can trace, fold BatchNorm into the
            preceding conv / linear first and fuse a ReLU that follows a sparse layer into its
            epilogue.  The result is then a ``torch.fx.GraphModule`` (same submodule names).
            Untraceable models are converted without fusion.
        cache: a :class:`CalibrationCache` to reuse timings from (and add to); default a new one.
    Returns:
        The converted model, with all parameters frozen (inference only).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"sparsify: model must be an nn.Module, got {type(model).__name__}")
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"sparsify: min_sparsity must be in [0, 1], got {min_sparsity}")
    cache = CalibrationCache() if cache is None else cache
    if not inplace:
        model = copy.deepcopy(model)
    for p in model.parameters():
        p.requires_grad_(False)
    if fuse:
        model = _fold_batchnorm(model)
    candidates = _candidates(model, min_sparsity, exclude, report)

    if fast_pool:
        for name, mod in list(model.named_modules()):
            if type(mod) is nn.MaxPool2d and not mod.return_indices and name not in exclude:
                _set_module(model, name, FastMaxPool2d.from_module(mod))
                log.info("%s: MaxPool2d -> FastMaxPool2d (oneDNN)", name)

    shapes = _input_shapes(model, [n for n, _, _ in candidates], example_inputs) if (
        calibrate and example_inputs is not None) else {}
    for name, mod, s in candidates:
        sparse = SparseLinear.from_dense(mod) if isinstance(mod, nn.Linear) else SparseConv2d.from_dense(mod)
        if not calibrate:
            log.info("%s: %s sparsity %.1f%% -> sparse (calibrate=False)", name, type(mod).__name__, 100 * s)
            if report is not None:
                report.append(dict(name=name, kind=type(mod).__name__, weight_shape=tuple(mod.weight.shape),
                                   sparsity=s, choice="sparse"))
            _set_module(model, name, sparse)
            continue
        in_shape = shapes.get(name)
        if in_shape is None and example_inputs is not None:
            log.info("%s: not reached by example_inputs -> dense", name)
            continue
        if in_shape is None and isinstance(mod, nn.Linear):
            in_shape = (1, mod.in_features)
        if in_shape is None:  # conv without example input: decide on first call
            _set_module(model, name, AutoSparse(name, mod, sparse, s, reps, min_speedup, report, cache))
            continue
        if _decide(name, mod, sparse, in_shape, s, reps, min_speedup, report, cache):
            _set_module(model, name, sparse)
    if fuse:
        n = _fuse_relu(model)
        if n:
            log.info("fuse: %d ReLUs fused into sparse layers", n)
    return model
