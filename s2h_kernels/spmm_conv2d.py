"""Direct sparse conv2d for pruned models (docs/DESIGN.md §4): ``act(conv2d(x, W) + bias)`` with W
packed as a :class:`SparseWeight` (the (M, C/groups*kh*kw) matrix in ``F.unfold`` column order).

Backends: the CPU C++ kernel (csrc/cpu/spmm_conv2d.cpp) never builds im2col: the input is copied
once into a zero-padded, stride-phase split buffer and every nonzero becomes an offset into it
(csrc/common/spmm.h); it shares the spmm micro-kernels.  CUDA tensors run ``F.unfold`` +
:func:`s2h_kernels.spmm` (Triton or CUDA C++); there is no conv kernel of its own on the GPU.
Inference only, dtypes as in :func:`s2h_kernels.spmm`.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._registration import register_op
from .sparse_format import SparseWeight
from .spmm import check_operands, resolve, spmm

__all__ = ["spmm_conv2d"]


def _conv_out(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _fake(values, row_ptr, col_idx, x, bias, kernel_size, stride, padding, dilation, groups, relu):
    ho = _conv_out(x.shape[2], kernel_size[0], stride[0], padding[0], dilation[0])
    wo = _conv_out(x.shape[3], kernel_size[1], stride[1], padding[1], dilation[1])
    return x.new_empty((x.shape[0], row_ptr.shape[0] - 1, ho, wo))


_OPS = register_op(("spmm_conv2d",), fake=_fake)  # C++ only; no autograd (inference only)


def _pair(name: str, v) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(a) for a in v)
    if len(v) != 2:
        raise ValueError(f"spmm_conv2d: {name} must be an int or a pair, got {v}")
    return v


def _grouped_full_weight(sw: SparseWeight, groups: int, kcols: int) -> SparseWeight:
    """The block-diagonal (M, groups*kcols) CSR of a grouped conv weight (for unfold + spmm)."""
    if groups == 1:
        return sw
    m = sw.shape[0]
    counts = (sw.row_ptr[1:] - sw.row_ptr[:-1]).long()
    group_of_row = torch.arange(m, device=sw.device) // (m // groups)
    shift = torch.repeat_interleave(group_of_row * kcols, counts)
    return SparseWeight(sw.values, sw.row_ptr, (sw.col_idx.long() + shift).to(torch.int32), (m, groups * kcols),
                        sw.row_order)


def spmm_conv2d(sparse_weight: SparseWeight, x: torch.Tensor, kernel_size, bias: Optional[torch.Tensor] = None,
                stride=1, padding=0, dilation=1, groups: int = 1, relu: bool = False,
                backend: Optional[str] = None) -> torch.Tensor:
    """``act(conv2d(x, W) + bias)`` with W (M, C/groups*kh*kw) packed in ``F.unfold`` column order.

    Same semantics as ``F.conv2d`` for integer or pair ``stride`` / ``padding`` / ``dilation``
    (zero padding) and ``groups``.  x is (B, C, H, W) or (C, H, W).
    """
    op = "spmm_conv2d"
    check_operands(op, sparse_weight, x)
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be 4-D (B, C, H, W) or 3-D (C, H, W), got shape {tuple(x.shape)}")
    kh, kw = _pair("kernel_size", kernel_size)
    sh, sw_ = _pair("stride", stride)
    ph, pw = _pair("padding", padding)
    dh, dw = _pair("dilation", dilation)
    if min(kh, kw, sh, sw_, dh, dw) < 1 or min(ph, pw) < 0:
        raise ValueError(f"{op}: kernel_size, stride, dilation must be >= 1 and padding >= 0")
    m, k = sparse_weight.shape
    c = x.shape[1]
    if groups < 1 or c % groups or m % groups:
        raise ValueError(f"{op}: groups={groups} must divide the input channels ({c}) and output channels ({m})")
    if k != (c // groups) * kh * kw:
        raise ValueError(f"{op}: weight has K = {k} columns, expected C/groups*kh*kw = {c // groups}*{kh}*{kw} "
                         f"for x {tuple(x.shape)}")
    ho, wo = _conv_out(x.shape[2], kh, sh, ph, dh), _conv_out(x.shape[3], kw, sw_, pw, dw)
    if ho < 1 or wo < 1:
        raise ValueError(f"{op}: input {tuple(x.shape)} is smaller than the (dilated) kernel")
    chosen, cdt = resolve(op, sparse_weight, x, bias, backend)
    values = sparse_weight.values
    out_dtype = x.dtype
    xc = x if cdt is x.dtype else x.to(cdt)
    b = bias if bias is None or cdt is bias.dtype else bias.to(cdt)
    if chosen == "cpu":
        y = _OPS["spmm_conv2d"](values if cdt is values.dtype else values.to(cdt), sparse_weight.row_ptr,
                                      sparse_weight.col_idx, xc, b, (kh, kw), (sh, sw_), (ph, pw), (dh, dw),
                                      int(groups), bool(relu))
    else:
        # GPU: unfold + spmm over the (M, C*kh*kw) block-diagonal weight, all images as columns.
        full = _grouped_full_weight(sparse_weight.to(dtype=cdt), groups, k)
        cols = torch.nn.functional.unfold(xc, (kh, kw), dilation=(dh, dw), padding=(ph, pw), stride=(sh, sw_))
        bsz, kk, length = cols.shape
        cols = cols.permute(1, 0, 2).reshape(kk, bsz * length)
        y = spmm(full, cols, b, relu, backend=chosen)
        y = y.reshape(m, bsz, ho, wo).permute(1, 0, 2, 3).contiguous()
    if y.dtype is not out_dtype:
        y = y.to(out_dtype)
    return y.squeeze(0) if unbatched else y
