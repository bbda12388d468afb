"""Export the hard network as a plain model; save and load S2H and exported models.

``export`` returns the wrapped network with every S2H layer replaced by a plain ``nn.Conv2d`` /
``nn.Linear`` / ``nn.BatchNorm1d/2d`` / ``nn.LayerNorm`` holding only the kept channels (the hard
branch's slices, and the hard branch's BatchNorm running statistics). Its outputs equal the hard
branch's and its FLOPs equal ``hard_flops()``.

Files hold tensors and plain Python values only (``torch.load(weights_only=True)`` reads them):
the state dict, the conversion settings (example input shapes, target, divisor, ...) and, for an
exported model, the kept width per group. Loading rebuilds the structure from the original
architecture — ``model_factory()`` — and those widths; no module is pickled.
"""
from __future__ import annotations

import copy
import itertools
import os
from typing import Callable, Sequence

import torch
from torch import nn

from .layers import (
    S2H_LAYER_TYPES,
    S2HBatchNorm1d,
    S2HBatchNorm2d,
    S2HConv2d,
    S2HLayerNorm,
    S2HLinear,
    _take,
    swap_modules,
)

__all__ = ["export", "save", "load"]

FORMAT_VERSION = 1


def _keep_list(model, widths) -> list[int]:
    if widths is None:
        return list(model._ensure_masks(grad=False).keep_list)
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


@torch.no_grad()
def _plain(layer: nn.Module, keep: Sequence[int]) -> nn.Module:
    t = next(itertools.chain(layer.parameters(), layer.buffers()), None)
    dev = t.device if t is not None else torch.device("cpu")
    sel_out = layer.out_spec.kept(keep, dev) if layer.out_spec is not None else None
    sel_in = layer.in_spec.kept(keep, dev) if layer.in_spec is not None else None
    if isinstance(layer, S2HConv2d):
        w = _take(layer.weight, 0, sel_out)
        b = _take(layer.bias, 0, sel_out)
        if layer.depthwise:
            groups = w.shape[0]
            cin = groups
        else:
            groups = layer.groups
            w = _take(w, 1, sel_in)
            cin = w.shape[1] * groups
        new = nn.Conv2d(cin, w.shape[0], layer.kernel_size, layer.stride, layer.padding, layer.dilation, groups,
                        b is not None, layer.padding_mode, device=w.device, dtype=w.dtype)
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    elif isinstance(layer, S2HLinear):
        w = _take(_take(layer.weight, 0, sel_out), 1, sel_in)
        b = _take(layer.bias, 0, sel_out)
        new = nn.Linear(w.shape[1], w.shape[0], b is not None, device=w.device, dtype=w.dtype)
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    elif isinstance(layer, (S2HBatchNorm1d, S2HBatchNorm2d)):
        cls = nn.BatchNorm2d if isinstance(layer, S2HBatchNorm2d) else nn.BatchNorm1d
        n = layer.out_spec.kept_size(keep) if layer.out_spec is not None else layer.num_features
        new = cls(n, layer.eps, layer.momentum, layer.affine, layer.track_running_stats, device=dev,
                  dtype=layer.weight.dtype if layer.weight is not None else None)
        if layer.affine:
            new.weight.copy_(_take(layer.weight, 0, sel_out))
            new.bias.copy_(_take(layer.bias, 0, sel_out))
        if layer.track_running_stats:
            rm, rv, nbt = layer._stats("hard")
            new.running_mean.copy_(_take(rm, 0, sel_out))
            new.running_var.copy_(_take(rv, 0, sel_out))
            new.num_batches_tracked.copy_(nbt)
    elif isinstance(layer, S2HLayerNorm):
        n = layer.out_spec.kept_size(keep) if layer.out_spec is not None else layer.num_features
        new = nn.LayerNorm(n, layer.eps, layer.elementwise_affine, layer.bias is not None, device=dev,
                           dtype=layer.weight.dtype if layer.weight is not None else None)
        if layer.weight is not None:
            new.weight.copy_(_take(layer.weight, 0, sel_out))
        if layer.bias is not None:
            new.bias.copy_(_take(layer.bias, 0, sel_out))
    else:  # pragma: no cover
        raise TypeError(f"export: unexpected layer {type(layer).__name__}")
    new.train(layer.training)
    return new


def export(model, widths=None) -> nn.Module:
    """The hard network of ``model`` (an S2HModel) as a plain module with fewer channels.

    ``widths``: kept channels per group (dict by group name, or a list in group order); default
    the current keep counts. The result carries ``s2h_widths`` (group name -> width) and
    ``s2h_config`` so that :func:`save` can store it.
    """
    keep = _keep_list(model, widths)
    net = copy.deepcopy(model.model)  # the copy's MaskState starts empty (no autograd graph copied)
    replaced: dict[nn.Module, nn.Module] = {}
    for _, mod in net.named_modules():
        if isinstance(mod, S2H_LAYER_TYPES) and mod not in replaced:
            replaced[mod] = _plain(mod, keep)
        elif hasattr(mod, "s2h_export") and mod not in replaced:  # S2H attention (s2h/transformers.py)
            replaced[mod] = mod.s2h_export(keep)
    swap_modules(net, replaced)
    net.s2h_widths = {g.name: k for g, k in zip(model.groups, keep)}
    net.s2h_config = copy.deepcopy(model.config)
    return net


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Save an S2HModel (weights, u, per-branch BN statistics) or a model returned by ``export``."""
    from .model import S2HModel

    if isinstance(model, S2HModel):
        payload = {"format": "s2h", "version": FORMAT_VERSION, "config": model.config,
                   "state_dict": model.state_dict()}
    elif hasattr(model, "s2h_widths") and hasattr(model, "s2h_config"):
        payload = {"format": "s2h-exported", "version": FORMAT_VERSION, "config": model.s2h_config,
                   "widths": dict(model.s2h_widths), "state_dict": model.state_dict()}
    else:
        raise ValueError(f"s2h.save: expected an S2HModel or a model from S2HModel.export(), "
                         f"got {type(model).__name__}")
    torch.save(payload, path)


def load(path: str | os.PathLike, model_factory: Callable[[], nn.Module], map_location="cpu") -> nn.Module:
    """Load what :func:`save` wrote. ``model_factory()`` builds the original (unconverted) architecture.

    Returns an S2HModel, or the exported plain model with the saved widths per group.
    """
    from .model import convert

    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") not in ("s2h", "s2h-exported"):
        raise ValueError(f"s2h.load: {os.fspath(path)!r} is not a file written by s2h.save")
    if payload.get("version") != FORMAT_VERSION:
        raise ValueError(f"s2h.load: unsupported format version {payload.get('version')!r}")
    cfg = payload["config"]
    base = model_factory()
    if not isinstance(base, nn.Module):
        raise TypeError(f"s2h.load: model_factory() must return an nn.Module, got {type(base).__name__}")
    dev = next((p.device for p in base.parameters()), torch.device("cpu"))
    inputs = tuple(torch.zeros(shape, dtype=getattr(torch, dt), device=dev) for shape, dt in cfg["example_inputs"])
    m = convert(base, inputs, target_flops=cfg["target_flops"], ignored_layers=cfg["ignored_layers"] or None,
                divisor=cfg["divisor"], temperature=cfg["temperature"], hard_width=cfg["hard_width"],
                reorder=False, inplace=True)
    found = [[g.name, g.channels] for g in m.groups]
    if found != [list(x) for x in cfg["groups"]]:
        raise ValueError("s2h.load: model_factory() builds an architecture whose dependency groups differ from "
                         f"the saved model's ({len(found)} vs {len(cfg['groups'])} groups)")
    if payload["format"] == "s2h":
        m.load_state_dict(payload["state_dict"])
        return m
    net = m.export(widths=payload["widths"])
    net.load_state_dict(payload["state_dict"])
    return net
