"""``S2HLinear``: ``nn.Linear`` with soft / hard / dense branches and a paired forward."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from s2h_kernels import dual_linear

from ..masks import take
from .base import S2HLayer, adopt

__all__ = ["S2HLinear", "PAIR_BACKENDS"]

#: ``S2HLinear.pair_backend``: None = the Triton dual-GEMM on CUDA, two calls on the CPU;
#: "triton" forces the kernel (on CPU tensors it needs TRITON_INTERPRET=1); "cpu" two calls.
PAIR_BACKENDS = (None, "triton", "cpu")


class S2HLinear(S2HLayer, nn.Linear):
    """``nn.Linear`` with soft / hard / dense branches. Same constructor plus ``mask_group``."""

    s2h_kind = "linear"

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, mask_group=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.s2h_init(mask_group)
        #: backend of this layer's ``forward_pair`` (one of :data:`PAIR_BACKENDS`)
        self.pair_backend: str | None = None

    @classmethod
    def from_module(cls, m: nn.Linear) -> "S2HLinear":
        new = cls(m.in_features, m.out_features, m.bias is not None, device="meta", dtype=m.weight.dtype)
        return adopt(new, m)

    def hard_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        dev = self.weight.device
        sel_out = self.kept(self.out_spec, dev)
        w = take(take(self.weight, 0, sel_out), 1, self.kept(self.in_spec, dev))
        return w, take(self.bias, 0, sel_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        br = self.active_branch()
        if br == "dense":
            return F.linear(x, self.weight, self.bias)
        self.mask_state.require(br, self)
        if br == "soft":
            return self._forward_soft(x)
        w, b = self.hard_weight()
        return F.linear(x, w, b)

    def _soft_scale(self, y):
        if self.soft_out:
            m = self.soft_vector(self.out_spec)
            if m is not None:
                y = y * m.to(y.dtype)
        return y

    def _forward_soft(self, x):
        return self._soft_scale(F.linear(x, self.weight, self.bias))

    def _prefix_widths(self) -> tuple[int, int] | None:
        """(k_out, k_in) when the hard weight is the top-left block W[:k_out, :k_in], else None."""
        st = self.mask_state
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

        CUDA: the fused Triton dual-GEMM (``s2h_kernels.dual_linear``): each weight tile is loaded
        once and feeds both products. CPU: two ``F.linear`` calls (what the kernel falls back to).
        """
        if self.mask_state is None:
            raise RuntimeError("S2HLinear.forward_pair: the layer is not bound to an S2HModel (use s2h.convert)")
        self.mask_state.require("paired", self)
        widths = self._prefix_widths()
        use_kernel = self.pair_backend == "triton" or (self.pair_backend is None and x_soft.is_cuda)
        if use_kernel and widths is not None:
            ys, yh = dual_linear(x_soft, x_hard, self.weight, self.bias, widths[0], widths[1], backend="triton")
            return self._soft_scale(ys), yh
        w, b = self.hard_weight()
        return self._forward_soft(x_soft), F.linear(x_hard, w, b)

    @torch.no_grad()
    def to_plain(self, keep: Sequence[int]) -> nn.Linear:
        """A plain ``nn.Linear`` holding the hard branch's features for keep counts ``keep``."""
        sel_out, sel_in = self.plain_selection(keep, self.weight.device)
        w = take(take(self.weight, 0, sel_out), 1, sel_in)
        b = take(self.bias, 0, sel_out)
        new = nn.Linear(w.shape[1], w.shape[0], b is not None, device=w.device, dtype=w.dtype)
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
        new.train(self.training)
        return self.as_plain_type(new)
