"""``S2HConv2d``: ``nn.Conv2d`` with soft / hard / dense branches, and the narrow-conv input gradient."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..masks import take
from ..streams import two_streams
from .base import S2HLayer, adopt

__all__ = ["S2HConv2d", "NarrowConv2d", "NARROW_CHANNELS", "narrow_conv_applies"]


class S2HConv2d(S2HLayer, nn.Conv2d):
    """``nn.Conv2d`` with soft / hard / dense branches. Same constructor plus ``mask_group``.

    Supports ``groups == 1``, depthwise convolutions (``groups == in_channels == out_channels``;
    the hard branch keeps ``k`` channels and ``k`` groups) and grouped convolutions whose channel
    groups prune the same channels in every convolution group (s2h.convert folds them so): the hard
    branch keeps ``groups`` groups of ``k_in / groups`` input channels each.
    """

    s2h_kind = "conv2d"

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros", device=None, dtype=None, mask_group=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias, padding_mode, device=device, dtype=dtype)
        self.s2h_init(mask_group)

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels == self.out_channels

    @classmethod
    def from_module(cls, m: nn.Conv2d) -> "S2HConv2d":
        new = cls(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                  m.groups, m.bias is not None, m.padding_mode, device="meta", dtype=m.weight.dtype)
        return adopt(new, m)

    def _conv(self, x, weight, bias, groups):
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, weight, bias, self.stride, 0, self.dilation, groups)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, groups)

    def hard_weight(self) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """(weight, bias, groups) of the hard branch: slices of the full parameters."""
        dev = self.weight.device
        sel_out = self.kept(self.out_spec, dev)
        w = take(self.weight, 0, sel_out)
        b = take(self.bias, 0, sel_out)
        if self.depthwise:
            return w, b, w.shape[0]
        return self._take_in(w, self.kept(self.in_spec, dev), self.mask_state.keep_list), b, self.groups

    def _take_in(self, w, sel_in, keep):
        """``w`` restricted to the kept input channels (per convolution group for a grouped conv)."""
        if self.groups == 1 or self.in_spec is None:
            return take(w, 1, sel_in)
        per_group = self.in_spec.kept_size(keep) // self.groups  # the same channels of every group
        return w.narrow(1, 0, per_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        br = self.active_branch()
        if br == "dense":
            return self._conv(x, self.weight, self.bias, self.groups)
        self.mask_state.require(br, self)
        if br == "soft":
            return self._forward_soft(x)
        return self._forward_hard(x)

    def _forward_soft(self, x):
        y = self._conv(x, self.weight, self.bias, self.groups)
        if self.soft_out:
            m = self.soft_vector(self.out_spec)
            if m is not None:
                y = y * m.to(y.dtype).view(1, -1, 1, 1)
        return y

    def _forward_hard(self, x):
        w, b, groups = self.hard_weight()
        if narrow_conv_applies(x, w, groups, self.stride, self.dilation, self.padding, self.padding_mode):
            return NarrowConv2d.apply(x, w, b, tuple(self.padding))
        return self._conv(x, w, b, groups)

    def forward_pair(self, x_soft: torch.Tensor, x_hard: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Soft and hard outputs. On CUDA the two convolutions run on two streams; else two calls."""
        if self.mask_state is None:
            raise RuntimeError("S2HConv2d.forward_pair: the layer is not bound to an S2HModel (use s2h.convert)")
        self.mask_state.require("paired", self)
        if x_soft.is_cuda and torch.cuda.is_available():
            return two_streams(self.mask_state, lambda: self._forward_soft(x_soft), lambda: self._forward_hard(x_hard),
                               x_soft, x_hard)
        return self._forward_soft(x_soft), self._forward_hard(x_hard)

    @torch.no_grad()
    def to_plain(self, keep: Sequence[int]) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` holding the hard branch's channels for keep counts ``keep``."""
        sel_out, sel_in = self.plain_selection(keep, self.weight.device)
        w = take(self.weight, 0, sel_out)
        b = take(self.bias, 0, sel_out)
        if self.depthwise:
            groups = cin = w.shape[0]
        else:
            groups = self.groups
            w = self._take_in(w, sel_in, keep)
            cin = w.shape[1] * groups
        new = nn.Conv2d(cin, w.shape[0], self.kernel_size, self.stride, self.padding, self.dilation, groups,
                        b is not None, self.padding_mode, device=w.device, dtype=w.dtype)
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
        new.train(self.training)
        return self.as_plain_type(new)


# Narrow hard convolutions. On the CPU, oneDNN's backward-data kernel for convolutions with fewer
# than 16 channels is several times slower than its forward kernel on the same shapes
# (benchmarks/results/step_cpu.md). For stride 1 and dilation 1 the input gradient IS a forward
# convolution: of the output gradient with the transposed, flipped weight, padded by k - 1 - p.
NARROW_CHANNELS = 16


def narrow_conv_applies(x, weight, groups, stride, dilation, padding, padding_mode) -> bool:
    if x.device.type != "cpu" or groups != 1 or padding_mode != "zeros" or isinstance(padding, str):
        return False
    if torch.is_autocast_enabled("cpu"):  # its hand-written backward assumes one dtype throughout
        return False
    if tuple(stride) != (1, 1) or tuple(dilation) != (1, 1) or min(weight.shape[0], weight.shape[1]) >= NARROW_CHANNELS:
        return False
    kh, kw = weight.shape[2:]
    return padding[0] <= kh - 1 and padding[1] <= kw - 1 and torch.is_grad_enabled()


class NarrowConv2d(torch.autograd.Function):
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
