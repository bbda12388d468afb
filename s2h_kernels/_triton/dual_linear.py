"""Triton kernel of s2h::dual_linear_triton (imported only with triton installed).

The output is tiled like a GEMM; each program loads one ``[BLOCK_N, BLOCK_K]`` tile of W per step
and feeds it to both products (the hard one only where the tile overlaps the ``k_out x k_in``
block). Semantics: s2h_kernels/dual_linear.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreted


@triton.jit
def dual_linear_kernel(
    xs_ptr, xh_ptr, w_ptr, b_ptr, ys_ptr, yh_ptr,
    M_S, M_H, N, K, K_OUT, K_IN,
    s_xs_m, s_xs_k, s_xh_m, s_xh_k, s_w_n, s_w_k, s_ys_m, s_ys_n, s_yh_m, s_yh_n,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_s = offs_m < M_S
    m_h = offs_m < M_H
    n_s = offs_n < N
    n_h = offs_n < K_OUT
    do_soft = pid_m * BLOCK_M < M_S
    do_hard = (pid_m * BLOCK_M < M_H) & (pid_n * BLOCK_N < K_OUT)
    acc_s = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    acc_h = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        # one load of the weight tile, shared by both products
        w = tl.load(w_ptr + offs_n[:, None] * s_w_n + kk[None, :] * s_w_k,
                    mask=n_s[:, None] & (kk[None, :] < K), other=0.0)
        if UPCAST:  # the interpreter's numpy dot has no bf16
            w = w.to(tl.float32)
        if do_soft:
            xs = tl.load(xs_ptr + offs_m[:, None] * s_xs_m + kk[None, :] * s_xs_k,
                         mask=m_s[:, None] & (kk[None, :] < K), other=0.0)
            if UPCAST:
                xs = xs.to(tl.float32)
            acc_s += tl.dot(xs, tl.trans(w), input_precision=PRECISION, out_dtype=ACC)
        if do_hard & (k0 < K_IN):
            xh = tl.load(xh_ptr + offs_m[:, None] * s_xh_m + kk[None, :] * s_xh_k,
                         mask=m_h[:, None] & (kk[None, :] < K_IN), other=0.0)
            if UPCAST:
                xh = xh.to(tl.float32)
            wh = tl.where(n_h[:, None] & (kk[None, :] < K_IN), w, tl.zeros_like(w))
            acc_h += tl.dot(xh, tl.trans(wh), input_precision=PRECISION, out_dtype=ACC)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_s, other=0.0).to(ACC)
        acc_s += bias[None, :]
        acc_h += bias[None, :]
    tl.store(ys_ptr + offs_m[:, None] * s_ys_m + offs_n[None, :] * s_ys_n,
             acc_s.to(ys_ptr.dtype.element_ty), mask=m_s[:, None] & n_s[None, :])
    tl.store(yh_ptr + offs_m[:, None] * s_yh_m + offs_n[None, :] * s_yh_n,
             acc_h.to(yh_ptr.dtype.element_ty), mask=m_h[:, None] & n_h[None, :])


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _precision(dtype: torch.dtype) -> str:
    # follow torch's own fp32 matmul setting, so the kernel matches F.linear's precision
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def forward(
    x_soft: torch.Tensor, x_hard: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    k_out: int, k_in: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = weight.shape
    m_s, m_h = x_soft.shape[0], x_hard.shape[0]
    ys = x_soft.new_empty(m_s, n)
    yh = x_hard.new_empty(m_h, k_out)
    if ys.numel() == 0 and yh.numel() == 0:
        return ys, yh
    block_m = 32 if max(m_s, m_h) <= 32 else 64
    block_n, block_k = 64, 32
    grid = (triton.cdiv(max(m_s, m_h, 1), block_m), triton.cdiv(n, block_n))
    dual_linear_kernel[grid](
        x_soft, x_hard, weight, bias if bias is not None else weight, ys, yh,
        m_s, m_h, n, k, k_out, k_in,
        x_soft.stride(0), x_soft.stride(1), x_hard.stride(0), x_hard.stride(1),
        weight.stride(0), weight.stride(1), ys.stride(0), ys.stride(1), yh.stride(0), yh.stride(1),
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        ACC=_acc(x_soft.dtype), PRECISION=_precision(x_soft.dtype),
        UPCAST=x_soft.dtype == torch.bfloat16 and triton_interpreted(),
    )
    return ys, yh
