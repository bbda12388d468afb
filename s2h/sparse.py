"""Sparse inference for unstructured-pruned models (DESIGN §4).

``sparsify(model)`` replaces pruned ``nn.Linear`` / ``nn.Conv2d`` layers by :class:`SparseLinear`
/ :class:`SparseConv2d`, which run the s2h_kernels sparse kernels (CSR weights, C++ on the CPU:
AVX-512/AVX2 micro-kernel, no im2col for convs; Triton or CUDA C++ on a GPU).

Which layers go sparse is measured, not guessed: for every candidate layer (weight sparsity >=
``min_sparsity``) ``sparsify`` times the dense layer and its sparse replacement on an input of the
layer's real shape and keeps whichever is faster (sparse must win by ``min_speedup``).  Timings
are cached per (layer kind, weight shape, conv geometry, input shape, density, dtype, device,
threads), so the repeated blocks of a ResNet are timed once.  Every decision is logged on the
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
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from s2h_kernels.spmm import SparseWeight, sell_applies, spmm, spmm_conv2d

__all__ = ["SparseLinear", "SparseConv2d", "AutoSparse", "FastMaxPool2d", "sparsify", "clear_calibration_cache"]

log = logging.getLogger("s2h.sparse")

_spmm_op = torch.ops.s2h.spmm.default
_conv_op = torch.ops.s2h.spmm_conv2d.default
_sell_op = torch.ops.s2h.spmv_sell.default


def _sparsity(weight: torch.Tensor) -> float:
    return float((weight == 0).sum().item()) / max(1, weight.numel())


class _SparseBase(nn.Module):
    """Holds a SparseWeight as buffers (so .to(), state_dict and deepcopy work)."""

    def _set_weight(self, sw: SparseWeight, bias: Optional[torch.Tensor]) -> None:
        self.register_buffer("values", sw.values)
        self.register_buffer("row_ptr", sw.row_ptr)
        self.register_buffer("col_idx", sw.col_idx)
        self.register_buffer("row_order", sw.row_order)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._shape = sw.shape

    @property
    def sparse_weight(self) -> SparseWeight:
        sw = getattr(self, "_sw", None)
        if sw is None or any(a is not b for a, b in ((sw.values, self.values), (sw.row_ptr, self.row_ptr),
                                                     (sw.col_idx, self.col_idx), (sw.row_order, self.row_order))):
            sw = SparseWeight(self.values, self.row_ptr, self.col_idx, self._shape, self.row_order)
            self._sw = sw  # plain attribute: rebuilt when .to() / load_state_dict replace the buffers
        return sw

    # The forward fast path reads the packed tensors from a plain-attribute cache (buffer access
    # through nn.Module.__getattr__ costs about a microsecond each); anything that replaces the
    # buffers (.to(), load_state_dict, assignment) drops the cache.
    def _op_args(self):
        cache = self.__dict__.get("_op_cache")
        if cache is None:
            v, b = self.values, self.bias
            ok = v.device.type == "cpu" and v.dtype in (torch.float32, torch.float64) and (b is None or b.dtype == v.dtype)
            cache = self.__dict__["_op_cache"] = (v, self.row_ptr, self.col_idx, b, v.dtype if ok else None)
        return cache

    def __setattr__(self, name, value):
        self.__dict__.pop("_op_cache", None)
        super().__setattr__(name, value)

    def _apply(self, *args, **kwargs):
        self.__dict__.pop("_op_cache", None)
        return super()._apply(*args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self.__dict__.pop("_op_cache", None)
        return super()._load_from_state_dict(*args, **kwargs)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.values.numel() / max(1, self._shape[0] * self._shape[1])


class SparseLinear(_SparseBase):
    """``y = x @ W.T + b`` (optionally ReLU) with W stored sparse.  x: (..., in_features)."""

    def __init__(self, sparse_weight: SparseWeight, bias: Optional[torch.Tensor] = None, relu: bool = False):
        super().__init__()
        self.out_features, self.in_features = sparse_weight.shape
        self.relu = relu
        self._set_weight(sparse_weight, bias)

    @classmethod
    def from_dense(cls, linear: nn.Linear, relu: bool = False) -> "SparseLinear":
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"SparseLinear.from_dense: expected nn.Linear, got {type(linear).__name__}")
        return cls(SparseWeight.from_dense(linear.weight.detach()), linear.bias, relu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"SparseLinear: input has {x.shape[-1]} features, expected {self.in_features}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        values, row_ptr, col_idx, bias, dtype = self._op_args()
        if x2.dtype is dtype and x2.device.type == "cpu" and not (x2.requires_grad and torch.is_grad_enabled()):
            if sell_applies(x2.shape[0], dtype):  # batch 1: the SELL-16 kernel
                y = _sell_op(*self.sparse_weight.sell(), self.out_features, x2.t(), bias, self.relu)
            else:
                y = _spmm_op(values, row_ptr, col_idx, None, x2.t(), bias, self.relu)
        else:
            y = spmm(self.sparse_weight, x2.t(), self.bias, self.relu)  # (out, B)
        y = y.t()
        if y.shape[0] > 1:
            y = y.contiguous()
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"sparsity={self.sparsity:.1%}" + (", relu=True" if self.relu else ""))


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0)
        pads = []
        for k, d in zip(conv.kernel_size, conv.dilation):
            total = d * (k - 1)
            if total % 2:
                raise ValueError("SparseConv2d: padding='same' with an even effective kernel is not supported")
            pads.append(total // 2)
        return tuple(pads)
    return tuple(conv.padding)


class SparseConv2d(_SparseBase):
    """``nn.Conv2d`` (zero padding; any stride, padding, dilation, groups) with the weight sparse.

    On the CPU the convolution runs without im2col (a padded copy of the input, every nonzero an
    offset into it); 1x1 convolutions without padding read the input directly.
    """

    def __init__(self, sparse_weight: SparseWeight, kernel_size, in_channels: int, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: Optional[torch.Tensor] = None, relu: bool = False):
        super().__init__()
        pair = lambda v: (v, v) if isinstance(v, int) else tuple(int(a) for a in v)  # noqa: E731
        self.kernel_size, self.stride = pair(kernel_size), pair(stride)
        self.padding, self.dilation = pair(padding), pair(dilation)
        self.groups, self.in_channels, self.relu = int(groups), int(in_channels), relu
        self.out_channels = sparse_weight.shape[0]
        expected_k = in_channels // groups * self.kernel_size[0] * self.kernel_size[1]
        if sparse_weight.shape[1] != expected_k:
            raise ValueError(f"SparseConv2d: weight has {sparse_weight.shape[1]} columns, expected {expected_k}")
        self._set_weight(sparse_weight, bias)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, relu: bool = False) -> "SparseConv2d":
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"SparseConv2d.from_dense: expected nn.Conv2d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"SparseConv2d.from_dense: padding_mode={conv.padding_mode!r} is not supported (zeros only)")
        w = conv.weight.detach()
        sw = SparseWeight.from_dense(w.reshape(w.shape[0], -1))
        return cls(sw, conv.kernel_size, conv.in_channels, conv.stride, _conv_padding(conv), conv.dilation,
                   conv.groups, conv.bias, relu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values, row_ptr, col_idx, bias, dtype = self._op_args()
        if (x.dtype is dtype and x.device.type == "cpu" and x.dim() == 4 and x.shape[1] == self.in_channels
                and not (x.requires_grad and torch.is_grad_enabled())):
            return _conv_op(values, row_ptr, col_idx, x, bias, self.kernel_size, self.stride, self.padding,
                            self.dilation, self.groups, self.relu)
        return spmm_conv2d(self.sparse_weight, x, self.kernel_size, self.bias, self.stride, self.padding,
                           self.dilation, self.groups, self.relu)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"bias={self.bias is not None}, sparsity={self.sparsity:.1%}" + (", relu=True" if self.relu else ""))


_MKLDNN = torch.backends.mkldnn.is_available()


class FastMaxPool2d(nn.Module):
    """``nn.MaxPool2d`` computed by oneDNN on the CPU (same result).

    torch's NCHW CPU max-pool kernel is scalar: on a 2-core AVX-512 machine it takes 8 ms for
    ResNet's 64x112x112 stem pool at batch 1 (oneDNN with its layout conversions: 0.8 ms), which
    alone is a third of a 90%-sparse ResNet-18 forward.  Other devices, dtypes, dilation or
    inputs that need grad fall back to ``F.max_pool2d`` (so does a torch.compile'd graph, where
    inductor generates its own pooling kernel).
    """

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False):
        super().__init__()
        pair = lambda v: (v, v) if isinstance(v, int) else tuple(int(a) for a in v)  # noqa: E731
        self.kernel_size = pair(kernel_size)
        self.stride = pair(stride) if stride is not None else self.kernel_size
        self.padding, self.dilation, self.ceil_mode = pair(padding), pair(dilation), bool(ceil_mode)

    @classmethod
    def from_module(cls, pool: nn.MaxPool2d) -> "FastMaxPool2d":
        if pool.return_indices:
            raise ValueError("FastMaxPool2d: return_indices=True is not supported")
        return cls(pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4 and self.dilation == (1, 1)
                and _MKLDNN and not torch.compiler.is_compiling()
                and not (x.requires_grad and torch.is_grad_enabled())):
            return torch.mkldnn_max_pool2d(x.contiguous().to_mkldnn(), self.kernel_size, self.stride, self.padding,
                                           self.dilation, self.ceil_mode).to_dense()
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"ceil_mode={self.ceil_mode}")


# ----------------------------------------------------------------------------------------------
# Calibration: dense vs sparse, measured per layer shape
# ----------------------------------------------------------------------------------------------

_CACHE: dict[tuple, tuple[float, float]] = {}


def clear_calibration_cache() -> None:
    """Forget every cached dense/sparse timing."""
    _CACHE.clear()


def _layer_key(module: nn.Module, in_shape: tuple, sparsity: float) -> tuple:
    w = module.weight
    geo: tuple = ()
    if isinstance(module, nn.Conv2d):
        geo = (module.kernel_size, module.stride, _conv_padding(module), module.dilation, module.groups)
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


def _measure(dense: nn.Module, sparse: nn.Module, in_shape: tuple, sparsity: float, reps: int) -> tuple[float, float]:
    key = _layer_key(dense, in_shape, sparsity)
    if key not in _CACHE:
        x = torch.randn(in_shape, dtype=dense.weight.dtype, device=dense.weight.device)
        # Interleave the two so that both see the same machine load.
        td, ts = float("inf"), float("inf")
        for _ in range(2):
            td = min(td, _time(lambda: dense(x), reps, x.device))
            ts = min(ts, _time(lambda: sparse(x), reps, x.device))
        _CACHE[key] = (td, ts)
    return _CACHE[key]


def _decide(name: str, dense: nn.Module, sparse: nn.Module, in_shape: tuple, sparsity: float, reps: int,
            min_speedup: float, report: Optional[list]) -> bool:
    td, ts = _measure(dense, sparse, in_shape, sparsity, reps)
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
                 min_speedup: float = 1.0, report: Optional[list] = None):
        super().__init__()
        self.dense, self.sparse = dense, sparse
        self.layer_name, self.layer_sparsity = name, sparsity
        self.reps, self.min_speedup, self._report = reps, min_speedup, report
        self.choices: dict[tuple, str] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = tuple(x.shape)
        choice = self.choices.get(shape)
        if choice is None:
            use = _decide(self.layer_name, self.dense, self.sparse, shape, self.layer_sparsity, self.reps,
                          self.min_speedup, self._report)
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


def sparsify(model: nn.Module, min_sparsity: float = 0.5, example_inputs=None, calibrate: bool = True,
             min_speedup: float = 1.0, reps: int = 5, exclude: Sequence[str] = (), inplace: bool = False,
             report: Optional[list] = None, fast_pool: bool = True, fuse: bool = True) -> nn.Module:
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
    Returns:
        The converted model, with all parameters frozen (inference only).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"sparsify: model must be an nn.Module, got {type(model).__name__}")
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"sparsify: min_sparsity must be in [0, 1], got {min_sparsity}")
    if not inplace:
        model = copy.deepcopy(model)
    for p in model.parameters():
        p.requires_grad_(False)
    if fuse:
        model = _fold_batchnorm(model)

    candidates: list[tuple[str, nn.Module, float]] = []
    for name, mod in model.named_modules():
        if name in exclude or type(mod) not in (nn.Linear, nn.Conv2d):
            continue
        if isinstance(mod, nn.Conv2d) and mod.padding_mode != "zeros":
            log.info("%s: padding_mode=%s -> dense", name, mod.padding_mode)
            continue
        s = _sparsity(mod.weight)
        if s < min_sparsity:
            log.info("%s: %s sparsity %.1f%% < min_sparsity %.1f%% -> dense", name, type(mod).__name__, 100 * s,
                     100 * min_sparsity)
            if report is not None:
                report.append(dict(name=name, kind=type(mod).__name__, weight_shape=tuple(mod.weight.shape),
                                   sparsity=s, choice="dense (below min_sparsity)"))
            continue
        candidates.append((name, mod, s))

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
            _set_module(model, name, AutoSparse(name, mod, sparse, s, reps, min_speedup, report))
            continue
        if _decide(name, mod, sparse, in_shape, s, reps, min_speedup, report):
            _set_module(model, name, sparse)
    if fuse:
        n = _fuse_relu(model)
        if n:
            log.info("fuse: %d ReLUs fused into sparse layers", n)
    return model
