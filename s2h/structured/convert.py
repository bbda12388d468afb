"""``s2h.convert``: find the dependency groups, reorder, swap in S2H layers, wrap in an :class:`S2HModel`."""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from . import attention
from .attention_timm import s2h_timm_attention
from .flops import FlopsTable, LayerCost, flops_of
from .groups import KeptGroup, ModelOutputError, find_groups, reorder_channels, trace_errors
from .kinds import layer_kind
from .layers import (
    S2H_LAYER_TYPES,
    S2HBatchNorm1d,
    S2HBatchNorm2d,
    S2HConv2d,
    S2HLayerNorm,
    S2HLayerNorm2d,
    S2HLinear,
    swap_modules,
)
from .masks import ChannelSpec, MaskState
from .model import HARD_WIDTHS, S2HModel
from .report import build_report

__all__ = ["convert"]

_REPLACE = {"conv2d": S2HConv2d, "linear": S2HLinear, "bn1d": S2HBatchNorm1d, "bn2d": S2HBatchNorm2d,
            "bnact2d": S2HBatchNorm2d, "ln": S2HLayerNorm, "ln2d": S2HLayerNorm2d}
_PLAIN = {"conv2d": nn.Conv2d, "linear": nn.Linear, "bn1d": nn.BatchNorm1d, "bn2d": nn.BatchNorm2d,
          "bnact2d": nn.BatchNorm2d, "ln": nn.LayerNorm, "ln2d": nn.LayerNorm}


def _replace_modules(model: nn.Module, grouped_norms: set[str]) -> dict[str, nn.Module]:
    """Swap conv/linear/BN (and grouped LayerNorms) for S2H layers everywhere they are referenced."""
    new_of: dict[nn.Module, nn.Module] = {}
    by_name: dict[str, nn.Module] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, S2H_LAYER_TYPES):
            by_name[name] = mod
            continue
        if mod in new_of:
            by_name[name] = new_of[mod]
            continue
        kind = layer_kind(mod)
        if kind is None:
            continue
        if kind in ("ln", "ln2d") and (name not in grouped_norms or len(mod.normalized_shape) != 1):
            continue
        new = _REPLACE[kind].from_module(mod)
        if type(mod) is not _PLAIN[kind]:  # a subclass (timm's): exported as the user's class
            new.keep_plain_type(mod, post=("drop", "act") if kind == "bnact2d" else ())
        new_of[mod] = new
        by_name[name] = new
    swap_modules(model, new_of)
    return by_name


def _check_output(out) -> None:
    if isinstance(out, torch.Tensor):
        return
    what = type(out).__name__
    raise ModelOutputError(
        f"s2h.convert: the model returns a {what}, not one tensor. s2h.convert traces the channels that "
        "reach the output and the S2H trainer computes its loss on the logits, so the model must return one "
        "tensor of logits. Wrap it so that it does, e.g. s2h.models.SelectOutput(model, 0) for a tuple "
        "(or SelectOutput(model, 'logits') for a dict), and convert the wrapper.")


def _check_args(model, target_flops, divisor, temperature, hard_width):
    if not isinstance(model, nn.Module):
        raise TypeError(f"s2h.convert: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, S2HModel):
        raise ValueError("s2h.convert: the model is already an S2HModel")
    if layer_kind(model) is not None:
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

    Every dependency group S2H supports is pruned; the others are left dense and listed, with the
    reason, in the conversion report (``s2h.structured.report.report_of(model)``, ``config["report"]``).
    The FLOPs are the whole model's; a warning says so when ``target_flops`` is below the lowest
    reachable fraction. ``strict=True`` raises a ValueError naming the module instead, on the first
    group S2H cannot prune. A model that cannot be traced raises a RuntimeError naming the module; a
    model that does not return one tensor a TypeError.
    """
    _check_args(model, target_flops, divisor, temperature, hard_width)
    inputs = _example_tuple(example_inputs)
    _, ignored_names = _resolve_ignored(model, ignored_layers)  # names, against the caller's model
    if not inplace:
        model = copy.deepcopy(model)
    ignored, _ = _resolve_ignored(model, ignored_names or None)
    # Transformers: S2H attention modules (torchvision's, s2h's, timm's), head groups
    plan = attention.prepare(model, ignored, divisor, converters=(s2h_timm_attention,))
    kept: list[KeptGroup] = []
    found = find_groups(model, inputs, ignored + plan.ignored, divisor, strict=strict, kept=kept,
                        check_output=_check_output)
    groups = plan.merge(model, found)
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
        s2h_model = _wrap(model, inputs, plan, groups, kept, state, config)
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
            if m.kind in ("in", "gin"):
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


def _wrap(model: nn.Module, inputs, plan, groups, kept, state: MaskState, config: dict) -> S2HModel:
    """Per-layer costs from one dense forward (eval, no grad), the S2HModel, a hard forward as a smoke test.

    The MACs FlopCounterMode counts outside the S2H layers (layers S2H does not replace, matmuls of
    attention it does not know) are one fixed cost, so the FLOPs target is over the whole model.
    """
    from torch.utils.flop_counter import FlopCounterMode

    batch = inputs[0].shape[0]
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), trace_errors(model, "the dense forward"), counter:
        costs = plan.record_costs(model, lambda: model(*inputs), batch, groups)  # + attention matmuls
    table = FlopsTable(costs, len(groups))
    dense_w = torch.tensor([g.channels for g in groups], dtype=torch.float64)
    counted = float((table.coef * (table.a_in @ dense_w + table.c_in) * (table.a_out @ dense_w + table.c_out)).sum())
    other = counter.get_total_flops() / 2.0 / batch - counted
    if other > 0.5:
        costs.append(LayerCost("<other layers>", other, None, None, 1, 1))
        table = FlopsTable(costs, len(groups))
    report = build_report(groups, kept, costs, table, lambda w: flops_of(w, **table.tensors()),
                          config["target_flops"])
    config["report"] = report.as_dict()
    if not report.reachable:
        warnings.warn(f"s2h.convert: target_flops={config['target_flops']} is not reachable: with the dependency "
                      f"groups S2H can prune, the lowest FLOPs is {100 * report.min_fraction:.1f}% of the dense "
                      "model's (see model.report() / s2h.structured.report.report_of(model) for the groups "
                      "left dense and why)", stacklevel=3)
    s2h_model = S2HModel(model, groups, state, costs, config)
    with torch.no_grad():
        s2h_model.update_masks()
        with s2h_model.branch("hard"), trace_errors(model, "the hard-branch forward (narrower activations)"):
            model(*inputs)
    state.clear()
    return s2h_model
