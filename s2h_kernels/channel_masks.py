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


# Validated layouts: (id(offsets), id(divisors)) -> (offsets, its version, divisors, its version,
# len(u), num_channels). The entry holds the tensors themselves, so their ids cannot be reused while
# it lives; a layout is re-validated when either tensor was written in place (its version changed) or
# u's length differs. Writes that bypass the version counter (through ``.data``) are not seen: build
# a new offsets tensor instead. On the CPU the C++ op re-checks the layout anyway.
_LAYOUTS: dict[tuple[int, int], tuple] = {}
_LAYOUTS_MAX = 32


def _cached_num_channels(u: torch.Tensor, offsets: torch.Tensor, divisors: torch.Tensor) -> int:
    """num_channels of a layout given as tensors: validated (:func:`_check_layout`, a host read of
    offsets and divisors) on first use, then served from :data:`_LAYOUTS` while neither changed."""
    key = (id(offsets), id(divisors))
    hit = _LAYOUTS.get(key)
    try:
        versions = (offsets._version, divisors._version)
    except RuntimeError:  # inference tensors have no version counter: validate every call
        return _check_layout(u, offsets, divisors)
    n = u.shape[0]
    if (hit is not None and hit[0] is offsets and hit[2] is divisors and hit[1] == versions[0]
            and hit[3] == versions[1] and hit[4] == n):
        return hit[5]
    num_channels = _check_layout(u, offsets, divisors)
    if hit is None and len(_LAYOUTS) >= _LAYOUTS_MAX:
        _LAYOUTS.clear()
    _LAYOUTS[key] = (offsets, versions[0], divisors, versions[1], n, num_channels)
    return num_channels


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

    A layout given as tensors (offsets, and divisors unless None) is validated, which reads it on
    the host (a sync for CUDA tensors), on its first use only: again when either tensor is written
    in place, never for writes that bypass autograd's version counter (``.data``).
    """
    # The common training-step call, kept lean (the C++ work is microseconds): CPU tensors, offsets
    # (and divisors) as int64 tensors, outside torch.compile. The C++ op checks the layout itself,
    # so anything wrong there takes the full path below only to name the problem. The autograd
    # Function is entered directly, not through the dispatcher (s2h_kernels/_registration.py; that
    # also lets torch.func.grad through: a Python Autograd kernel does not compose with it).
    if (isinstance(u, torch.Tensor) and isinstance(offsets, torch.Tensor) and u.is_cpu and offsets.is_cpu
            and (backend is None or backend == "cpu") and u.is_floating_point() and u.dim() == 1
            and offsets.dtype is torch.int64 and offsets.dim() == 1 and offsets.shape[0] >= 2
            and temperature > 0 and not torch.compiler.is_compiling()):
        mode = 0 if hard_width == "threshold" else (1 if hard_width == "expected" else None)
        num_channels = None  # stays None where the full path must look (and name the problem)
        if mode is not None and divisors is None:
            divisors_t = _cpu_ones(offsets.shape[0] - 1)
            num_channels = u.shape[0]
        elif (mode is not None and isinstance(divisors, torch.Tensor) and divisors.is_cpu
              and divisors.dtype is torch.int64):
            divisors_t = divisors
            try:
                num_channels = _cached_num_channels(u, offsets, divisors)
            except ValueError:
                pass
        if num_channels is not None:
            try:
                return _channel_masks_cpp(u, offsets, divisors_t, float(temperature), mode, num_channels)
            except RuntimeError:
                _full_checks(u, offsets, temperature, divisors, hard_width, backend)  # names the problem
                _check_layout(u, offsets, divisors_t)
                raise
    op, args, cpp_checks = _full_checks(u, offsets, temperature, divisors, hard_width, backend)
    if not cpp_checks:
        return op(*args)
    try:
        return op(*args)
    except RuntimeError:
        _check_layout(u, args[1], args[2])
        raise


def _full_checks(u, offsets, temperature, divisors, hard_width, backend):
    """Every check, each with its ValueError; -> (the op variant to call, its arguments, whether
    the layout is left to the C++ op to check)."""
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
    cpp_checks = False
    if torch.compiler.is_compiling():
        # No data access inside a graph: the size comes from shapes when every divisor is 1.
        if divisors is not None:
            raise ValueError("channel_masks: under torch.compile, call with divisors=None (or outside the graph)")
        num_channels = u.shape[0]
    elif chosen == "cpu" and divisors is None:
        num_channels, cpp_checks = u.shape[0], True  # the C++ op checks the layout itself
    elif isinstance(offsets, torch.Tensor) and (divisors is None or isinstance(divisors, torch.Tensor)):
        num_channels = _cached_num_channels(u, offsets_t, divisors_t)  # the default divisors are cached too
    else:
        num_channels = _check_layout(u, offsets_t, divisors_t)  # from lists: new tensors every call
    op = _OPS["channel_masks_triton" if chosen == "triton" else "channel_masks"]
    return op, (u, offsets_t, divisors_t, *args, num_channels), cpp_checks


# Default divisors (all 1) of the lean CPU path, per group count; never written to.
_CPU_ONES: dict[int, torch.Tensor] = {}


def _cpu_ones(groups: int) -> torch.Tensor:
    ones = _CPU_ONES.get(groups)
    if ones is None:
        if len(_CPU_ONES) >= 64:
            _CPU_ONES.clear()
        ones = _CPU_ONES[groups] = torch.ones(groups, dtype=torch.int64)
    return ones


@functools.lru_cache(maxsize=64)
def _ones(groups: int, device: torch.device) -> torch.Tensor:
    """Default divisors (all 1), made once per group count and device; never written to."""
    return torch.ones(groups, dtype=torch.int64, device=device)
