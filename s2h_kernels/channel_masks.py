"""Channel masks for every dependency group in one launch (docs/DESIGN.md §2).

Per group g with buckets u_g (``divisors[g]`` channels each) and temperature tau:
``p = softmax(u_g / tau)``, ``w_j = sum_{k>=j} p_k`` (reverse cumsum: the probability that bucket
j is kept), the soft mask repeats each w_j over its channels, ``E = d * sum_j w_j`` is the
expected width in channels, and ``keep`` is the hard prefix length in channels.

Backends: C++ on the CPU (csrc/cpu/channel_masks.cpp), CUDA C++ (csrc/cuda/channel_masks.cu),
and Triton (s2h_kernels/_triton/channel_masks.py; the default for CUDA tensors). All compute in
fp32 (fp64 for fp64 input) and return w and E in u's dtype.

NaN: a NaN in group g's u makes that group's w and E NaN and its keep count one bucket (the
minimum); other groups are unaffected. Nothing is silently zeroed.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch

from . import _triton
from ._backend import check_float, check_same_device, resolve_backend
from ._registration import define_triton_op, register_fake, register_op
# The tie tolerance is defined once, in the reference (the oracle); the C++ kernels' kMaskTieRtol
# (csrc/common/channel_masks.h) is checked equal to it by tests/kernels/test_channel_masks.py.
from .reference.channel_masks import TIE_RTOL  # noqa: F401

__all__ = ["channel_masks"]

HARD_MODES = {"threshold": 0, "expected": 1}


# ----------------------------------------------------------------------------------------------
# The Triton variant (kernels in s2h_kernels/_triton/channel_masks.py, loaded on first use).
# ----------------------------------------------------------------------------------------------


def _triton_forward(u, offsets, divisors, temperature, hard_mode, num_channels):
    return _triton.load("channel_masks", "s2h::channel_masks_triton").forward(
        u, offsets, divisors, temperature, hard_mode, num_channels)


def _triton_backward(grad_w, grad_expected, u, offsets, divisors, temperature):
    return _triton.load("channel_masks", "s2h::channel_masks_triton_backward").backward(
        grad_w, grad_expected, u, offsets, divisors, temperature)


define_triton_op("channel_masks_triton", "(Tensor u, Tensor offsets, Tensor divisors, float temperature, "
                 "int hard_mode, SymInt num_channels) -> (Tensor w, Tensor expected, Tensor keep)", _triton_forward)
define_triton_op("channel_masks_triton_backward", "(Tensor grad_w, Tensor grad_expected, Tensor u, Tensor offsets, "
                 "Tensor divisors, float temperature) -> Tensor", _triton_backward)


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
    ctx.mark_non_differentiable(output[2])


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


# Each variant's backward calls its own backward kernel.
_OPS = register_op(
    ("channel_masks", "channel_masks_triton"), fake=_fake_forward, setup_context=_setup_context,
    backward={"channel_masks": _make_backward(torch.ops.s2h.channel_masks_backward.default),
              "channel_masks_triton": _make_backward(torch.ops.s2h.channel_masks_triton_backward.default)},
)
register_fake(("channel_masks_backward", "channel_masks_triton_backward"), _fake_backward)
_channel_masks_cpp = _OPS["channel_masks"]


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
        # The common call, kept lean (the C++ work is microseconds): the C++ op checks the layout
        # itself (num_channels = len(u)), so the Python check only runs to name a problem; and the
        # autograd Function is entered directly, not through the dispatcher (s2h_kernels/_registration.py;
        # that also lets torch.func.grad through: a Python Autograd kernel does not compose with it).
        try:
            return _channel_masks_cpp(u, offsets_t, divisors_t, *args, u.shape[0])
        except RuntimeError:
            _check_layout(u, offsets_t, divisors_t)
            raise
    else:
        num_channels = _check_layout(u, offsets_t, divisors_t)
    op = _OPS["channel_masks_triton" if chosen == "triton" else "channel_masks"]
    return op(u, offsets_t, divisors_t, *args, num_channels)


@functools.lru_cache(maxsize=64)
def _ones(groups: int, device: torch.device) -> torch.Tensor:
    """Default divisors (all 1), made once per group count and device; never written to."""
    return torch.ones(groups, dtype=torch.int64, device=device)
