"""``s2h.convert``: find the dependency groups, reorder, swap in S2H layers, wrap in an :class:`S2HModel`."""
from __future__ import annotations

import copy

import torch
from torch import nn

from . import attention
from .groups import find_groups, reorder_channels, trace_errors
from .layers import (
    S2H_LAYER_TYPES,
    S2HBatchNorm1d,
    S2HBatchNorm2d,
    S2HConv2d,
    S2HLayerNorm,
    S2HLinear,
    swap_modules,
)
from .masks import ChannelSpec, MaskState
from .model import HARD_WIDTHS, S2HModel

__all__ = ["convert"]

_REPLACE = {nn.Conv2d: S2HConv2d, nn.Linear: S2HLinear, nn.BatchNorm1d: S2HBatchNorm1d,
            nn.BatchNorm2d: S2HBatchNorm2d, nn.LayerNorm: S2HLayerNorm}


def _replace_modules(model: nn.Module, grouped_norms: set[str]) -> dict[str, nn.Module]:
    """Swap conv/linear/BN (and grouped LayerNorms) for S2H layers everywhere they are referenced."""
    new_of: dict[nn.Module, nn.Module] = {}
    by_name: dict[str, nn.Module] = {}
    for name, mod in model.named_modules():
        cls = _REPLACE.get(type(mod))
        if cls is None:
            if isinstance(mod, S2H_LAYER_TYPES):
                by_name[name] = mod
            continue
        if cls is S2HLayerNorm and (name not in grouped_norms or len(mod.normalized_shape) != 1):
            continue
        new = cls.from_module(mod)
        new_of[mod] = new
        by_name[name] = new
    swap_modules(model, new_of)
    return by_name


def _check_args(model, target_flops, divisor, temperature, hard_width):
    if not isinstance(model, nn.Module):
        raise TypeError(f"s2h.convert: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, S2HModel):
        raise ValueError("s2h.convert: the model is already an S2HModel")
    if type(model) in _REPLACE:
        raise ValueError("s2h.convert: the model is a single layer; wrap it in a network")
    if not (isinstance(target_flops, (int, float)) and 0.0 < float(target_flops) <= 1.0):
        raise ValueError(f"s2h.convert: target_flops must be a fraction in (0, 1], got {target_flops!r}")
    if not (isinstance(divisor, int) and divisor >= 1):
        raise ValueError(f"s2h.convert: divisor must be an int >= 1, got {divisor!r}")
    if not (isinstance(temperature, (int, float)) and float(temperature) > 0):
        raise ValueError(f"s2h.convert: temperature must be > 0, got {temperature!r}")
    if hard_width not in HARD_WIDTHS:
        raise ValueError(f"s2h.convert: hard_width must be one of {HARD_WIDTHS}, got {hard_width!r}")


def _example_tuple(example_inputs) -> tuple[torch.Tensor, ...]:
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TypeError("s2h.convert: example_inputs must be a tensor or a tuple of tensors")
    if inputs[0].dim() == 0:
        raise ValueError("s2h.convert: example_inputs[0] needs a batch dimension")
    return inputs


def _resolve_ignored(model: nn.Module, ignored_layers) -> tuple[list[nn.Module], list[str]]:
    if ignored_layers is None:
        return [], []
    if isinstance(ignored_layers, (str, nn.Module)):
        ignored_layers = [ignored_layers]  # one name (not its characters), one module
    names = {m: n for n, m in model.named_modules()}
    mods, out_names = [], []
    for item in ignored_layers:
        if isinstance(item, str):
            try:
                mod = model.get_submodule(item)
            except AttributeError as e:
                raise ValueError(f"s2h.convert: ignored_layers names '{item}', which is not a submodule") from e
            mods.append(mod)
            out_names.append(item)
        elif isinstance(item, nn.Module):
            if item not in names:
                raise ValueError(f"s2h.convert: an ignored layer ({type(item).__name__}) is not part of the model")
            mods.append(item)
            out_names.append(names[item])
        else:
            raise TypeError(f"s2h.convert: ignored_layers holds modules or names, got {type(item).__name__}")
    # a container ignores every layer in it
    expanded = []
    for m in mods:
        expanded.extend(m.modules())
    return expanded, out_names


def convert(model: nn.Module, example_inputs, target_flops: float = 0.15, ignored_layers=None, divisor: int = 1,
            temperature: float = 1.0, hard_width: str = "threshold", *, reorder: bool = True,
            inplace: bool = False, strict: bool = False) -> S2HModel:
    """Convert ``model`` for S2HPruner: find the dependency groups, reorder, swap in S2H layers.

    * ``example_inputs``: a tensor or tuple of tensors ``model`` accepts; the FLOPs are counted
      per sample at its spatial size.
    * ``target_flops``: the FLOPs budget T as a fraction of the dense model's (``resource_loss``).
    * ``ignored_layers``: modules (or their names) whose output channels stay unpruned; the
      network input and the output (the classifier's classes) are never pruned.
    * ``divisor``: channels per bucket (candidate widths d, 2d, ...); a group whose channel count
      it does not divide uses their gcd. ``temperature``: τ of the softmax over buckets.
    * ``hard_width``: "threshold" (paper: keep buckets with w ≥ mean(w)) or "expected" (ceil(E)).
    * ``reorder``: permute each group's channels by L1 importance, descending (function-preserving).
    * ``inplace``: convert ``model`` itself instead of a deep copy.
    * ``strict``: raise on the first dependency group S2H cannot prune (instead of leaving it
      dense and listing it in ``model.report()``).

    Raises a ValueError naming the module for a layer S2H cannot prune, and a RuntimeError naming
    the module for a model that cannot be traced.
    """
    _check_args(model, target_flops, divisor, temperature, hard_width)
    inputs = _example_tuple(example_inputs)
    _, ignored_names = _resolve_ignored(model, ignored_layers)  # names, against the caller's model
    if not inplace:
        model = copy.deepcopy(model)
    ignored, _ = _resolve_ignored(model, ignored_names or None)
    plan = attention.prepare(model, ignored, divisor)  # Transformers: S2H attention, head groups
    groups = plan.merge(model, find_groups(model, inputs, ignored + plan.ignored, divisor))
    if reorder:
        reorder_channels(model, groups)
    per_mod = _channel_specs(groups)
    grouped_norms = {m.module for g in groups for m in g.members if m.kind == "norm"}
    layers = _replace_modules(model, grouped_norms)
    modes = {m: m.training for m in model.modules()}  # the new layers adopted their originals' modes
    channel_offsets = [0]
    for g in groups:
        channel_offsets.append(channel_offsets[-1] + g.channels)
    state = MaskState(channel_offsets)
    _bind_layers(layers, per_mod, groups, state)
    plan.bind(state, groups)
    for m, t in modes.items():
        m.training = t
    config = {
        "target_flops": float(target_flops), "temperature": float(temperature), "hard_width": hard_width,
        "divisor": int(divisor), "ignored_layers": ignored_names,
        "example_inputs": [[list(t.shape), str(t.dtype).removeprefix("torch.")] for t in inputs],
        "groups": [[g.name, g.channels] for g in groups],
    }
    try:
        s2h_model = _wrap(model, inputs, plan, groups, state, config)
    finally:
        for m, t in modes.items():
            m.training = t
    s2h_model.training = model.training  # the wrapper only: submodules keep their own modes
    return s2h_model


def _channel_specs(groups) -> dict[str, dict]:
    """Per module name: the group segments of its input and output dimensions, and ``soft_out``."""
    per_mod: dict[str, dict] = {}
    for g in groups:
        for m in g.members:
            d = per_mod.setdefault(m.module, {"in": [], "out": [], "soft_out": False})
            if m.kind in ("out", "depthwise", "norm"):
                d["out"].append(m.segment)
                if m.kind != "norm" and not g.has_norm:
                    d["soft_out"] = True
            if m.kind == "in":
                d["in"].append(m.segment)
    return per_mod


def _bind_layers(layers: dict[str, nn.Module], per_mod: dict, groups, state: MaskState) -> None:
    for name, layer in layers.items():
        d = per_mod.get(name, {"in": [], "out": [], "soft_out": False})
        if isinstance(layer, S2HConv2d):
            size_in, size_out = layer.in_channels, layer.out_channels
        elif isinstance(layer, S2HLinear):
            size_in, size_out = layer.in_features, layer.out_features
        else:
            size_in = size_out = layer.num_features
        out_spec = ChannelSpec(size_out, d["out"]) if d["out"] else None
        in_spec = ChannelSpec(size_in, d["in"]) if d["in"] else None
        if isinstance(layer, S2HConv2d) and layer.depthwise:
            in_spec = out_spec
        mask_group = None
        if out_spec is not None and len(out_spec.segments) == 1:
            mask_group = groups[out_spec.segments[0].group].name
        layer.bind(state, in_spec, out_spec, d["soft_out"], mask_group)


def _wrap(model: nn.Module, inputs, plan, groups, state: MaskState, config: dict) -> S2HModel:
    """Per-layer costs from one dense forward (eval, no grad), the S2HModel, a hard forward as a smoke test."""
    batch = inputs[0].shape[0]
    model.eval()
    with torch.no_grad(), trace_errors(model, "the dense forward"):
        costs = plan.record_costs(model, lambda: model(*inputs), batch, groups)  # + attention matmuls
    s2h_model = S2HModel(model, groups, state, costs, config)
    with torch.no_grad():
        s2h_model.update_masks()
        with s2h_model.branch("hard"), trace_errors(model, "the hard-branch forward (narrower activations)"):
            model(*inputs)
    state.clear()
    return s2h_model
