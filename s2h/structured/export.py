"""Export the hard network as a plain model.

``export`` returns the wrapped network with every S2H layer (and S2H attention module) replaced by
its plain module, ``layer.to_plain(keep)``: ``nn.Conv2d`` / ``nn.Linear`` / ``nn.BatchNorm1d/2d``
/ ``nn.LayerNorm`` / attention holding only the kept channels (the hard branch's slices and the
hard branch's BatchNorm running statistics). Its outputs equal the hard branch's and its FLOPs
equal ``hard_flops()``. Export depends on the layers only: any module with a ``to_plain`` method
is replaced.
"""
from __future__ import annotations

import copy
from typing import Sequence

from torch import nn

from .layers import swap_modules

__all__ = ["export", "keep_list"]


def keep_list(model, widths) -> list[int]:
    """Keep counts in group order: ``model``'s current ones, or ``widths`` (dict by name or list), checked."""
    if widths is None:
        return list(model.keep_counts().values())
    names = [g.name for g in model.groups]
    if isinstance(widths, dict):
        unknown = set(widths) - set(names)
        if unknown:
            raise ValueError(f"export: widths names unknown groups {sorted(unknown)}")
        missing = set(names) - set(widths)
        if missing:
            raise ValueError(f"export: widths lacks groups {sorted(missing)}")
        keep = [int(widths[n]) for n in names]
    else:
        keep = [int(k) for k in widths]
        if len(keep) != len(names):
            raise ValueError(f"export: widths has {len(keep)} entries for {len(names)} groups")
    for g, k in zip(model.groups, keep):
        if not (1 <= k <= g.channels):
            raise ValueError(f"export: width {k} of group '{g.name}' is outside [1, {g.channels}]")
    return keep


def export(model, widths: dict[str, int] | Sequence[int] | None = None) -> nn.Module:
    """The hard network of ``model`` (an S2HModel) as a plain module with fewer channels.

    ``widths``: kept channels per group (dict by group name, or a list in group order); default
    the current keep counts. The result carries ``s2h_widths`` (group name -> width) and
    ``s2h_config`` so that :func:`s2h.save` can store it.
    """
    keep = keep_list(model, widths)
    net = copy.deepcopy(model.model)  # the copy's MaskState starts empty (no autograd graph copied)
    replaced: dict[nn.Module, nn.Module] = {}
    for mod in net.modules():
        if hasattr(mod, "to_plain") and mod not in replaced:
            replaced[mod] = mod.to_plain(keep)
    swap_modules(net, replaced)
    net.s2h_widths = {g.name: k for g, k in zip(model.groups, keep)}
    net.s2h_config = copy.deepcopy(model.config)
    return net
