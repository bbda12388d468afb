"""Channel masks for every dependency group in one launch (DESIGN §2).

Per group g with buckets u_g (``divisors[g]`` channels each) and temperature tau:
``p = softmax(u_g / tau)``, ``w_j = sum_{k>=j} p_k`` (reverse cumsum: the probability that bucket
j is kept), the soft mask repeats each w_j over its channels, ``E = d * sum_j w_j`` is the
expected width in channels, and ``keep`` is the hard prefix length in channels.

Backends: C++ on the CPU (csrc/cpu/channel_masks.cpp), CUDA C++ (csrc/cuda/channel_masks.cu),
and the Triton kernels below (the default for CUDA tensors). All compute in fp32 (fp64 for fp64
input) and return w and E in u's dtype.

NaN: a NaN in group g's u makes that group's w and E NaN and its keep count one bucket (the
minimum); other groups are unaffected. Nothing is silently zeroed.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch
import triton
import triton.language as tl

from ._autograd import register_lean_autograd
from ._backend import check_float, check_same_device, resolve_backend

HARD_MODES = {"threshold": 0, "expected": 1}
TIE_RTOL = 1e-5  # csrc/common/channel_masks.h: kMaskTieRtol


# ----------------------------------------------------------------------------------------------
# Triton kernels: one program per group, a loop over BLOCK-bucket chunks (any group size).
# ----------------------------------------------------------------------------------------------


@triton.jit
def _group_softmax_stats(u_ptr, start, n, inv_tau, BLOCK: tl.constexpr, ACC: tl.constexpr):
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
def _channel_masks_fwd_kernel(
    u_ptr, offsets_ptr, divisors_ptr, chan_starts_ptr, w_ptr, expected_ptr, keep_ptr,
    inv_tau, HARD_MODE: tl.constexpr, TIE: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    g = tl.program_id(0)
    start = tl.load(offsets_ptr + g)
    n = tl.load(offsets_ptr + g + 1) - start
    d = tl.load(divisors_ptr + g)
    c0 = tl.load(chan_starts_ptr + g)
    m, s = _group_softmax_stats(u_ptr, start, n, inv_tau, BLOCK, ACC)
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
def _bucket_grad_chunk(grad_w_ptr, u_ptr, start, c0, c, n, d, ge, m, s, inv_tau, carry,
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
def _channel_masks_bwd_kernel(
    grad_w_ptr, grad_expected_ptr, u_ptr, offsets_ptr, divisors_ptr, chan_starts_ptr, grad_u_ptr,
    inv_tau, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    g = tl.program_id(0)
    start = tl.load(offsets_ptr + g)
    n = tl.load(offsets_ptr + g + 1) - start
    d = tl.load(divisors_ptr + g)
    c0 = tl.load(chan_starts_ptr + g)
    ge = tl.load(grad_expected_ptr + g).to(ACC)
    m, s = _group_softmax_stats(u_ptr, start, n, inv_tau, BLOCK, ACC)
    offs = tl.arange(0, BLOCK)
    # Pass 1: dot = sum_k p_k gp_k with gp = cumsum of bucket gradients (carried forwards).
    carry = tl.zeros([], ACC)
    dot = tl.zeros([], ACC)
    for c in range(0, n, BLOCK):
        p, gp, chunk_sum = _bucket_grad_chunk(grad_w_ptr, u_ptr, start, c0, c, n, d, ge, m, s, inv_tau, carry,
                                              BLOCK, ACC)
        carry += chunk_sum
        dot += tl.sum(p * gp, axis=0)
    # Pass 2: du = p (gp - dot) / tau.
    carry = tl.zeros([], ACC)
    for c in range(0, n, BLOCK):
        valid = c + offs < n
        p, gp, chunk_sum = _bucket_grad_chunk(grad_w_ptr, u_ptr, start, c0, c, n, d, ge, m, s, inv_tau, carry,
                                              BLOCK, ACC)
        carry += chunk_sum
        tl.store(grad_u_ptr + start + c + offs, (p * (gp - dot) * inv_tau).to(grad_u_ptr.dtype.element_ty), mask=valid)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _block(u: torch.Tensor, offsets: torch.Tensor) -> int:
    # Chunk size: enough for the common group (<= 2048 buckets) in one chunk, small under the
    # interpreter. The loop handles any larger group.
    return 128 if u.device.type == "cpu" else 1024


def _chan_starts(offsets: torch.Tensor, divisors: torch.Tensor) -> torch.Tensor:
    counts = (offsets[1:] - offsets[:-1]) * divisors
    return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])


@torch.library.custom_op("s2h::channel_masks_triton", mutates_args=())
def _channel_masks_triton(
    u: torch.Tensor, offsets: torch.Tensor, divisors: torch.Tensor, temperature: float, hard_mode: int,
    num_channels: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u = u.contiguous()
    groups = offsets.numel() - 1
    w = u.new_empty(num_channels)
    expected = u.new_empty(groups)
    keep = torch.empty(groups, dtype=torch.int64, device=u.device)
    _channel_masks_fwd_kernel[(groups,)](
        u, offsets, divisors, _chan_starts(offsets, divisors), w, expected, keep,
        1.0 / temperature, HARD_MODE=hard_mode, TIE=TIE_RTOL, BLOCK=_block(u, offsets), ACC=_acc(u.dtype),
    )
    return w, expected, keep


@torch.library.custom_op("s2h::channel_masks_triton_backward", mutates_args=())
def _channel_masks_triton_backward(
    grad_w: torch.Tensor, grad_expected: torch.Tensor, u: torch.Tensor, offsets: torch.Tensor,
    divisors: torch.Tensor, temperature: float,
) -> torch.Tensor:
    u = u.contiguous()
    grad_u = torch.empty_like(u)
    _channel_masks_bwd_kernel[(offsets.numel() - 1,)](
        grad_w.contiguous(), grad_expected.contiguous(), u, offsets, divisors, _chan_starts(offsets, divisors),
        grad_u, 1.0 / temperature, BLOCK=_block(u, offsets), ACC=_acc(u.dtype),
    )
    return grad_u


# ----------------------------------------------------------------------------------------------
# Fake kernels and autograd, shared by the C++ op (s2h::channel_masks) and the Triton op.
# ----------------------------------------------------------------------------------------------


def _fake_forward(u, offsets, divisors, temperature, hard_mode, num_channels):
    groups = offsets.shape[0] - 1
    return u.new_empty(num_channels), u.new_empty(groups), u.new_empty(groups, dtype=torch.int64)


def _fake_backward(grad_w, grad_expected, u, offsets, divisors, temperature):
    return torch.empty_like(u)


def _setup_context(ctx, inputs, output):
    u, offsets, divisors, temperature, _, num_channels = inputs
    ctx.save_for_backward(u, offsets, divisors)
    ctx.temperature = temperature
    ctx.num_channels = num_channels
    ctx.set_materialize_grads(False)


def _make_backward(backward_op):
    def backward(ctx, grad_w, grad_expected, grad_keep):
        u, offsets, divisors = ctx.saved_tensors
        if grad_w is None:
            grad_w = u.new_zeros(ctx.num_channels)
        if grad_expected is None:
            grad_expected = u.new_zeros(offsets.shape[0] - 1)
        grad_u = backward_op(grad_w, grad_expected, u, offsets, divisors, ctx.temperature)
        return grad_u, None, None, None, None, None

    return backward


# The Triton op: torch.library's generic autograd wrapper.
torch.library.register_fake("s2h::channel_masks_triton")(_fake_forward)
torch.library.register_autograd(
    "s2h::channel_masks_triton", _make_backward(_channel_masks_triton_backward), setup_context=_setup_context
)


def _save(ctx, inputs, output):
    _setup_context(ctx, inputs, output)
    ctx.mark_non_differentiable(output[2])


# The C++ op: lean autograd (s2h_kernels/_autograd.py). It runs once per training step, and at
# ResNet-50 size its C++ forward and backward take ~40 us together: register_autograd's generic
# wrapper added ~45 us.
_channel_masks_cpp = register_lean_autograd(
    "channel_masks", _save, _make_backward(torch.ops.s2h.channel_masks_backward.default)
)
torch.library.register_fake("s2h::channel_masks")(_fake_forward)
torch.library.register_fake("s2h::channel_masks_backward")(_fake_backward)
torch.library.register_fake("s2h::channel_masks_triton_backward")(_fake_backward)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def _as_index_tensor(name: str, value, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.dtype != torch.int64:
            raise ValueError(f"channel_masks: {name} must be int64, got {value.dtype}")
        if value.dim() != 1:
            raise ValueError(f"channel_masks: {name} must be 1-D, got shape {tuple(value.shape)}")
        return value
    return torch.tensor([int(v) for v in value], dtype=torch.int64, device=device)


def _check_layout(u: torch.Tensor, offsets: torch.Tensor, divisors: torch.Tensor) -> int:
    """Validates group boundaries (reads offsets: a host sync for CUDA tensors) -> num_channels."""
    off = offsets.tolist()
    div = divisors.tolist()
    if len(off) < 2:
        raise ValueError(f"channel_masks: offsets needs at least 2 entries (one group), got {len(off)}")
    if len(div) != len(off) - 1:
        raise ValueError(f"channel_masks: divisors has {len(div)} entries for {len(off) - 1} groups")
    if off[0] != 0 or off[-1] != u.shape[0]:
        raise ValueError(
            f"channel_masks: offsets must start at 0 and end at u's length {u.shape[0]}, got {off[0]}..{off[-1]}"
        )
    for g in range(len(div)):
        if off[g + 1] <= off[g]:
            raise ValueError(f"channel_masks: group {g} is empty (offsets[{g}]={off[g]}, offsets[{g + 1}]={off[g + 1]})")
        if div[g] < 1:
            raise ValueError(f"channel_masks: divisors[{g}] must be >= 1, got {div[g]}")
    return sum((off[g + 1] - off[g]) * div[g] for g in range(len(div)))


def channel_masks(
    u: torch.Tensor,
    offsets: torch.Tensor | Sequence[int],
    temperature: float = 1.0,
    divisors: torch.Tensor | Sequence[int] | None = None,
    hard_width: str = "threshold",
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Soft masks, expected widths and hard keep counts of all groups, in one launch.

    Args:
        u: 1-D float tensor, every group's bucket logits packed in group order.
        offsets: int64, length G + 1: the start of each group in ``u``, then ``len(u)``.
        temperature: softmax temperature tau > 0.
        divisors: int64, length G: channels per bucket (default all 1).
        hard_width: ``"threshold"`` (paper: keep buckets with w >= mean(w); ties within a
            relative 1e-5 count as kept) or ``"expected"`` (ceil(E), rounded up to the divisor).
        backend: ``"cpu"``, ``"cuda"`` (CUDA C++) or ``"triton"``; default by device.

    Returns:
        ``w`` (per channel, packed in group order, u's dtype, differentiable), ``expected``
        (per group, in channels, differentiable) and ``keep`` (per group, int64, in channels;
        at least one bucket, at most the whole group).
    """
    if not isinstance(u, torch.Tensor):
        raise ValueError(f"channel_masks: u must be a tensor, got {type(u).__name__}")
    check_float("channel_masks", "u", u)
    if u.dim() != 1:
        raise ValueError(f"channel_masks: u must be 1-D (all groups packed), got shape {tuple(u.shape)}")
    if hard_width not in HARD_MODES:
        raise ValueError(f"channel_masks: hard_width must be one of {tuple(HARD_MODES)}, got {hard_width!r}")
    if not temperature > 0:
        raise ValueError(f"channel_masks: temperature must be > 0, got {temperature}")
    offsets_t = _as_index_tensor("offsets", offsets, u.device)
    if divisors is None:
        divisors_t = _ones(offsets_t.shape[0] - 1, offsets_t.device)
    else:
        divisors_t = _as_index_tensor("divisors", divisors, u.device)
    device = check_same_device("channel_masks", u=u, offsets=offsets_t, divisors=divisors_t)
    chosen = resolve_backend(backend, device, "channel_masks")
    args = (float(temperature), HARD_MODES[hard_width])
    if torch.compiler.is_compiling():
        # No data access inside a graph: the size comes from shapes when every divisor is 1.
        if divisors is not None:
            raise ValueError("channel_masks: under torch.compile, call with divisors=None (or outside the graph)")
        num_channels = u.shape[0]
    elif chosen == "cpu" and divisors is None:
        # The common call, kept lean (at ResNet-50 size the C++ work is ~40 us): the C++ op checks
        # the layout itself (num_channels = len(u)), so the Python check only runs to name a
        # problem; and the autograd Function is entered directly, not through the dispatcher (which
        # also lets torch.func.grad through: a Python Autograd kernel does not compose with it).
        try:
            return _channel_masks_cpp(u, offsets_t, divisors_t, *args, u.shape[0])
        except RuntimeError:
            _check_layout(u, offsets_t, divisors_t)
            raise
    else:
        num_channels = _check_layout(u, offsets_t, divisors_t)
    op = torch.ops.s2h.channel_masks_triton if chosen == "triton" else torch.ops.s2h.channel_masks
    return op(u, offsets_t, divisors_t, *args, num_channels)


@functools.lru_cache(maxsize=64)
def _ones(groups: int, device: torch.device) -> torch.Tensor:
    """Default divisors (all 1), made once per group count and device; never written to."""
    return torch.ones(groups, dtype=torch.int64, device=device)
