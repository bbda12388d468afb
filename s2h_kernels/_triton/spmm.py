"""Triton kernel of s2h::spmm_triton (imported only with triton installed): one program per (row,
BLOCK_N columns); rows scheduled longest first (``row_order``). Semantics: s2h_kernels/spmm.py.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreted


@triton.jit
def spmm_kernel(
    vals_ptr, row_ptr_ptr, col_ptr, order_ptr, x_ptr, bias_ptr, y_ptr, N, ldx, ldy,
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    row = tl.load(order_ptr + tl.program_id(0)).to(tl.int64)
    start = tl.load(row_ptr_ptr + row)
    end = tl.load(row_ptr_ptr + row + 1)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N], ACC)
    for j in range(start, end, BLOCK_K):
        mask_k = j + ks < end
        cols = tl.load(col_ptr + j + ks, mask=mask_k, other=0).to(tl.int64)
        w = tl.load(vals_ptr + j + ks, mask=mask_k, other=0.0).to(ACC)
        xt = tl.load(x_ptr + cols[:, None] * ldx + offs_n[None, :], mask=mask_k[:, None] & mask_n[None, :],
                     other=0.0).to(ACC)
        acc += tl.sum(w[:, None] * xt, axis=0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + row).to(ACC)
    if RELU:
        acc = tl.maximum(acc, 0.0)
    tl.store(y_ptr + row * ldy + offs_n, acc.to(y_ptr.dtype.element_ty), mask=mask_n)


def launch_config(n: int, dtype: torch.dtype, interpreted: bool | None = None) -> dict:
    """Block sizes for N dense columns: BLOCK_N = next power of two of N in [16, 128]; BLOCK_K
    nonzeros per step, 16 (fp32) or 8 (fp64) at BLOCK_N = 128 (a [32, 128] step took 144 registers,
    19-38% occupancy; [16, 128] takes 38 in fp32, [8, 128] 40 in fp64: >= 50%), else 32. Small
    blocks under the interpreter.

    No autotuning: the best BLOCK_K also depends on the nonzeros per row, which is not a shape the
    autotuner's key can see; BLOCK_N follows N.
    """
    if interpreted if interpreted is not None else triton_interpreted():
        return dict(BLOCK_N=32, BLOCK_K=16, num_warps=4)
    block_n = max(16, min(128, triton.next_power_of_2(n)))
    block_k = (8 if dtype == torch.float64 else 16) if block_n >= 128 else 32
    return dict(BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)


def spmm(values: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor, row_order: torch.Tensor,
                 x: torch.Tensor, bias: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
    m, n = row_ptr.shape[0] - 1, x.shape[1]
    if x.stride(1) != 1:
        x = x.contiguous()
    y = x.new_empty((m, n))
    if m == 0 or n == 0:
        return y
    cfg = launch_config(n, x.dtype)
    acc = tl.float64 if x.dtype == torch.float64 else tl.float32
    grid = (m, triton.cdiv(n, cfg["BLOCK_N"]))
    spmm_kernel[grid](
        values, row_ptr, col_idx, row_order, x, bias if bias is not None else values, y, n, x.stride(0), n,
        HAS_BIAS=bias is not None, RELU=relu, ACC=acc, **cfg,
    )
    return y
