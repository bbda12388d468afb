"""timm's ``Attention`` (ViT, DeiT, ...: a fused ``qkv`` Linear, reshape, ``unbind``) pruned by heads.

:func:`s2h_timm_attention` turns a ``timm.layers.Attention`` into an :class:`S2HTimmAttention`: the
heads group of :class:`~s2h.structured.attention.S2HAttention` (``qkv``'s q, k and v blocks and
``proj``'s input, one head at a time), computed with explicit matmuls so FLOPs are counted, with
timm's call convention (``attn(x, attn_mask=None, is_causal=False)``). It exports back to timm's
own class with fewer heads (``num_heads``, ``attn_dim``), so the exported model is a timm model
that scripts and exports to ONNX as timm's does. Attention with ``qk_norm``, ``scale_norm`` or a
gate is left unconverted (its ``qkv`` group is kept dense and reported).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..models.vit import Attention
from .attention import S2HAttention

__all__ = ["S2HTimmAttention", "is_timm_attention", "s2h_timm_attention"]


def is_timm_attention(m: nn.Module) -> bool:
    t = type(m)
    return t.__name__ == "Attention" and t.__module__.split(".")[0] == "timm" and hasattr(m, "qkv") \
        and hasattr(m, "proj") and hasattr(m, "num_heads") and hasattr(m, "head_dim")


def _plain_submodules(m: nn.Module) -> bool:
    """True when q/k normalisation, the output norm and the gate are absent (what S2H computes)."""
    for name in ("q_norm", "k_norm", "norm"):
        sub = getattr(m, name, None)
        if sub is not None and not isinstance(sub, nn.Identity):
            return False
    return getattr(m, "gate", None) is None


class S2HTimmAttention(S2HAttention):
    """timm ``Attention`` with a mask group over its heads; exported as timm's class."""

    @classmethod
    def from_timm(cls, m: nn.Module) -> "S2HTimmAttention":
        obj = cls.__new__(cls)
        nn.Module.__init__(obj)
        obj.num_heads, obj.head_dim, obj.scale = int(m.num_heads), int(m.head_dim), float(m.scale)
        obj.attn_drop = float(getattr(m.attn_drop, "p", 0.0))
        obj.proj_drop = float(getattr(m.proj_drop, "p", 0.0))
        obj.qkv, obj.proj = m.qkv, m.proj
        obj._s2h_init()
        obj.train(m.training)
        obj.timm_type = type(m)
        obj.timm_attrs = {k: v for k, v in vars(m).items() if not k.startswith("_") and k != "training"}
        obj.timm_modules = {k: v for k, v in m._modules.items() if k not in ("qkv", "proj")}
        return obj

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        if attn_mask is not None or is_causal:
            raise RuntimeError("S2HTimmAttention: attention masks and causal attention are not supported")
        return super().forward(x)

    def to_plain(self, keep: Sequence[int]) -> nn.Module:
        """timm's ``Attention`` with the kept heads."""
        qkv, proj = self._plain_linears(keep)
        cls = self.timm_type
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for k, v in self.timm_attrs.items():
            setattr(new, k, v)
        for k, v in self.timm_modules.items():
            setattr(new, k, v)
        heads = self._kept_channels(keep)
        new.num_heads, new.attn_dim = heads, heads * self.head_dim
        new.qkv, new.proj = qkv, proj
        new.train(self.training)
        return new


def s2h_timm_attention(name: str, m: nn.Module) -> nn.Module | None:
    """The S2H module for a timm ``Attention`` (None: not one, or one S2H leaves unconverted)."""
    if not is_timm_attention(m) or not _plain_submodules(m) or isinstance(m, Attention):
        return None
    return S2HTimmAttention.from_timm(m)
