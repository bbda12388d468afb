"""Paired linear forward: the soft and the hard branch of one S2H linear layer, weight read once.

``y_soft = x_soft @ W.T + b`` (full width) and ``y_hard = x_hard @ W[:k_out, :k_in].T + b[:k_out]``
(the hard network's prefix slice). The Triton kernel (s2h_kernels/_triton/dual_linear.py) tiles
the output like a GEMM; each program loads one ``[BLOCK_N, BLOCK_K]`` tile of W per step and feeds
it to both products (the hard one only where the tile overlaps the ``k_out x k_in`` block), so W
crosses the memory bus once for both branches instead of twice.

Backends: ``"triton"`` (default for CUDA tensors; runs CPU tensors under ``TRITON_INTERPRET=1``)
and ``"cpu"``: two ``F.linear`` calls (ATen's GEMM), the same computation as the reference. There
is no C++ kernel for this op, CPU or CUDA. The backward (registered by
s2h_kernels/_registration.py) is plain torch matmuls: three GEMMs per branch, the weight gradient
of the hard branch added into the top-left block.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _triton
from ._backend import check_float, check_same_device, resolve_backend
from ._registration import define_triton_op, register_op

__all__ = ["dual_linear"]


def _triton_forward(x_soft, x_hard, weight, bias, k_out, k_in):
    return _triton.load("dual_linear", "s2h::dual_linear_triton").forward(x_soft, x_hard, weight, bias, k_out, k_in)


define_triton_op("dual_linear_triton", "(Tensor x_soft, Tensor x_hard, Tensor weight, Tensor? bias, SymInt k_out, "
                 "SymInt k_in) -> (Tensor, Tensor)", _triton_forward)


def _fake(x_soft, x_hard, weight, bias, k_out, k_in):
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


_OPS = register_op(("dual_linear_triton",), fake=_fake, setup_context=_setup_context, backward=_backward)


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
    ys, yh = _OPS["dual_linear_triton"](xs2, xh2, weight, bias, k_out, k_in)
    return ys.reshape(*x_soft.shape[:-1], n), yh.reshape(*x_hard.shape[:-1], k_out)
