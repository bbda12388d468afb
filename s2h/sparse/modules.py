"""Sparse inference layers: CSR weights run by the s2h_kernels sparse kernels (docs/DESIGN.md §4).

:class:`SparseLinear` and :class:`SparseConv2d` (C++ on the CPU: AVX-512/AVX2 micro-kernel, no
im2col for convs; Triton or CUDA C++ on a GPU) and :class:`FastMaxPool2d`. Inference only: sparse
layers have no backward. :func:`s2h.sparse.sparsify` decides which layers to replace.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from s2h_kernels import SparseWeight, spmm, spmm_conv2d
from s2h_kernels.sparse_format import sell_applies

__all__ = ["SparseLinear", "SparseConv2d", "FastMaxPool2d", "weight_sparsity", "conv_padding", "ONNX_MESSAGE"]

_spmm_op = torch.ops.s2h.spmm.default
_conv_op = torch.ops.s2h.spmm_conv2d.default
_sell_op = torch.ops.s2h.spmv_sell.default
_HALF = (torch.bfloat16, torch.float16)
_F32 = torch.float32
_grad_enabled, _is_tracing, _is_compiling = torch.is_grad_enabled, torch.jit.is_tracing, torch.compiler.is_compiling
_FAST_DTYPES = (torch.float32, torch.float64, *_HALF)

ONNX_MESSAGE = (
    "{layer} cannot be exported to ONNX: it runs the custom s2h sparse kernels (s2h::spmm / s2h::spmm_conv2d), "
    "which ONNX has no operator for and ONNX runtimes cannot run. Export the dense masked model instead: "
    "torch.onnx.export(s2h.sparse.densify(model), ...) gives the same outputs with the zeros kept in dense "
    "weights, for onnxruntime or a sparsity-aware ONNX engine; to keep the sparse kernels, use torch.export "
    "(torch.export.export(model, args) works on sparsified models).")


def _onnx_exporting() -> bool:
    """torch.onnx.export is running (either exporter).  Reads the dynamo exporter's flag itself as
    well: torch.compile / strict torch.export fold ``torch.onnx.is_in_onnx_export()`` to False."""
    if torch.onnx.is_in_onnx_export():
        return True
    flags = getattr(getattr(getattr(torch.onnx, "_internal", None), "exporter", None), "_flags", None)
    return bool(getattr(flags, "_is_onnx_exporting", False))


def weight_sparsity(weight: torch.Tensor) -> float:
    return float((weight == 0).sum().item()) / max(1, weight.numel())


class _SparseBase(nn.Module):
    """Holds a SparseWeight as buffers (so .to(), state_dict and deepcopy work)."""

    _batch1_sell = False  # SparseLinear: float32 batch 1 runs the SELL-16 kernel (_op_args)

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
        """(values, row_ptr, col_idx, bias, dtype, sw, row_shape): the kernel operands and the input
        dtype they serve (None: no fast path); for float32 CPU layers the SparseWeight whose SELL-16
        packing (``sw.sell()``: cached, rebuilt when the values change in place) runs batch 1 (else
        None), and the input shape (1, in_features) that SparseLinear passes to that kernel as it is
        (it returns (1, out_features); None: no such path, e.g. in_features == 1).  bfloat16 /
        float16 layers keep float32 copies here: the kernels compute in float32 and the layer casts
        the result back to the input's dtype."""
        cache = self.__dict__.get("_op_cache")
        if cache is None or torch.compiler.is_compiling():
            # Never cache while torch.export / torch.compile trace: the buffers are fake tensors then.
            v, b = self.values, self.bias
            ok = v.device.type == "cpu" and v.dtype in _FAST_DTYPES and (b is None or b.dtype == v.dtype)
            if ok and v.dtype in _HALF:
                cache = (v.float(), self.row_ptr, self.col_idx, None if b is None else b.float(), v.dtype, None, None)
            else:
                fp32 = self._batch1_sell and ok and v.dtype is torch.float32 and not torch.compiler.is_compiling()
                sw = self.sparse_weight if fp32 else None
                cache = (v, self.row_ptr, self.col_idx, b, v.dtype if ok else None, sw,
                         (1, self._shape[1]) if sw is not None and self._shape[1] != 1 else None)
            if not torch.compiler.is_compiling():
                self.__dict__["_op_cache"] = cache
        return cache

    def _no_onnx(self) -> None:
        if (torch.jit.is_tracing() or torch.compiler.is_compiling()) and _onnx_exporting():
            raise RuntimeError(ONNX_MESSAGE.format(layer=type(self).__name__))

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

    _batch1_sell = True

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
        cache = self.__dict__.get("_op_cache")
        # Batch 1 in float32 (a classifier): the SELL-16 kernel takes the (1, K) input as it is and
        # returns (1, out_features); a few checks (the op costs microseconds, and so did the views).
        if (cache is not None and x.dtype is _F32 and x.shape == cache[6] and x.is_cpu
                and not (x.requires_grad and _grad_enabled()) and not _is_tracing() and not _is_compiling()):
            return _sell_op(*cache[5].sell(), self.out_features, x, cache[3], self.relu)
        shape = x.shape
        if shape[-1] != self.in_features:
            raise ValueError(f"SparseLinear: input has {shape[-1]} features, expected {self.in_features}")
        self._no_onnx()
        values, row_ptr, col_idx, bias, dtype, sw, _ = self._op_args()
        lead = shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype is dtype and x2.device.type == "cpu" and not (x2.requires_grad and torch.is_grad_enabled()):
            if dtype in _HALF:
                y = _spmm_op(values, row_ptr, col_idx, None, x2.t().float(), bias, self.relu).to(dtype)
            elif sw is not None and sell_applies(x2.shape[0], dtype):  # batch 1: the SELL-16 kernel
                y = _sell_op(*sw.sell(), self.out_features, x2.t(), bias, self.relu)
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


def conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
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
        return cls(sw, conv.kernel_size, conv.in_channels, conv.stride, conv_padding(conv), conv.dilation,
                   conv.groups, conv.bias, relu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._no_onnx()
        values, row_ptr, col_idx, bias, dtype = self._op_args()[:5]
        if (x.dtype is dtype and x.device.type == "cpu" and x.dim() == 4 and x.shape[1] == self.in_channels
                and not (x.requires_grad and torch.is_grad_enabled())):
            half = dtype in _HALF
            y = _conv_op(values, row_ptr, col_idx, x.float() if half else x, bias, self.kernel_size, self.stride,
                         self.padding, self.dilation, self.groups, self.relu)
            return y.to(dtype) if half else y
        return spmm_conv2d(self.sparse_weight, x, self.kernel_size, self.bias, self.stride, self.padding,
                           self.dilation, self.groups, self.relu)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"bias={self.bias is not None}, sparsity={self.sparsity:.1%}" + (", relu=True" if self.relu else ""))


_MKLDNN = torch.backends.mkldnn.is_available()


class FastMaxPool2d(nn.Module):
    """``nn.MaxPool2d`` computed by oneDNN on the CPU (same result).

    torch's NCHW CPU max-pool kernel is scalar, several times slower than oneDNN on ResNet's stem
    pool, a large share of a sparse ResNet-18 forward (benchmarks/results/spmm_cpu.md).  Other devices, dtypes, dilation or
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
                and _MKLDNN and not torch.compiler.is_compiling() and not torch.compiler.is_exporting()
                and not torch.jit.is_tracing()
                and not (x.requires_grad and torch.is_grad_enabled())):
            return torch.mkldnn_max_pool2d(x.contiguous().to_mkldnn(), self.kernel_size, self.stride, self.padding,
                                           self.dilation, self.ceil_mode).to_dense()
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"ceil_mode={self.ceil_mode}")
