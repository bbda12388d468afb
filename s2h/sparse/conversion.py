"""``sparsify``: replace pruned layers by sparse ones where that is measured faster (docs/DESIGN.md §4).

``sparsify(model)`` replaces pruned ``nn.Linear`` / ``nn.Conv2d`` layers by :class:`SparseLinear`
/ :class:`SparseConv2d`, which run the s2h_kernels sparse kernels (CSR weights, C++ on the CPU:
AVX-512/AVX2 micro-kernel, no im2col for convs; Triton or CUDA C++ on a GPU).

A model pruned with one global threshold has layers of very different sparsity, and a sparse
kernel only pays where the layer is sparse enough for its shape, batch and thread count.  So the
choice is measured, never guessed, and measured so that a noisy machine cannot fool it
(:mod:`.calibration`):

1. **Per layer** (weight sparsity >= ``min_sparsity``): the dense layer and its sparse
   replacement run in ``reps`` interleaved rounds on an input of the layer's real shape; the layer
   goes sparse only when the median of the per-round ratios ``t_dense / t_sparse`` is at least
   ``min_speedup`` (default 1.1: a 10% safety margin).  Timings are cached per (layer kind,
   weight shape, conv geometry, input shape, density, dtype, device, threads) in a
   :class:`CalibrationCache`, so the repeated blocks of a ResNet are timed once.
2. **Whole model** (``guard=True``, needs ``example_inputs`` and an ``eval()`` model): the
   converted model, the dense model with only the non-sparse rewrites (BatchNorm folded, oneDNN
   max-pool) and the model as given run in ``guard_rounds`` interleaved rounds; the converted
   model is kept only when its median paired speedup over the model as given is at least
   ``GUARD_MIN_SPEEDUP`` and the best of the candidates; otherwise the best dense form is returned
   (the model as given when nothing beats it).  So ``sparsify`` never returns a model slower than
   the one it was given, at the shape and thread count it was calibrated for.

Decisions hold for the batch shape of ``example_inputs`` and the thread count at the call
(``torch.get_num_threads()``): sparsify once per deployment setting.  Every decision is logged on
the ``s2h.sparse`` logger (INFO; a guard fallback is a WARNING) and can be collected with
``report=[]``.  ``timer=`` replaces the clock (for tests: a fake timer makes every decision
deterministic).

Without ``example_inputs`` a Linear layer is timed at batch 1 and a conv layer defers its decision
to its first forward call (:class:`AutoSparse`); there is no whole-model guard then.

For an ``eval()`` model that torch.fx can trace, BatchNorm is folded into the preceding conv first
and a ReLU after a sparse layer runs in its epilogue (``fuse=True``); ``nn.MaxPool2d`` runs on
oneDNN (:class:`FastMaxPool2d`, ``fast_pool=True``): both give the same results and are what a
CPU deployment wants; both can be turned off.  With ``example_inputs`` (and ``calibrate``) each
max-pool is timed against its oneDNN form at its real input shape and swapped only where that is
faster: oneDNN's pool wins on a ResNet stem but loses on small feature maps at batch 1, where its
layout conversions cost more than the pooling.

Inference only: sparse layers have no backward.  ``sparsify`` returns a copy of the model (unless
``inplace=True``) with every parameter frozen (``requires_grad=False``), so running it without
``torch.no_grad()`` works; feeding a tensor that requires grad raises a clear error.  Dtypes: the
model's own (``model.to(torch.bfloat16)`` works: sparse layers compute in float32 and return
bfloat16); a bfloat16 input to a float32 model is refused with a message.  ``torch.export`` works;
``torch.onnx.export`` refuses with a message pointing at :func:`s2h.sparse.densify`.
"""
from __future__ import annotations

import copy
import logging
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .calibration import AutoSparse, CalibrationCache, Timer, decide_layer, fastest_model, paired_ratio
from .export import check_input_dtype
from .modules import FastMaxPool2d, SparseConv2d, SparseLinear, weight_sparsity

__all__ = ["sparsify", "GUARD_MIN_SPEEDUP"]

log = logging.getLogger("s2h.sparse")

GUARD_MIN_SPEEDUP = 1.02
"""The whole-model guard keeps a rewritten model only when it beats the model as given by this much
(median of interleaved paired ratios)."""


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
                   or (user.op == "call_function" and user.target in _RELU_FUNCTIONS
                       and set(user.kwargs) <= {"inplace"})
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


def _as_args(example_inputs) -> tuple:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def _frozen_copy(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _max_pools(model: nn.Module, exclude: Sequence[str]) -> list[str]:
    """Names of the ``nn.MaxPool2d`` layers oneDNN can run."""
    return [name for name, mod in model.named_modules()
            if type(mod) is nn.MaxPool2d and not mod.return_indices and name not in exclude]


def _swap_pool(model: nn.Module, name: str, in_shape: Optional[tuple], cfg: dict) -> bool:
    """Swaps max-pool ``name`` for its oneDNN form unless timing at ``in_shape`` (when known) says it is
    slower; True when swapped."""
    pool = model.get_submodule(name)
    fast = FastMaxPool2d.from_module(pool)
    if in_shape is not None:
        x = torch.randn(in_shape)
        tp, (tf,), (ratio,) = paired_ratio(pool, [fast], (x,), cfg["reps"], cfg["timer"])
        use = ratio >= 1.0
        log.info("%s: MaxPool2d input %s: torch %.3f ms, oneDNN %.3f ms, paired median %.2fx -> %s", name,
                 tuple(in_shape), tp * 1e3, tf * 1e3, ratio, "oneDNN" if use else "torch")
        if cfg["report"] is not None:
            cfg["report"].append(dict(name=name, kind="MaxPool2d", input_shape=tuple(in_shape), torch_ms=tp * 1e3,
                                      onednn_ms=tf * 1e3, speedup=ratio, choice="oneDNN" if use else "torch"))
        if not use:
            return False
    _set_module(model, name, fast)
    log.info("%s: MaxPool2d -> FastMaxPool2d (oneDNN)", name)
    return True


def _convert_layers(model: nn.Module, candidates, shapes: dict, example_inputs, calibrate: bool, cfg: dict) -> int:
    """Swap each candidate for its sparse layer where chosen; returns how many went sparse."""
    n_sparse = 0
    for name, mod, s in candidates:
        sparse = SparseLinear.from_dense(mod) if isinstance(mod, nn.Linear) else SparseConv2d.from_dense(mod)
        if not calibrate:
            log.info("%s: %s sparsity %.1f%% -> sparse (calibrate=False)", name, type(mod).__name__, 100 * s)
            if cfg["report"] is not None:
                cfg["report"].append(dict(name=name, kind=type(mod).__name__, weight_shape=tuple(mod.weight.shape),
                                          sparsity=s, choice="sparse"))
            _set_module(model, name, sparse)
            n_sparse += 1
            continue
        in_shape = shapes.get(name)
        if in_shape is None and example_inputs is not None:
            log.info("%s: not reached by example_inputs -> dense", name)
            continue
        if in_shape is None and isinstance(mod, nn.Linear):
            in_shape = (1, mod.in_features)
        if in_shape is None:  # conv without example input: decide on first call
            _set_module(model, name, AutoSparse(name, mod, sparse, s, **cfg))
            continue
        if decide_layer(name, mod, sparse, in_shape, s, cfg["reps"], cfg["min_speedup"], cfg["report"], cfg["cache"],
                        cfg["timer"]):
            _set_module(model, name, sparse)
            n_sparse += 1
    return n_sparse


def _guard(original: nn.Module, dense_rewritten: Optional[nn.Module], converted: nn.Module, n_sparse: int,
           args: tuple, rounds: int, timer: Optional[Timer], report: Optional[list]) -> nn.Module:
    """The whole-model guard (module docstring, step 2): the fastest of the given forms, interleaved."""
    candidates = {}
    if n_sparse:
        candidates["sparsified"] = converted
        if dense_rewritten is not None:
            candidates["dense, rewritten"] = dense_rewritten
    else:
        candidates["dense, rewritten"] = converted
    best, speedups = fastest_model(original, candidates, args, rounds, GUARD_MIN_SPEEDUP, timer)
    text = ", ".join(f"{k} {v:.2f}x" for k, v in speedups.items())
    chosen = best or "as given"
    if n_sparse and chosen != "sparsified":
        log.warning("sparsify: the sparsified model was not faster than dense in %d interleaved rounds "
                    "(speedup over the model as given: %s); returning the dense model (%s)", rounds, text, chosen)
    else:
        log.info("sparsify guard: speedup over the model as given: %s -> %s", text, chosen)
    if report is not None:
        report.append(dict(name="<model>", kind="guard", speedups=speedups, choice=chosen))
    if best is None:
        return original
    return candidates[best]


def sparsify(model: nn.Module, min_sparsity: float = 0.5, example_inputs=None, calibrate: bool = True,
             min_speedup: float = 1.1, reps: int = 7, exclude: Sequence[str] = (), inplace: bool = False,
             report: Optional[list] = None, fast_pool: bool = True, fuse: bool = True,
             cache: CalibrationCache | None = None, guard: bool = True, guard_rounds: int = 5,
             timer: Optional[Timer] = None) -> nn.Module:
    """Replace pruned ``nn.Linear`` / ``nn.Conv2d`` layers by sparse ones where that is faster.

    Args:
        model: a pruned model (zeros in the weights), ideally in ``eval()`` mode.
        min_sparsity: layers whose weight has a smaller fraction of zeros stay dense, untimed.
        example_inputs: a tensor (or tuple of forward arguments) with the deployment input shape;
            used to time each layer at its real input shape and for the whole-model guard.
        calibrate: measure (default).  ``False``: every layer above ``min_sparsity`` goes sparse, no guard.
        min_speedup: a layer goes sparse when the median of its interleaved paired ratios
            ``t_dense / t_sparse`` is at least this (the safety margin).
        reps: interleaved rounds per layer.
        exclude: module names (as in ``named_modules``) to leave alone.
        inplace: modify ``model`` instead of a deep copy.
        report: a list that receives one dict per candidate layer (name, shapes, timings, speedup,
            choice) and one for the guard (name ``"<model>"``).
        fast_pool: replace ``nn.MaxPool2d`` by :class:`FastMaxPool2d` (oneDNN, same result); with
            ``example_inputs`` only the pools that are faster so at their input shape.
        fuse: fold BatchNorm and fuse ReLUs into sparse layers (``eval()`` models torch.fx can
            trace; the result is then a ``torch.fx.GraphModule`` with the same submodule names).
        cache: a :class:`CalibrationCache` to reuse layer timings from (and add to).
        guard: compare the whole converted model against the model as given and fall back to the
            fastest dense form when it is not faster (needs ``example_inputs``, ``eval()`` mode).
        guard_rounds: interleaved rounds of the guard.
        timer: ``timer(module, args) -> seconds`` for one call (default :func:`wall_timer`).
    Returns:
        The converted model, with all parameters frozen (inference only).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"sparsify: model must be an nn.Module, got {type(model).__name__}")
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"sparsify: min_sparsity must be in [0, 1], got {min_sparsity}")
    if min_speedup <= 0 or reps < 1 or guard_rounds < 1:
        raise ValueError(f"sparsify: min_speedup must be > 0 and reps, guard_rounds >= 1, got {min_speedup}, "
                         f"{reps}, {guard_rounds}")
    cache = CalibrationCache() if cache is None else cache
    guarding = bool(guard and calibrate and example_inputs is not None and not model.training)
    if guard and calibrate and example_inputs is not None and model.training:
        log.info("sparsify guard: model in training mode, not compared (call model.eval() first)")
    original = model if not inplace else (_frozen_copy(model) if guarding else None)
    model = model if inplace else copy.deepcopy(model)
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = dict(reps=reps, min_speedup=min_speedup, report=report, cache=cache, timer=timer)
    folded = _fold_batchnorm(model) if fuse else model
    model, rewritten = folded, folded is not model
    candidates = _candidates(model, min_sparsity, exclude, report)
    pools = _max_pools(model, exclude) if fast_pool else []
    # One forward records the input shape of every pool and candidate (swapping a pool changes none).
    shapes = _input_shapes(model, pools + [n for n, _, _ in candidates], example_inputs) if (
        calibrate and example_inputs is not None) else {}
    for name in pools:  # the dense rewrites end with the max-pools timed where shapes are known
        rewritten = _swap_pool(model, name, shapes.get(name), cfg) or rewritten
    dense_rewritten = copy.deepcopy(model) if guarding and rewritten else None
    n_sparse = _convert_layers(model, candidates, shapes, example_inputs, calibrate, cfg)
    if fuse:
        n = _fuse_relu(model)
        if n:
            log.info("fuse: %d ReLUs fused into sparse layers", n)
    if guarding and (n_sparse or rewritten):
        model = _guard(original, dense_rewritten, model, n_sparse, _as_args(example_inputs), guard_rounds, timer,
                       report)
        if model is original and not inplace:
            model = _frozen_copy(original)
    if check_input_dtype not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(check_input_dtype)
    return model
