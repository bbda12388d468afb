"""What a module *is*, for :func:`s2h.convert`: layers matched by behaviour, not by exact type.

A subclass of ``nn.Conv2d`` / ``nn.Linear`` / ``nn.BatchNorm1d/2d`` / ``nn.LayerNorm`` that keeps its
base's ``forward`` computes the same function, so S2H can replace it (and export it back as the
user's class). A subclass with its own ``forward`` may compute something else (timm's
``Conv2dSame`` pads dynamically, ``StdConv2d`` standardises its weight): it is not matched, and a
dependency group holding it is left dense. A few known subclasses with their own ``forward`` are
matched by what they compute:

* timm's ``BatchNormAct2d``: BatchNorm2d, then its ``drop`` and ``act`` submodules;
* timm's ``LayerNorm`` (the fast-norm option computes the same function) — a channels-last LayerNorm;
* timm's and torchvision's ``LayerNorm2d``: LayerNorm over the channels of ``[B, C, H, W]``.
"""
from __future__ import annotations

from torch import nn

__all__ = ["layer_kind", "type_name", "NORM_KINDS", "LAYER_NORM_KINDS"]

NORM_KINDS = ("bn1d", "bn2d", "bnact2d", "ln", "ln2d")
LAYER_NORM_KINDS = ("ln", "ln2d")

# (package, class name) of subclasses with their own forward that compute a known function
_KNOWN = {
    ("timm", "BatchNormAct2d"): "bnact2d",
    ("timm", "LayerNorm"): "ln",
    ("timm", "LayerNorm2d"): "ln2d",
    ("torchvision", "LayerNorm2d"): "ln2d",
}
_BASES = ((nn.Conv2d, "conv2d"), (nn.Linear, "linear"), (nn.BatchNorm2d, "bn2d"), (nn.BatchNorm1d, "bn1d"),
          (nn.LayerNorm, "ln"))


def type_name(mod) -> str:
    """The class name; qualified (``timm.layers.norm.LayerNorm``) when a torch.nn layer has the same name."""
    t = type(mod)
    same = getattr(nn, t.__name__, None)
    return t.__name__ if same is None or same is t else f"{t.__module__}.{t.__qualname__}"


def layer_kind(mod) -> str | None:
    """"conv2d", "linear", "bn1d", "bn2d", "bnact2d", "ln", "ln2d", or None (S2H has no layer for it).

    S2H layers report the kind of the layer they replaced.
    """
    t = type(mod)
    kind = getattr(mod, "s2h_kind", None)
    if kind is not None:
        return kind
    known = _KNOWN.get((t.__module__.split(".")[0], t.__name__))
    if known is not None:
        return known
    for base, kind in _BASES:
        if isinstance(mod, base):
            return kind if t.forward is base.forward else None
    return None
