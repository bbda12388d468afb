"""Norm layers: BatchNorm with per-branch running statistics, LayerNorm over the kept channels."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..masks import take
from .base import S2HLayer, adopt, device_of

__all__ = ["S2HBatchNorm", "S2HBatchNorm1d", "S2HBatchNorm2d", "S2HLayerNorm", "S2HLayerNorm2d", "STAT_NAMES"]

STAT_NAMES = ("running_mean", "running_var", "num_batches_tracked")


class S2HBatchNorm(S2HLayer):
    """Soft mask = affine scaled by w; hard = the kept channels; running statistics per branch.

    ``running_mean`` / ``running_var`` are the dense branch's, ``*_soft`` and ``*_hard`` the
    other branches', so each branch (and the exported model) uses statistics of its own activations.
    """

    def init_branch_statistics(self) -> None:
        """Soft and hard running statistics, starting as copies of the dense ones."""
        if self.track_running_stats:
            for br in ("soft", "hard"):
                for name in STAT_NAMES:
                    self.register_buffer(f"{name}_{br}", getattr(self, name).detach().clone())

    def statistics(self, br: str):
        """(running_mean, running_var, num_batches_tracked) of branch ``br``."""
        if br == "dense":
            return self.running_mean, self.running_var, self.num_batches_tracked
        return (getattr(self, f"running_mean_{br}"), getattr(self, f"running_var_{br}"),
                getattr(self, f"num_batches_tracked_{br}"))

    @classmethod
    def from_module(cls, m):
        new = cls(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, device="meta",
                  dtype=(m.weight.dtype if m.weight is not None else None))
        adopt(new, m)
        new.init_branch_statistics()
        return new

    def _bn(self, x, br: str, sel, scale):
        self._check_input_dim(x)
        if self.track_running_stats:
            rm, rv, nbt = self.statistics(br)
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
            weight, bias = take(weight, 0, sel), take(bias, 0, sel)
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
        br = self.active_branch()
        if br == "dense":
            return self.apply_post(self._bn(x, "dense", None, None))
        self.mask_state.require(br, self)
        if br == "soft":
            return self.apply_post(self._bn(x, "soft", None, self.soft_vector(self.out_spec)))
        return self.apply_post(self._bn(x, "hard", self.kept(self.out_spec, x.device), None))

    def forward_pair(self, x_soft, x_hard):
        self.mask_state.require("paired", self)
        return (self.apply_post(self._bn(x_soft, "soft", None, self.soft_vector(self.out_spec))),
                self.apply_post(self._bn(x_hard, "hard", self.kept(self.out_spec, x_hard.device), None)))

    @torch.no_grad()
    def to_plain(self, keep: Sequence[int]) -> nn.Module:
        """A plain BatchNorm with the kept channels and the hard branch's running statistics."""
        dev = device_of(self)
        sel_out, _ = self.plain_selection(keep, dev)
        cls = nn.BatchNorm2d if isinstance(self, nn.BatchNorm2d) else nn.BatchNorm1d
        new = cls(self.plain_size(keep, self.num_features), self.eps, self.momentum, self.affine,
                  self.track_running_stats, device=dev, dtype=self.weight.dtype if self.weight is not None else None)
        if self.affine:
            new.weight.copy_(take(self.weight, 0, sel_out))
            new.bias.copy_(take(self.bias, 0, sel_out))
        if self.track_running_stats:
            rm, rv, nbt = self.statistics("hard")
            new.running_mean.copy_(take(rm, 0, sel_out))
            new.running_var.copy_(take(rv, 0, sel_out))
            new.num_batches_tracked.copy_(nbt)
        new.train(self.training)
        return self.as_plain_type(new)


class S2HBatchNorm2d(S2HBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with per-branch running statistics and the soft mask on its affine."""

    s2h_kind = "bn2d"

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, mask_group=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.s2h_init(mask_group)
        self.init_branch_statistics()


class S2HBatchNorm1d(S2HBatchNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` with per-branch running statistics and the soft mask on its affine."""

    s2h_kind = "bn1d"

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, mask_group=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.s2h_init(mask_group)
        self.init_branch_statistics()


class S2HLayerNorm(S2HLayer, nn.LayerNorm):
    """``nn.LayerNorm`` over the last dimension; the hard branch normalises over the kept channels."""

    s2h_kind = "ln"

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, device=None,
                 dtype=None, mask_group=None):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device=device, dtype=dtype)
        if len(self.normalized_shape) != 1:
            raise ValueError(f"S2HLayerNorm: only a 1-D normalized_shape is supported, got {self.normalized_shape}")
        self.s2h_init(mask_group)

    @property
    def num_features(self) -> int:
        return self.normalized_shape[0]

    @classmethod
    def from_module(cls, m: nn.LayerNorm) -> "S2HLayerNorm":
        new = cls(m.normalized_shape, m.eps, m.elementwise_affine, m.bias is not None, device="meta",
                  dtype=(m.weight.dtype if m.weight is not None else None))
        return adopt(new, m)

    def _ln(self, x, sel, scale):
        weight, bias = take(self.weight, 0, sel), take(self.bias, 0, sel)
        if scale is not None and weight is not None:  # (LN(x)·γ + β)·w = LN(x)·(γw) + βw
            scale = scale.to(x.dtype)
            weight, bias = weight * scale, (bias * scale if bias is not None else None)
            scale = None
        y = F.layer_norm(x, (x.shape[-1],), weight, bias, self.eps)
        return y if scale is None else y * scale.to(x.dtype)

    def forward(self, x):
        br = self.active_branch()
        if br == "dense":
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        self.mask_state.require(br, self)
        if br == "soft":
            return self._ln(x, None, self.soft_vector(self.out_spec))
        return self._ln(x, self.kept(self.out_spec, x.device), None)

    def forward_pair(self, x_soft, x_hard):
        self.mask_state.require("paired", self)
        return (self._ln(x_soft, None, self.soft_vector(self.out_spec)),
                self._ln(x_hard, self.kept(self.out_spec, x_hard.device), None))

    @torch.no_grad()
    def to_plain(self, keep: Sequence[int]) -> nn.LayerNorm:
        """A plain ``nn.LayerNorm`` over the kept channels."""
        dev = device_of(self)
        sel_out, _ = self.plain_selection(keep, dev)
        new = nn.LayerNorm(self.plain_size(keep, self.num_features), self.eps, self.elementwise_affine,
                           self.bias is not None, device=dev,
                           dtype=self.weight.dtype if self.weight is not None else None)
        if self.weight is not None:
            new.weight.copy_(take(self.weight, 0, sel_out))
        if self.bias is not None:
            new.bias.copy_(take(self.bias, 0, sel_out))
        new.train(self.training)
        return self.as_plain_type(new)


class S2HLayerNorm2d(S2HLayerNorm):
    """A LayerNorm over the channels of ``[B, C, H, W]`` (ConvNeXt's ``LayerNorm2d``, torchvision and timm)."""

    s2h_kind = "ln2d"

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward_pair(self, x_soft, x_hard):
        ys, yh = super().forward_pair(x_soft.permute(0, 2, 3, 1), x_hard.permute(0, 2, 3, 1))
        return ys.permute(0, 3, 1, 2), yh.permute(0, 3, 1, 2)
