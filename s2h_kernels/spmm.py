"""Sparse (unstructured) weight x dense matmul for pruned models (docs/DESIGN.md §4).

``y = act(W @ X + bias)`` with W (M x K) sparse, packed as a :class:`SparseWeight`
(s2h_kernels/sparse_format.py), and X (K x N) dense.

Backends:
  * CPU, C++ (csrc/cpu/spmm_*.cpp): a micro-kernel vectorised along N.  Per output row and tile
    of N it keeps the tile in registers (AVX-512: all of N up to 256 columns = 16 zmm
    accumulators, else 128-column tiles; AVX2: 64 columns), and per nonzero broadcasts the weight
    and FMAs one X row segment into it; short tiles split a row's nonzeros over several
    accumulator sets to keep ~8 FMA chains in flight.  K panels sized to L1 when a row keeps
    enough nonzeros per panel.  Threads: an nnz-balanced partition of the rows (or of the N
    tiles, when X outweighs W), in several chunks per thread pulled dynamically.  Runtime ISA
    dispatch AVX-512 / AVX2 / portable (csrc/cpu/cpu_isa.h; ``S2H_CPU_ISA=avx2|scalar`` forces a
    lower one).  N == 1 (a Linear layer at batch 1) in float32 runs ``s2h::spmv_sell`` on a
    SELL-16 packing (:meth:`SparseWeight.sell`, built once and cached): one gather and one FMA
    per 16 nonzeros of 16 rows (on AMD CPUs, whose gather instructions are microcode, 16 loads
    instead: ``S2H_SPMM_SELL_LOADS``); float64 runs a gather dot product per row.  X rows that do
    not start on a cache line are copied aligned once when each is reused enough.

Per call: CPU tensors in the weight's dtype without autograd take a fast path with the same
checks (a batch-1 layer costs a few microseconds in all, so the Python around the op counts);
everything else, and every error, goes through the general path.
  * CUDA tensors: Triton by default (s2h_kernels/_triton/spmm.py), CUDA C++ (csrc/cuda/spmm.cu,
    warp per row with the row swizzle) with ``backend="cuda"``.

Inference only: there is no autograd.  Calling with a tensor that requires grad while grad mode
is on raises ``RuntimeError``; run under ``torch.no_grad()`` / ``torch.inference_mode()``.
float32 and float64 run natively (float64 on the portable kernel); float16 / bfloat16 inputs are
computed in float32 and rounded once.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _triton
from ._backend import check_float, check_same_device, resolve_backend
from ._registration import define_triton_op, register_op
from .sparse_format import SparseWeight, sell_applies

__all__ = ["spmm"]


def _triton_spmm(values, row_ptr, col_idx, row_order, x, bias, relu):
    return _triton.load("spmm", "s2h::spmm_triton").spmm(values, row_ptr, col_idx, row_order, x, bias, relu)


define_triton_op("spmm_triton", "(Tensor values, Tensor row_ptr, Tensor col_idx, Tensor row_order, Tensor x, "
                 "Tensor? bias, bool relu) -> Tensor", _triton_spmm)


# Fake kernels (torch.compile / meta).  No autograd: inference only (see the module docstring).
def _fake(values, row_ptr, col_idx, row_order, x, bias, relu):
    return x.new_empty((row_ptr.shape[0] - 1, x.shape[1]))


def _spmv_sell_fake(values, cols, slice_ptr, rows, m, x, bias, relu):
    # y in x's layout (csrc/cpu/spmv_sell.cpp): (K,) -> (m,), (1, K) with K > 1 -> (1, m), (K, 1) -> (m, 1).
    if x.dim() == 1:
        return x.new_empty((m,))
    if x.shape[0] == 1 and x.shape[1] != 1:
        return x.new_empty((1, m))
    return x.new_empty((m, 1))


_OPS = register_op(("spmm", "spmm_triton"), fake=_fake)
_OPS.update(register_op(("spmv_sell",), fake=_spmv_sell_fake))  # the CPU batch-1 path of spmm
_SPMM, _SELL = _OPS["spmm"], _OPS["spmv_sell"]  # the op overloads (no autograd: register_op returns them)
_F32, _F64 = torch.float32, torch.float64
_grad_enabled, _compiling = torch.is_grad_enabled, torch.compiler.is_compiling


# Checks shared with s2h_kernels.spmm_conv2d.
_NATIVE = (torch.float32, torch.float64)


def check_weight(op: str, sw) -> None:
    if not isinstance(sw, SparseWeight):
        raise ValueError(f"{op}: sparse_weight must be an s2h_kernels.SparseWeight (SparseWeight.from_dense(W)), "
                         f"got {type(sw).__name__}")


def check_no_grad(op: str, *tensors) -> None:
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(f"{op}: inference only, there is no backward; run under torch.no_grad() or "
                           "torch.inference_mode() (or train with the dense layer)")


def compute_dtype(op: str, sw: SparseWeight, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.dtype:
    """The dtype the kernel runs in: x's for float32/float64, float32 for half types."""
    check_float(op, "x", x)
    check_float(op, "sparse_weight values", sw.values)
    if bias is not None:
        check_float(op, "bias", bias)
    if x.dtype in _NATIVE:
        if sw.dtype != x.dtype:
            raise ValueError(f"{op}: sparse_weight dtype {sw.dtype} != x dtype {x.dtype} "
                             f"(use sparse_weight.to(dtype={x.dtype}))")
        return x.dtype
    return torch.float32


def check_operands(op: str, sw, x) -> None:
    check_weight(op, sw)
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{op}: x must be a tensor, got {type(x).__name__}")


def resolve(op: str, sw: SparseWeight, x: torch.Tensor, bias: Optional[torch.Tensor],
             backend: Optional[str]) -> tuple[str, torch.dtype]:
    """Checks shared by spmm and spmm_conv2d (bias shape, dtypes, one device, no autograd).

    Returns the backend and the dtype the kernel runs in."""
    m = sw.shape[0]
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (m,)):
        raise ValueError(f"{op}: bias must be a tensor of shape ({m},), got "
                         f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
    values = sw.values
    # Common case first (float32/float64 everywhere, one device): no conversions, few checks.
    if x.dtype in _NATIVE and values.dtype is x.dtype and (bias is None or bias.dtype is x.dtype):
        cdt = x.dtype
    else:
        cdt = compute_dtype(op, sw, x, bias)
    device = x.device
    if values.device != device or sw.row_ptr.device != device or (bias is not None and bias.device != device):
        check_same_device(op, values=values, row_ptr=sw.row_ptr, x=x, bias=bias)
    chosen = "cpu" if backend is None and device.type == "cpu" else resolve_backend(backend, device, op)
    check_no_grad(op, x, values, bias)
    return chosen, cdt


def spmm(sparse_weight: SparseWeight, x: torch.Tensor, bias: Optional[torch.Tensor] = None, relu: bool = False,
         backend: Optional[str] = None) -> torch.Tensor:
    """``act(W @ x + bias)`` with W packed as a :class:`SparseWeight`.

    Args:
        sparse_weight: W (M x K).
        x: dense (K, N), any strides, or a vector (K,) (then the result is (M,)).
        bias: optional (M,).
        relu: fuse a ReLU after the bias.
        backend: ``"cpu"``, ``"cuda"`` (CUDA C++) or ``"triton"``; default by device.
    Returns:
        (M, N) in x's dtype.
    """
    # Fast path: CPU tensors in the weight's dtype (float32 / float64), the default backend, no
    # autograd, not traced: the slow path's checks in their cheapest form (the packed weight's own
    # were made when it was packed: SparseWeight.__init__, sell()). Anything else, bad input
    # included, takes the slow path below, which converts or raises.
    if backend is None and isinstance(sparse_weight, SparseWeight) and isinstance(x, torch.Tensor):
        values = sparse_weight.values
        dtype = values.dtype
        m, k = sparse_weight.shape
        dim = x.dim()
        if ((dim == 2 or dim == 1) and x.dtype is dtype and (dtype is _F32 or dtype is _F64) and x.is_cpu
                and values.is_cpu and sparse_weight.row_ptr.is_cpu and sparse_weight.col_idx.is_cpu and x.shape[0] == k
                and (bias is None or (isinstance(bias, torch.Tensor) and bias.dtype is dtype and bias.is_cpu
                                      and bias.dim() == 1 and bias.shape[0] == m))
                and not (_grad_enabled() and (x.requires_grad or values.requires_grad
                                              or (bias is not None and bias.requires_grad)))
                and not _compiling()):
            if dtype is _F32 and (dim == 1 or x.shape[1] == 1):  # batch-1 Linear: SELL-16
                return _SELL(*sparse_weight.sell(), m, x, bias, bool(relu))  # (K,) -> (m,), (K, 1) -> (m, 1)
            if dim == 2:
                return _SPMM(values, sparse_weight.row_ptr, sparse_weight.col_idx, None, x, bias, bool(relu))
            return _SPMM(values, sparse_weight.row_ptr, sparse_weight.col_idx, None, x.unsqueeze(1), bias,
                         bool(relu)).squeeze(1)
    op = "spmm"
    check_operands(op, sparse_weight, x)
    vector = x.dim() == 1
    if vector:
        x = x.unsqueeze(1)
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D (K, N) or 1-D (K,), got shape {tuple(x.shape)}")
    m, k = sparse_weight.shape
    if x.shape[0] != k:
        raise ValueError(f"{op}: x has {x.shape[0]} rows but the weight has K = {k} columns "
                         f"(weight {sparse_weight.shape}, x {tuple(x.shape)})")
    chosen, cdt = resolve(op, sparse_weight, x, bias, backend)
    values = sparse_weight.values
    out_dtype = x.dtype
    if cdt is not x.dtype:
        values, x = values.to(cdt), x.to(cdt)
        bias = bias.to(cdt) if bias is not None else None
    xc, b = x, bias
    if chosen == "triton":
        y = _OPS["spmm_triton"](values, sparse_weight.row_ptr, sparse_weight.col_idx, sparse_weight.row_order,
                                      xc, b, bool(relu))
    elif chosen == "cpu" and values is sparse_weight.values and sell_applies(x.shape[1], values.dtype):
        y = _OPS["spmv_sell"](*sparse_weight.sell(), m, xc, b, bool(relu))  # batch-1 Linear: SELL-16
    else:
        y = _OPS["spmm"](values, sparse_weight.row_ptr, sparse_weight.col_idx,
                               sparse_weight.row_order if chosen == "cuda" else None, xc, b, bool(relu))
    if y.dtype is not out_dtype:
        y = y.to(out_dtype)
    return y.squeeze(1) if vector else y


def __getattr__(name: str):
    # spmm_conv2d lived in this module; s2h_kernels.spmm_conv2d (or the package) is its home now.
    if name == "spmm_conv2d":
        import warnings

        from .spmm_conv2d import spmm_conv2d

        warnings.warn("s2h_kernels.spmm.spmm_conv2d moved: import it from s2h_kernels", DeprecationWarning,
                      stacklevel=2)
        return spmm_conv2d
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
