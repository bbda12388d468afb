"""Triton kernels of s2h::channel_masks_triton and its backward (imported only with triton installed).

One program per group, a loop over BLOCK-bucket chunks (any group size). Math and conventions:
s2h_kernels/channel_masks.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreted
from ..reference.channel_masks import TIE_RTOL


@triton.jit
def group_softmax_stats(u_ptr, start, n, inv_tau, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """max and sum of exp over the group's scaled logits (two passes, any length)."""
    offs = tl.arange(0, BLOCK)
    mx = tl.full([BLOCK], float("-inf"), ACC)
    for c in range(0, n, BLOCK):
        x = tl.load(u_ptr + start + c + offs, mask=c + offs < n, other=float("-inf")).to(ACC) * inv_tau
        mx = tl.maximum(mx, x)
    m = tl.max(mx, axis=0)
    acc = tl.zeros([BLOCK], ACC)
    for c in range(0, n, BLOCK):
        x = tl.load(u_ptr + start + c + offs, mask=c + offs < n, other=float("-inf")).to(ACC) * inv_tau
        acc += tl.where(c + offs < n, tl.exp(x - m), 0.0)
    return m, tl.sum(acc, axis=0)


@triton.jit
def channel_masks_fwd_kernel(
    u_ptr, offsets_ptr, divisors_ptr, chan_starts_ptr, w_ptr, expected_ptr, keep_ptr,
    inv_tau, HARD_MODE: tl.constexpr, TIE: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    g = tl.program_id(0)
    start = tl.load(offsets_ptr + g)
    n = tl.load(offsets_ptr + g + 1) - start
    d = tl.load(divisors_ptr + g)
    c0 = tl.load(chan_starts_ptr + g)
    m, s = group_softmax_stats(u_ptr, start, n, inv_tau, BLOCK, ACC)
    offs = tl.arange(0, BLOCK)
    n_chunks = tl.cdiv(n, BLOCK)
    # Pass 1: sum_j w_j, walking chunks from the last (reverse cumsum carries backwards).
    carry = tl.zeros([], ACC)
    sum_w = tl.zeros([], ACC)
    for i in range(0, n_chunks):
        c = (n_chunks - 1 - i) * BLOCK
        valid = c + offs < n
        x = tl.load(u_ptr + start + c + offs, mask=valid, other=float("-inf")).to(ACC) * inv_tau
        p = tl.where(valid, tl.exp(x - m) / s, 0.0)
        w = tl.cumsum(p, axis=0, reverse=True) + carry
        sum_w += tl.sum(tl.where(valid, w, 0.0), axis=0)
        carry += tl.sum(p, axis=0)
    mean_w = sum_w / n
    # Pass 2: the same scan again (bit-identical), writing channels and counting kept buckets.
    carry = tl.zeros([], ACC)
    above = tl.zeros([], tl.int64)
    for i in range(0, n_chunks):
        c = (n_chunks - 1 - i) * BLOCK
        valid = c + offs < n
        x = tl.load(u_ptr + start + c + offs, mask=valid, other=float("-inf")).to(ACC) * inv_tau
        p = tl.where(valid, tl.exp(x - m) / s, 0.0)
        w = tl.cumsum(p, axis=0, reverse=True) + carry
        carry += tl.sum(p, axis=0)
        above += tl.sum((valid & (w >= mean_w * (1.0 - TIE))).to(tl.int64), axis=0)
        for r in range(0, d):
            tl.store(w_ptr + c0 + (c + offs) * d + r, w.to(w_ptr.dtype.element_ty), mask=valid)
    tl.store(expected_ptr + g, (sum_w * d).to(expected_ptr.dtype.element_ty))
    if HARD_MODE == 0:
        k = above
    else:
        # ceil(sum_w - TIE); NaN -> 1 bucket, +inf -> all buckets (clamped below).
        k = tl.where(sum_w == sum_w, tl.minimum(tl.ceil(sum_w - TIE), n.to(ACC)), 1.0).to(tl.int64)
    k = tl.minimum(tl.maximum(k, 1), n)
    tl.store(keep_ptr + g, k * d)


@triton.jit
def bucket_grad_chunk(grad_w_ptr, u_ptr, start, c0, c, n, d, ge, m, s, inv_tau, carry,
                       BLOCK: tl.constexpr, ACC: tl.constexpr):
    """One chunk of the backward scan: p, gp = carry + cumsum of bucket gradients, and the chunk's sum."""
    offs = tl.arange(0, BLOCK)
    valid = c + offs < n
    gb = tl.zeros([BLOCK], ACC)
    for r in range(0, d):
        gb += tl.load(grad_w_ptr + c0 + (c + offs) * d + r, mask=valid, other=0.0).to(ACC)
    gb = tl.where(valid, gb + d * ge, 0.0)
    gp = tl.cumsum(gb, axis=0) + carry
    x = tl.load(u_ptr + start + c + offs, mask=valid, other=float("-inf")).to(ACC) * inv_tau
    p = tl.where(valid, tl.exp(x - m) / s, 0.0)
    return p, gp, tl.sum(gb, axis=0)


@triton.jit
def channel_masks_bwd_kernel(
    grad_w_ptr, grad_expected_ptr, u_ptr, offsets_ptr, divisors_ptr, chan_starts_ptr, grad_u_ptr,
    inv_tau, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    g = tl.program_id(0)
    start = tl.load(offsets_ptr + g)
    n = tl.load(offsets_ptr + g + 1) - start
    d = tl.load(divisors_ptr + g)
    c0 = tl.load(chan_starts_ptr + g)
    ge = tl.load(grad_expected_ptr + g).to(ACC)
    m, s = group_softmax_stats(u_ptr, start, n, inv_tau, BLOCK, ACC)
    offs = tl.arange(0, BLOCK)
    # Pass 1: dot = sum_k p_k gp_k with gp = cumsum of bucket gradients (carried forwards).
    carry = tl.zeros([], ACC)
    dot = tl.zeros([], ACC)
    for c in range(0, n, BLOCK):
        p, gp, chunk_sum = bucket_grad_chunk(grad_w_ptr, u_ptr, start, c0, c, n, d, ge, m, s, inv_tau, carry,
                                              BLOCK, ACC)
        carry += chunk_sum
        dot += tl.sum(p * gp, axis=0)
    # Pass 2: du = p (gp - dot) / tau.
    carry = tl.zeros([], ACC)
    for c in range(0, n, BLOCK):
        valid = c + offs < n
        p, gp, chunk_sum = bucket_grad_chunk(grad_w_ptr, u_ptr, start, c0, c, n, d, ge, m, s, inv_tau, carry,
                                              BLOCK, ACC)
        carry += chunk_sum
        tl.store(grad_u_ptr + start + c + offs, (p * (gp - dot) * inv_tau).to(grad_u_ptr.dtype.element_ty), mask=valid)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


# Under the interpreter: small chunks (fast, and the tests' groups of a few hundred buckets take
# the multi-chunk path).
INTERPRETED_CONFIG = dict(BLOCK=128, num_warps=4)


def launch_config(dtype: torch.dtype, interpreted: bool | None = None) -> dict:
    """Chunk size and warps of both kernels (one program per group, any group size).

    On the GPU: 1024-bucket chunks (the common group, <= 1024 buckets, in one chunk) on 16 warps,
    2 buckets per thread: 40 registers in fp32, 64 in fp64, i.e. 75% / 50% theoretical occupancy
    on H100 (4 warps, the old choice, needed 128: 25%). The group sizes are on the device, so the
    launcher cannot pick per shape without a sync; the loop handles any larger group.
    """
    if interpreted if interpreted is not None else triton_interpreted():
        return dict(INTERPRETED_CONFIG)
    return dict(BLOCK=1024, num_warps=16)


def _chan_starts(offsets: torch.Tensor, divisors: torch.Tensor) -> torch.Tensor:
    counts = (offsets[1:] - offsets[:-1]) * divisors
    return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])


def forward(
    u: torch.Tensor, offsets: torch.Tensor, divisors: torch.Tensor, temperature: float, hard_mode: int,
    num_channels: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u = u.contiguous()
    groups = offsets.numel() - 1
    w = u.new_empty(num_channels)
    expected = u.new_empty(groups)
    keep = torch.empty(groups, dtype=torch.int64, device=u.device)
    channel_masks_fwd_kernel[(groups,)](
        u, offsets, divisors, _chan_starts(offsets, divisors), w, expected, keep,
        1.0 / temperature, HARD_MODE=hard_mode, TIE=TIE_RTOL, ACC=_acc(u.dtype), **launch_config(u.dtype),
    )
    return w, expected, keep


def backward(
    grad_w: torch.Tensor, grad_expected: torch.Tensor, u: torch.Tensor, offsets: torch.Tensor,
    divisors: torch.Tensor, temperature: float,
) -> torch.Tensor:
    u = u.contiguous()
    grad_u = torch.empty_like(u)
    channel_masks_bwd_kernel[(offsets.numel() - 1,)](
        grad_w.contiguous(), grad_expected.contiguous(), u, offsets, divisors, _chan_starts(offsets, divisors),
        grad_u, 1.0 / temperature, ACC=_acc(u.dtype), **launch_config(u.dtype),
    )
    return grad_u
