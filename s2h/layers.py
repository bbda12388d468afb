"""S2H layers: drop-in ``nn.Conv2d`` / ``nn.Linear`` / norm layers that run a soft, hard or dense branch.

Branches (DESIGN §2):

* ``"dense"`` — the original layer, full width, no mask (also what an unconverted layer always does).
* ``"soft"`` — full width; the group's per-channel keep probability ``w`` scales the output channels
  *after the norm*: a norm layer in the group scales its affine ``γ, β`` by ``w``; a conv/linear
  scales its own output channels only when its output group has no norm layer.
* ``"hard"`` — the weights are sliced to the kept channels of the input and output groups
  (``W[:k_out, :k_in]`` for a plain prefix, an offset range per group behind a concat). No masked
  compute: the activations themselves are narrower.

The branch is chosen for the whole model with ``with s2h.branch("soft" | "hard" | "dense"):``.
Outside any ``branch`` block a layer runs dense; :class:`s2h.S2HModel` enters its
``default_branch`` itself. The selection is process-global (not thread-local), which keeps it a
plain Python global that ``torch.compile`` guards on.

A converted layer reads the masks of its model from a shared :class:`MaskState` (the packed soft
mask ``w`` per channel and the keep counts ``k`` per group), filled once per step by
``S2HModel.update_masks()``. Norm layers keep running statistics per branch (``running_mean``
/``running_var`` are the dense branch's, ``*_soft`` and ``*_hard`` the others'), so evaluating
either branch, or the exported model, uses statistics gathered on that branch's activations.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BRANCHES",
    "branch",
    "current_branch",
    "Segment",
    "ChannelSpec",
    "MaskState",
    "S2HConv2d",
    "S2HLinear",
    "S2HBatchNorm1d",
    "S2HBatchNorm2d",
    "S2HLayerNorm",
    "S2H_LAYER_TYPES",
]

BRANCHES = ("soft", "hard", "dense")
_BRANCH: list[str | None] = [None]


@contextlib.contextmanager
def branch(name: str) -> Iterator[None]:
    """Select the branch every S2H layer runs inside the block: ``"soft"``, ``"hard"`` or ``"dense"``."""
    if name not in BRANCHES:
        raise ValueError(f"s2h.branch: unknown branch {name!r}; choose one of {BRANCHES}")
    previous = _BRANCH[0]
    _BRANCH[0] = name
    try:
        yield
    finally:
        _BRANCH[0] = previous


def current_branch() -> str | None:
    """The branch selected by the innermost ``s2h.branch`` block, or None outside any."""
    return _BRANCH[0]


# --------------------------------------------------------------------------------------------
# Channel specs: how one channel dimension of a layer maps onto the dependency groups
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """Group ``group`` owns entries ``[start, start + channels * repeat)`` of a dimension.

    Channel ``j`` of the group (in importance order) occupies entries
    ``start + j*repeat … start + (j+1)*repeat - 1``: ``repeat > 1`` where a flatten turned each
    channel into ``repeat`` features. The hard branch keeps ``[start, start + k*repeat)``.
    """

    group: int
    start: int
    channels: int
    repeat: int = 1

    @property
    def stop(self) -> int:
        return self.start + self.channels * self.repeat


class ChannelSpec:
    """One channel dimension of size ``size``: the group segments in it; other entries are fixed."""

    def __init__(self, size: int, segments: Sequence[Segment] = ()):
        segs = sorted(segments, key=lambda s: s.start)
        for a, b in zip(segs, segs[1:]):
            if a.stop > b.start:
                raise ValueError(f"ChannelSpec: overlapping segments {a} and {b}")
        if segs and segs[-1].stop > size:
            raise ValueError(f"ChannelSpec: segment {segs[-1]} exceeds the dimension size {size}")
        self.size = int(size)
        self.segments = tuple(segs)
        # the common case: one group covering the whole dimension from 0 -> a prefix slice
        self.is_prefix = len(segs) == 1 and segs[0].start == 0 and segs[0].stop == size
        self._index_cache: dict[tuple, torch.Tensor] = {}
        self._soft_index: dict[torch.device, torch.Tensor] = {}

    @property
    def groups(self) -> tuple[int, ...]:
        return tuple(s.group for s in self.segments)

    def kept_size(self, keep: Sequence[int]) -> int:
        """Entries kept by the hard branch for per-group keep counts ``keep`` (in channels)."""
        n = self.size
        for s in self.segments:
            n -= (s.channels - keep[s.group]) * s.repeat
        return n

    def kept(self, keep: Sequence[int], device: torch.device) -> slice | torch.Tensor | None:
        """What the hard branch keeps: None (all), a prefix slice, or ascending int64 indices."""
        if not self.segments:
            return None
        if self.is_prefix:
            s = self.segments[0]
            k = keep[s.group]
            return None if k == s.channels else slice(0, k * s.repeat)
        key = tuple(keep[s.group] for s in self.segments) + (str(device),)
        idx = self._index_cache.get(key)
        if idx is None:
            parts, pos = [], 0
            for s in self.segments:
                parts.append(torch.arange(pos, s.start))
                parts.append(torch.arange(s.start, s.start + keep[s.group] * s.repeat))
                pos = s.stop
            parts.append(torch.arange(pos, self.size))
            idx = torch.cat(parts).to(device)
            if len(self._index_cache) > 64:
                self._index_cache.clear()
            self._index_cache[key] = idx
        return idx

    def soft_mask(self, w: torch.Tensor, channel_offsets: Sequence[int]) -> torch.Tensor | None:
        """The per-entry soft mask (``w`` of each entry's group channel, 1 on fixed entries)."""
        if not self.segments:
            return None
        if self.is_prefix and self.segments[0].repeat == 1:
            s = self.segments[0]
            off = channel_offsets[s.group]
            return w[off : off + s.channels]
        idx = self._soft_index.get(w.device)
        if idx is None:
            one = int(channel_offsets[-1])  # index of the appended 1
            idx = torch.full((self.size,), one, dtype=torch.int64)
            for s in self.segments:
                ch = torch.arange(s.channels).repeat_interleave(s.repeat)
                idx[s.start : s.stop] = channel_offsets[s.group] + ch
            idx = idx.to(w.device)
            self._soft_index[w.device] = idx
        return torch.cat([w, w.new_ones(1)]).index_select(0, idx)

    def __repr__(self) -> str:
        return f"ChannelSpec(size={self.size}, segments={list(self.segments)})"


def _adopt(new: nn.Module, old: nn.Module) -> nn.Module:
    """Give ``new`` (built on the meta device) the parameters and buffers of ``old``, shared."""
    for name in list(new._parameters):
        new._parameters[name] = old._parameters[name]
    for name in list(old._buffers):
        new._buffers[name] = old._buffers[name]
    new.train(old.training)
    return new


def swap_modules(root: nn.Module, mapping: dict[nn.Module, nn.Module]) -> None:
    """Replace every reference to a key of ``mapping`` under ``root`` (shared modules included)."""
    for parent in list(root.modules()):
        for name, child in list(parent._modules.items()):
            if child in mapping:
                parent._modules[name] = mapping[child]


def _take(t: torch.Tensor | None, dim: int, sel) -> torch.Tensor | None:
    if t is None or sel is None:
        return t
    if isinstance(sel, slice):
        return t.narrow(dim, sel.start, sel.stop - sel.start)
    return t.index_select(dim, sel)


class MaskState:
    """The masks one model's layers share: filled by ``S2HModel.update_masks()``.

    ``w``: soft mask per channel, packed in group order (``channel_offsets[g]`` is where group g
    starts; differentiable). ``expected``: E per group. ``keep``: int64 keep counts per group, and
    ``keep_list`` the same as Python ints (what the hard branch slices with).
    """

    def __init__(self, channel_offsets: Sequence[int]):
        self.channel_offsets = [int(c) for c in channel_offsets]
        self.w: torch.Tensor | None = None
        self.expected: torch.Tensor | None = None
        self.keep: torch.Tensor | None = None
        self.keep_list: list[int] | None = None
        self.version: tuple | None = None  # what the cache was computed from

    def __deepcopy__(self, memo):
        # a copy starts without cached masks: they hold an autograd graph into the original's u
        new = MaskState(self.channel_offsets)
        memo[id(self)] = new
        return new

    def set(self, w, expected, keep, version=None) -> None:
        self.w, self.expected, self.keep = w, expected, keep
        self.keep_list = [int(k) for k in keep.tolist()]
        self.version = version

    def clear(self) -> None:
        self.w = self.expected = self.keep = self.keep_list = None
        self.version = None

    def require(self, what: str, layer: nn.Module) -> None:
        if self.w is None:
            raise RuntimeError(
                f"{type(layer).__name__}: the {what} branch needs masks; call S2HModel.update_masks() "
                "or run the layer through S2HModel.forward"
            )


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


class _S2HMixin:
    """Shared state of a converted layer: its channel specs and the model's MaskState."""

    def _s2h_init(self, mask_group: str | None) -> None:
        #: name of the dependency group of the output channels (set by s2h.convert)
        self.mask_group = mask_group
        self.in_spec: ChannelSpec | None = None
        self.out_spec: ChannelSpec | None = None
        #: apply the soft mask on this layer's own output channels (its group has no norm layer)
        self.soft_out = False
        self._s2h_state: MaskState | None = None

    def bind(self, state: MaskState | None, in_spec: ChannelSpec | None, out_spec: ChannelSpec | None,
             soft_out: bool = False, mask_group: str | None = None) -> None:
        """Attach the layer to a model's masks (done by s2h.convert)."""
        self._s2h_state = state
        self.in_spec, self.out_spec = in_spec, out_spec
        self.soft_out = bool(soft_out)
        if mask_group is not None:
            self.mask_group = mask_group

    def _branch(self) -> str:
        b = current_branch()
        if b is None or self._s2h_state is None:
            return "dense"
        return b

    def _kept(self, spec: ChannelSpec | None, device):
        if spec is None:
            return None
        return spec.kept(self._s2h_state.keep_list, device)

    def _soft_vec(self, spec: ChannelSpec | None):
        if spec is None:
            return None
        st = self._s2h_state
        return spec.soft_mask(st.w, st.channel_offsets)


class S2HConv2d(_S2HMixin, nn.Conv2d):
    """``nn.Conv2d`` with soft / hard / dense branches. Same constructor plus ``mask_group``.

    Supports ``groups == 1`` and depthwise convolutions (``groups == in_channels == out_channels``);
    the hard branch of a depthwise conv keeps ``k`` channels and ``k`` groups.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros", device=None, dtype=None, mask_group=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias, padding_mode, device=device, dtype=dtype)
        self._s2h_init(mask_group)

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels == self.out_channels

    @classmethod
    def from_module(cls, m: nn.Conv2d) -> "S2HConv2d":
        new = cls(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                  m.groups, m.bias is not None, m.padding_mode, device="meta", dtype=m.weight.dtype)
        return _adopt(new, m)

    def _conv(self, x, weight, bias, groups):
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, weight, bias, self.stride, 0, self.dilation, groups)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, groups)

    def hard_weight(self) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """(weight, bias, groups) of the hard branch: slices of the full parameters."""
        dev = self.weight.device
        sel_out = self._kept(self.out_spec, dev)
        w = _take(self.weight, 0, sel_out)
        b = _take(self.bias, 0, sel_out)
        if self.depthwise:
            return w, b, w.shape[0]
        return _take(w, 1, self._kept(self.in_spec, dev)), b, self.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        br = self._branch()
        if br == "dense":
            return self._conv(x, self.weight, self.bias, self.groups)
        self._s2h_state.require(br, self)
        if br == "soft":
            return self._forward_soft(x)
        return self._forward_hard(x)

    def _forward_soft(self, x):
        y = self._conv(x, self.weight, self.bias, self.groups)
        if self.soft_out:
            m = self._soft_vec(self.out_spec)
            if m is not None:
                y = y * m.to(y.dtype).view(1, -1, 1, 1)
        return y

    def _forward_hard(self, x):
        w, b, groups = self.hard_weight()
        if _narrow_conv_applies(x, w, groups, self.stride, self.dilation, self.padding, self.padding_mode):
            return _NarrowConv2d.apply(x, w, b, tuple(self.padding))
        return self._conv(x, w, b, groups)

    def forward_pair(self, x_soft: torch.Tensor, x_hard: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Soft and hard outputs. On CUDA the two convolutions run on two streams; else two calls."""
        if self._s2h_state is None:
            raise RuntimeError("S2HConv2d.forward_pair: the layer is not bound to an S2HModel (use s2h.convert)")
        self._s2h_state.require("paired", self)
        if x_soft.is_cuda and torch.cuda.is_available():
            return _two_streams(lambda: self._forward_soft(x_soft), lambda: self._forward_hard(x_hard),
                                x_soft, x_hard)
        return self._forward_soft(x_soft), self._forward_hard(x_hard)


# Narrow hard convolutions. On the CPU, oneDNN's backward-data kernel for convolutions with fewer
# than 16 channels is 2-4x slower than its forward kernel on the same shapes (6-8 channels at
# 32x32, ResNet-56's first stage in the hard network: 5.1-5.5 ms against 1.2-1.4 ms;
# benchmarks/results/step_cpu.md). For stride 1 and dilation 1 the input gradient IS a forward
# convolution: of the output gradient with the transposed, flipped weight, padded by k - 1 - p.
_NARROW_CHANNELS = 16


def _narrow_conv_applies(x, weight, groups, stride, dilation, padding, padding_mode) -> bool:
    if x.device.type != "cpu" or groups != 1 or padding_mode != "zeros" or isinstance(padding, str):
        return False
    if tuple(stride) != (1, 1) or tuple(dilation) != (1, 1) or min(weight.shape[0], weight.shape[1]) >= _NARROW_CHANNELS:
        return False
    kh, kw = weight.shape[2:]
    return padding[0] <= kh - 1 and padding[1] <= kw - 1 and torch.is_grad_enabled()


class _NarrowConv2d(torch.autograd.Function):
    """``F.conv2d(x, weight, bias, 1, padding)``; the input gradient runs as a forward convolution."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding):
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, 1, padding)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        (ph, pw), (kh, kw) = ctx.padding, weight.shape[2:]
        gy = gy.contiguous()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = F.conv2d(gy, weight.transpose(0, 1).flip(2, 3), None, 1, (kh - 1 - ph, kw - 1 - pw))
        need_w, need_b = ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]
        if need_w or need_b:
            _, gw, gb = torch.ops.aten.convolution_backward(
                gy, x, weight, [weight.shape[0]] if ctx.has_bias else None, [1, 1], [ph, pw], [1, 1], False, [0, 0],
                1, [False, need_w, need_b])
        return gx, gw, gb, None


class S2HLinear(_S2HMixin, nn.Linear):
    """``nn.Linear`` with soft / hard / dense branches. Same constructor plus ``mask_group``."""

    #: backend of ``forward_pair``: None = the Triton dual-GEMM on CUDA, two calls on the CPU;
    #: "triton" forces the kernel (on CPU tensors it needs TRITON_INTERPRET=1); "cpu" two calls.
    pair_backend: str | None = None

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, mask_group=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._s2h_init(mask_group)

    @classmethod
    def from_module(cls, m: nn.Linear) -> "S2HLinear":
        new = cls(m.in_features, m.out_features, m.bias is not None, device="meta", dtype=m.weight.dtype)
        return _adopt(new, m)

    def hard_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        dev = self.weight.device
        sel_out = self._kept(self.out_spec, dev)
        w = _take(_take(self.weight, 0, sel_out), 1, self._kept(self.in_spec, dev))
        return w, _take(self.bias, 0, sel_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        br = self._branch()
        if br == "dense":
            return F.linear(x, self.weight, self.bias)
        self._s2h_state.require(br, self)
        if br == "soft":
            return self._forward_soft(x)
        w, b = self.hard_weight()
        return F.linear(x, w, b)

    def _soft_scale(self, y):
        if self.soft_out:
            m = self._soft_vec(self.out_spec)
            if m is not None:
                y = y * m.to(y.dtype)
        return y

    def _forward_soft(self, x):
        return self._soft_scale(F.linear(x, self.weight, self.bias))

    def _prefix_widths(self) -> tuple[int, int] | None:
        """(k_out, k_in) when the hard weight is the top-left block W[:k_out, :k_in], else None."""
        st = self._s2h_state
        k = []
        for spec, full in ((self.out_spec, self.out_features), (self.in_spec, self.in_features)):
            if spec is None or not spec.segments:
                k.append(full)
            elif spec.is_prefix:
                k.append(spec.kept_size(st.keep_list))
            else:
                return None
        return k[0], k[1]

    def forward_pair(self, x_soft: torch.Tensor, x_hard: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Soft and hard outputs reading the weight once.

        CUDA: the fused Triton dual-GEMM (``s2h_kernels.dual_linear``) — each weight tile is loaded
        once and feeds both products. CPU: two ``F.linear`` calls (what the kernel falls back to).
        """
        if self._s2h_state is None:
            raise RuntimeError("S2HLinear.forward_pair: the layer is not bound to an S2HModel (use s2h.convert)")
        self._s2h_state.require("paired", self)
        widths = self._prefix_widths()
        use_kernel = self.pair_backend == "triton" or (self.pair_backend is None and x_soft.is_cuda)
        if use_kernel and widths is not None:
            from s2h_kernels.dual_linear import dual_linear

            ys, yh = dual_linear(x_soft, x_hard, self.weight, self.bias, widths[0], widths[1], backend="triton")
            return self._soft_scale(ys), yh
        w, b = self.hard_weight()
        return self._forward_soft(x_soft), F.linear(x_hard, w, b)


def _two_streams(fn_a, fn_b, xa, xb):
    """Run fn_a on the current CUDA stream and fn_b on a side stream; join before returning."""
    cur = torch.cuda.current_stream(xa.device)
    side = _side_stream(xa.device)
    side.wait_stream(cur)
    ya = fn_a()
    with torch.cuda.stream(side):
        yb = fn_b()
    cur.wait_stream(side)
    xb.record_stream(side)
    yb.record_stream(cur)
    return ya, yb


_SIDE_STREAMS: dict = {}


def _side_stream(device):
    s = _SIDE_STREAMS.get(device)
    if s is None:
        s = torch.cuda.Stream(device=device)
        _SIDE_STREAMS[device] = s
    return s


class _S2HBatchNorm(_S2HMixin):
    """Soft mask = affine scaled by w; hard = the kept channels; running statistics per branch."""

    def _init_branch_stats(self) -> None:
        """Soft and hard running statistics, starting as copies of the dense ones."""
        if self.track_running_stats:
            for br in ("soft", "hard"):
                for name in ("running_mean", "running_var", "num_batches_tracked"):
                    self.register_buffer(f"{name}_{br}", getattr(self, name).detach().clone())

    def _stats(self, br: str):
        if br == "dense":
            return self.running_mean, self.running_var, self.num_batches_tracked
        return (getattr(self, f"running_mean_{br}"), getattr(self, f"running_var_{br}"),
                getattr(self, f"num_batches_tracked_{br}"))

    @classmethod
    def from_module(cls, m):
        new = cls(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, device="meta",
                  dtype=(m.weight.dtype if m.weight is not None else None))
        _adopt(new, m)
        new._init_branch_stats()
        return new

    def _bn(self, x, br: str, sel, scale):
        self._check_input_dim(x)
        if self.track_running_stats:
            rm, rv, nbt = self._stats(br)
        else:
            rm = rv = nbt = None
        if self.training and self.track_running_stats:
            nbt.add_(1)
            factor = (1.0 / float(nbt)) if self.momentum is None else self.momentum
        else:
            factor = 0.0 if self.momentum is None else self.momentum
        bn_training = self.training or rm is None
        weight, bias = self.weight, self.bias
        scatter = None
        if sel is not None:
            weight, bias = _take(weight, 0, sel), _take(bias, 0, sel)
            if rm is not None:
                if isinstance(sel, slice):
                    rm, rv = rm[sel], rv[sel]  # views: F.batch_norm updates them in place
                else:
                    scatter = (rm, rv)
                    rm, rv = rm.index_select(0, sel), rv.index_select(0, sel)
        if scale is not None:
            scale = scale.to(x.dtype)
            if weight is not None:
                weight, bias = weight * scale, bias * scale
        y = F.batch_norm(x, rm, rv, weight, bias, bn_training, factor, self.eps)
        if scale is not None and self.weight is None:
            y = y * scale.view((1, -1) + (1,) * (y.dim() - 2))
        if scatter is not None and self.training:
            with torch.no_grad():
                scatter[0].index_copy_(0, sel, rm)
                scatter[1].index_copy_(0, sel, rv)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        br = self._branch()
        if br == "dense":
            return self._bn(x, "dense", None, None)
        self._s2h_state.require(br, self)
        if br == "soft":
            return self._bn(x, "soft", None, self._soft_vec(self.out_spec))
        return self._bn(x, "hard", self._kept(self.out_spec, x.device), None)

    def forward_pair(self, x_soft, x_hard):
        self._s2h_state.require("paired", self)
        return (self._bn(x_soft, "soft", None, self._soft_vec(self.out_spec)),
                self._bn(x_hard, "hard", self._kept(self.out_spec, x_hard.device), None))


class S2HBatchNorm2d(_S2HBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with per-branch running statistics and the soft mask on its affine."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, mask_group=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self._s2h_init(mask_group)
        self._init_branch_stats()


class S2HBatchNorm1d(_S2HBatchNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` with per-branch running statistics and the soft mask on its affine."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, mask_group=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self._s2h_init(mask_group)
        self._init_branch_stats()


class S2HLayerNorm(_S2HMixin, nn.LayerNorm):
    """``nn.LayerNorm`` over the last dimension; the hard branch normalises over the kept channels."""

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, device=None,
                 dtype=None, mask_group=None):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device=device, dtype=dtype)
        if len(self.normalized_shape) != 1:
            raise ValueError(f"S2HLayerNorm: only a 1-D normalized_shape is supported, got {self.normalized_shape}")
        self._s2h_init(mask_group)

    @property
    def num_features(self) -> int:
        return self.normalized_shape[0]

    @classmethod
    def from_module(cls, m: nn.LayerNorm) -> "S2HLayerNorm":
        new = cls(m.normalized_shape, m.eps, m.elementwise_affine, m.bias is not None, device="meta",
                  dtype=(m.weight.dtype if m.weight is not None else None))
        return _adopt(new, m)

    def _ln(self, x, sel, scale):
        weight, bias = _take(self.weight, 0, sel), _take(self.bias, 0, sel)
        if scale is not None and weight is not None:  # (LN(x)·γ + β)·w = LN(x)·(γw) + βw
            scale = scale.to(x.dtype)
            weight, bias = weight * scale, (bias * scale if bias is not None else None)
            scale = None
        y = F.layer_norm(x, (x.shape[-1],), weight, bias, self.eps)
        return y if scale is None else y * scale.to(x.dtype)

    def forward(self, x):
        br = self._branch()
        if br == "dense":
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        self._s2h_state.require(br, self)
        if br == "soft":
            return self._ln(x, None, self._soft_vec(self.out_spec))
        return self._ln(x, self._kept(self.out_spec, x.device), None)

    def forward_pair(self, x_soft, x_hard):
        self._s2h_state.require("paired", self)
        return (self._ln(x_soft, None, self._soft_vec(self.out_spec)),
                self._ln(x_hard, self._kept(self.out_spec, x_hard.device), None))


S2H_LAYER_TYPES = (S2HConv2d, S2HLinear, S2HBatchNorm1d, S2HBatchNorm2d, S2HLayerNorm)
