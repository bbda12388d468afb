"""Paired linear forward: the soft and the hard branch of one S2H linear layer, weight read once.

``y_soft = x_soft @ W.T + b`` (full width) and ``y_hard = x_hard @ W[:k_out, :k_in].T + b[:k_out]``
(the hard network's prefix slice). The Triton kernel tiles the output like a GEMM; each program
loads one ``[BLOCK_N, BLOCK_K]`` tile of W per step and feeds it to both products (the hard one
only where the tile overlaps the ``k_out x k_in`` block), so W crosses the memory bus once for
both branches instead of twice.

Backends: ``"triton"`` (default for CUDA tensors; runs CPU tensors under ``TRITON_INTERPRET=1``)
and ``"cpu"`` — two ``F.linear`` calls (ATen's GEMM); there is no CUDA C++ kernel for this op.
The backward (``torch.library.register_autograd``) is eager: three GEMMs per branch, the weight
gradient of the hard branch added into the top-left block.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._backend import check_float, check_same_device, resolve_backend, triton_interpreted

__all__ = ["dual_linear"]


@triton.jit
def _dual_linear_kernel(
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


@torch.library.custom_op("s2h::dual_linear_triton", mutates_args=())
def _dual_linear_triton(
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
    _dual_linear_kernel[grid](
        x_soft, x_hard, weight, bias if bias is not None else weight, ys, yh,
        m_s, m_h, n, k, k_out, k_in,
        x_soft.stride(0), x_soft.stride(1), x_hard.stride(0), x_hard.stride(1),
        weight.stride(0), weight.stride(1), ys.stride(0), ys.stride(1), yh.stride(0), yh.stride(1),
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        ACC=_acc(x_soft.dtype), PRECISION=_precision(x_soft.dtype),
        UPCAST=x_soft.dtype == torch.bfloat16 and triton_interpreted(),
    )
    return ys, yh


@torch.library.register_fake("s2h::dual_linear_triton")
def _dual_linear_fake(x_soft, x_hard, weight, bias, k_out, k_in):
    return x_soft.new_empty(x_soft.shape[0], weight.shape[0]), x_hard.new_empty(x_hard.shape[0], k_out)


def _setup_context(ctx, inputs, output):
    x_soft, x_hard, weight, bias, k_out, k_in = inputs
    ctx.save_for_backward(x_soft, x_hard, weight)
    ctx.has_bias = bias is not None
    ctx.k_out, ctx.k_in = k_out, k_in


def _backward(ctx, grad_ys, grad_yh):
    x_soft, x_hard, weight = ctx.saved_tensors
    ko, ki = ctx.k_out, ctx.k_in
    w_h = weight[:ko, :ki]
    gxs = gxh = gw = gb = None
    if grad_ys is None:
        grad_ys = x_soft.new_zeros(x_soft.shape[0], weight.shape[0])
    if grad_yh is None:
        grad_yh = x_hard.new_zeros(x_hard.shape[0], ko)
    if ctx.needs_input_grad[0]:
        gxs = grad_ys @ weight
    if ctx.needs_input_grad[1]:
        gxh = grad_yh @ w_h
    if ctx.needs_input_grad[2]:
        gw = grad_ys.t() @ x_soft
        gw[:ko, :ki] += grad_yh.t() @ x_hard
    if ctx.has_bias and ctx.needs_input_grad[3]:
        gb = grad_ys.sum(0)
        gb[:ko] += grad_yh.sum(0)
    return gxs, gxh, gw, gb, None, None


torch.library.register_autograd("s2h::dual_linear_triton", _backward, setup_context=_setup_context)


def dual_linear(
    x_soft: torch.Tensor,
    x_hard: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    k_out: int | None = None,
    k_in: int | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_soft @ W.T + b, x_hard @ W[:k_out, :k_in].T + b[:k_out])`` with W read once.

    Args:
        x_soft: ``[..., K]``; x_hard: ``[..., k_in]`` (any leading shape, each its own).
        weight: ``[N, K]``; bias: ``[N]`` or None.
        k_out, k_in: the hard branch's kept output/input features (default N, K).
        backend: ``"triton"`` (default on CUDA), ``"cpu"`` (two ``F.linear`` calls, default on the CPU).
    """
    op = "dual_linear"
    for name, t in (("x_soft", x_soft), ("x_hard", x_hard), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
        check_float(op, name, t)
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    k_out = n if k_out is None else int(k_out)
    k_in = k if k_in is None else int(k_in)
    if not (1 <= k_out <= n):
        raise ValueError(f"{op}: k_out must be in [1, {n}], got {k_out}")
    if not (1 <= k_in <= k):
        raise ValueError(f"{op}: k_in must be in [1, {k}], got {k_in}")
    if x_soft.dim() < 1 or x_soft.shape[-1] != k:
        raise ValueError(f"{op}: x_soft must have {k} features in its last dimension, got shape {tuple(x_soft.shape)}")
    if x_hard.dim() < 1 or x_hard.shape[-1] != k_in:
        raise ValueError(f"{op}: x_hard must have k_in={k_in} features in its last dimension, "
                         f"got shape {tuple(x_hard.shape)}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (n,):
            raise ValueError(f"{op}: bias must be a tensor of shape ({n},), got "
                             f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
    dtypes = {x_soft.dtype, x_hard.dtype, weight.dtype} | ({bias.dtype} if bias is not None else set())
    if len(dtypes) > 1:
        raise ValueError(f"{op}: x_soft, x_hard, weight and bias must share one dtype, got {sorted(map(str, dtypes))}")
    device = check_same_device(op, x_soft=x_soft, x_hard=x_hard, weight=weight, bias=bias)
    if backend == "cuda":
        raise ValueError(f"{op}: there is no CUDA C++ kernel for this op; use backend='triton' (the default on CUDA)")
    chosen = resolve_backend(backend, device, op)
    if chosen == "cpu":
        b_h = bias[:k_out] if bias is not None else None
        return F.linear(x_soft, weight, bias), F.linear(x_hard, weight[:k_out, :k_in], b_h)
    xs2 = x_soft.reshape(-1, k)
    xh2 = x_hard.reshape(-1, k_in)
    ys, yh = torch.ops.s2h.dual_linear_triton(xs2, xh2, weight, bias, k_out, k_in)
    return ys.reshape(*x_soft.shape[:-1], n), yh.reshape(*x_hard.shape[:-1], k_out)
