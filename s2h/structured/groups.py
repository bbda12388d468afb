"""Dependency groups (Torch-Pruning's ``DependencyGraph``) and the importance reorder.

A group is a set of channel dimensions that must be pruned together: the output channels of
every conv/linear feeding one residual sum, the norms on them, the input channels of every
consumer. Torch-Pruning traces the model and returns, for each member, the indices the group's
channels occupy in it, with the root index each one comes from. S2H turns that into
:class:`~s2h.structured.masks.Segment` s: group ``g`` occupies ``[start, start + C*repeat)`` of a dimension,
channel ``j`` at ``start + j*repeat`` — an offset behind a concat, ``repeat > 1`` behind a flatten.
Any other mapping (channel shuffle, split, slice) is refused with a clear error.

Before training, :func:`reorder_channels` permutes each group's channels by the L1 norm of its
producers' filters, descending, through every member — the function is unchanged, and the hard
branch's prefix keeps the most important channels.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from .kinds import LAYER_NORM_KINDS, NORM_KINDS, layer_kind, type_name
from .masks import Segment

__all__ = ["GroupInfo", "KeptGroup", "Member", "ModelOutputError", "UnsupportedGroup", "find_groups", "reorder_channels", "trace_errors"]


@dataclass
class Member:
    """One channel dimension of one module in a group.

    ``kind``: "out" (conv/linear output channels), "in" (conv/linear input channels),
    "norm" (a BatchNorm/LayerNorm's channels), "depthwise" (a depthwise conv: input = output).
    ``segment`` says where the group's channels sit in this dimension.
    """

    module: str
    kind: str
    segment: Segment


@dataclass
class GroupInfo:
    """A dependency group: ``channels`` channels in ``channels // divisor`` buckets."""

    name: str
    channels: int
    divisor: int
    members: list[Member] = field(default_factory=list)

    @property
    def buckets(self) -> int:
        return self.channels // self.divisor

    @property
    def has_norm(self) -> bool:
        return any(m.kind == "norm" for m in self.members)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "channels": self.channels, "divisor": self.divisor,
                "buckets": self.buckets,
                "members": [(m.module, m.kind) for m in self.members]}


def _tp():
    try:
        import torch_pruning as tp
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ImportError("s2h.convert needs Torch-Pruning: pip install torch-pruning") from e
    return tp


@contextlib.contextmanager
def trace_errors(model: nn.Module, what: str, passthrough: tuple[type, ...] = ()):
    """Re-raise an exception from a forward as an error naming the module that was running
    (exceptions of the ``passthrough`` types propagate unchanged)."""
    stack: list[str] = []
    names = {m: n for n, m in model.named_modules()}

    def pre(mod, _inp):
        stack.append(names.get(mod, type(mod).__name__))

    def post(mod, _inp, _out):
        if stack:
            stack.pop()

    handles = [m.register_forward_pre_hook(pre) for m in model.modules()]
    handles += [m.register_forward_hook(post) for m in model.modules()]
    try:
        yield
    except passthrough:
        raise
    except Exception as e:
        where = f"module '{stack[-1] or '<root>'}' ({type_name(model.get_submodule(stack[-1]))})" if stack else "the model"
        raise RuntimeError(f"s2h.convert: {what} failed in {where}: {type(e).__name__}: {e}") from e
    finally:
        for h in handles:
            h.remove()


class ModelOutputError(TypeError):
    """The model's output is not what s2h.convert needs (raised by ``check_output``, never wrapped)."""


class UnsupportedGroup(ValueError):
    """A dependency group S2H cannot prune: ``root`` names the group, ``reason`` says why (one line)."""

    def __init__(self, message: str, root: str, reason: str, module: str | None = None):
        super().__init__(message)
        self.root, self.reason, self.module = root, reason, module


@dataclass
class KeptGroup:
    """A dependency group left dense (``s2h.convert(strict=False)``): why, and its modules."""

    root: str
    channels: int
    reason: str
    modules: list[str] = field(default_factory=list)


def _unsupported(name: str, module: Any, root: str, reason: str) -> UnsupportedGroup:
    return UnsupportedGroup(
        f"s2h.convert: module '{name}' ({type_name(module)}) is in the dependency group rooted at "
        f"'{root}', and S2H cannot prune it: {reason}. Pass '{root}' in ignored_layers (or strict=False) "
        "to leave that group unpruned.", root, f"'{name}' ({type_name(module)}): {reason}", name)


def _segment(name, module, root, channels, idxs, root_idxs) -> Segment:
    """The Segment for one member, or an error when the mapping is not an offset/repeat block."""
    pairs = sorted(zip(idxs, root_idxs))
    n = len(pairs)
    if n % channels:
        raise _unsupported(name, module, root, f"its {n} entries do not split evenly over {channels} channels")
    repeat = n // channels
    start = pairs[0][0]
    for pos, (idx, r) in enumerate(pairs):
        if idx != start + pos or r != pos // repeat:
            raise _unsupported(
                name, module, root,
                "the group's channels do not map to one contiguous block in order "
                "(a split, slice or shuffle of channels)")
    return Segment(group=-1, start=start, channels=channels, repeat=repeat)


def _trace(model: nn.Module, inputs, check_output) -> Any:
    tp = _tp()
    modes = {m: m.training for m in model.modules()}
    grads = {p: p.requires_grad for p in model.parameters()}

    def forward(m, x):
        out = m(*x)
        if check_output is not None:
            check_output(out)
        return out

    try:
        for p in model.parameters():
            p.requires_grad_(True)
        with torch.enable_grad(), trace_errors(model, "tracing with Torch-Pruning", passthrough=(ModelOutputError,)):
            return tp.DependencyGraph().build_dependency(model, example_inputs=inputs, forward_fn=forward,
                                                         verbose=False)
    finally:
        for m, t in modes.items():
            m.training = t
        for p, g in grads.items():
            p.requires_grad_(g)


def _has_pruning_op(self, dep, idxs) -> bool:
    """``Group.has_pruning_op`` in O(1): a set of (target, handler, idxs) kept up to date with the group."""
    seen = self.__dict__.setdefault("_s2h_seen", set())
    n = self.__dict__.get("_s2h_n", 0)
    for d, i in self._group[n:]:
        seen.add((d.target, d.handler, tuple(i)))
    self._s2h_n = len(self._group)
    return (dep.target, dep.handler, tuple(idxs)) in seen


def _add_and_merge(self, dep, idxs) -> None:
    """``Group.add_and_merge`` (same result) with the items indexed by (target, handler)."""
    pos = self.__dict__.setdefault("_s2h_pos", {})
    key = (dep.target, dep.handler)
    hit = pos.get(key)
    if hit is None:
        merged = list(idxs)
        pos[key] = (len(self._group), merged, {i.idx for i in merged})
        self._group.append(_tp()._helpers.GroupItem(dep=dep, idxs=merged))
        return
    _, merged, seen = hit
    for index in idxs:
        if index.idx not in seen:
            merged.append(index)
            seen.add(index.idx)


@contextlib.contextmanager
def _fast_group_search():
    """Torch-Pruning's group search scans the whole group for every edge it follows and every
    item it merges (quadratic: 27 s for MobileViTv2); swap in indexed versions while s2h builds
    the groups."""
    group_cls = _tp().dependency.group.Group
    originals = group_cls.has_pruning_op, group_cls.add_and_merge
    group_cls.has_pruning_op, group_cls.add_and_merge = _has_pruning_op, _add_and_merge
    try:
        yield
    finally:
        group_cls.has_pruning_op, group_cls.add_and_merge = originals


def find_groups(model: nn.Module, example_inputs, ignored_layers: Sequence[nn.Module] = (),
                divisor: int = 1, strict: bool = True, kept: list[KeptGroup] | None = None,
                check_output=None) -> list[GroupInfo]:
    """Trace ``model`` with Torch-Pruning and return its prunable dependency groups.

    Groups reaching the model's output (the classifier's output channels) and groups containing
    an ignored layer's output channels are left out; the network input has no producer, so it is
    never in a group. A group S2H cannot prune raises an :class:`UnsupportedGroup` (``strict``) or
    is appended to ``kept`` and left dense. The model's train/eval mode and ``requires_grad`` flags
    are restored. ``check_output(out)`` is called on the traced forward's output.
    """
    tp = _tp()
    names = {m: n for n, m in model.named_modules()}
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    dg = _trace(model, inputs, check_output)
    with _fast_group_search():
        raw = list(dg.get_all_groups(ignored_layers=list(ignored_layers),
                                     root_module_types=[nn.modules.conv._ConvNd, nn.Linear]))
    fine_ops = (tp.ops._ElementWiseOp, tp.ops._ReshapeOp, tp.ops._ConcatOp)
    order = {n: i for i, n in enumerate(names.values())}
    groups: list[GroupInfo] = []
    for g in raw:
        root = names.get(g[0].dep.target.module, str(g[0].dep.target.module))
        channels = len(g[0].idxs)
        if any(_reaches_output(dg, item.dep, fine_ops) for item in g.items):
            continue  # the group's channels are (part of) the model's output: never pruned
        try:
            info = _group_info(dg, g, names, root, channels, divisor, fine_ops, order)
        except UnsupportedGroup as e:
            if strict:
                raise
            mods = sorted({names[i.dep.target.module] for i in g.items if i.dep.target.module in names},
                          key=lambda n: order[n])
            if kept is not None:
                kept.append(KeptGroup(root, channels, e.reason, mods))
            continue
        if info is not None:
            groups.append(info)
    groups.sort(key=lambda g: order[g.name])
    for gi, g in enumerate(groups):
        for m in g.members:
            m.segment = dataclasses.replace(m.segment, group=gi)
    return groups


def _group_info(dg, g, names, root, channels, divisor, fine_ops, order) -> GroupInfo | None:
    """The GroupInfo of one Torch-Pruning group (None: one bucket), or an UnsupportedGroup."""
    ops = _tp().ops
    members: dict[tuple[str, str], Member] = {}
    conv_groups = 1  # lcm of the grouped convolutions' groups: the group is folded by it
    for item in g.items:
        dep = item.dep
        mod = dep.target.module
        if isinstance(mod, fine_ops):
            continue
        if isinstance(mod, (ops._SplitOp, ops._SliceOp, ops._UnbindOp, ops._ExpandOp)):
            what = type(mod).__name__.strip("_").replace("Op", "").lower()
            raise UnsupportedGroup(
                f"s2h.convert: the dependency group rooted at '{root}' passes through a {what} of the channel "
                "dimension (torch.split/chunk/unbind/slicing/expand), which a prefix of channels cannot follow. "
                f"Pass '{root}' in ignored_layers (or strict=False) to leave that group unpruned.",
                root, f"a {what} of the channels (torch.split/chunk/unbind/slicing/expand)")
        name = names.get(mod, None)
        if isinstance(mod, nn.Parameter) or name is None:
            pname = dg._param_to_name.get(mod, type(mod).__name__)
            raise _unsupported(pname, mod, root, "a bare nn.Parameter (or an unknown op) holds the group's channels")
        kind = _member_kind(name, mod, root, dg.is_out_channel_pruning_fn(dep.handler))
        if kind in ("out", "gin") and getattr(mod, "groups", 1) > 1:
            conv_groups = math.lcm(conv_groups, mod.groups)
        seg = _segment(name, mod, root, channels, item.idxs, item.root_idxs)
        members.setdefault((name, kind), Member(module=name, kind=kind, segment=seg))
    mem = sorted(members.values(), key=lambda m: order[m.module])
    if conv_groups > 1:
        if channels % conv_groups:
            raise UnsupportedGroup(f"s2h.convert: group '{root}': {channels} channels do not split over "
                                   f"{conv_groups} convolution groups", root,
                                   f"{channels} channels do not split over {conv_groups} convolution groups")
        mem, channels = _fold(mem, conv_groups), channels // conv_groups
    d = _group_divisor(channels, divisor)
    if channels // d < 2:
        return None  # a single bucket: nothing to choose
    # named after its first producer in module order (the stem conv, a block's first conv, ...)
    gname = next(m.module for m in mem if m.kind in ("out", "depthwise"))
    return GroupInfo(name=gname, channels=channels, divisor=d, members=mem)


def _fold(members: list[Member], parts: int) -> list[Member]:
    """Each member's segment split in ``parts`` equal segments: channel j of the folded group is
    channel j of every convolution group (the same channels pruned in every group)."""
    out = []
    for m in members:
        s = m.segment
        c = s.channels // parts
        out += [Member(m.module, m.kind, Segment(-1, s.start + i * c * s.repeat, c, s.repeat)) for i in range(parts)]
    return out


def _member_kind(name: str, mod: nn.Module, root: str, is_out: bool) -> str:
    """"out", "in", "gin" (a grouped conv's input), "depthwise" or "norm"; an UnsupportedGroup otherwise."""
    kind = layer_kind(mod)
    if kind == "conv2d":
        depthwise = mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels
        if depthwise:
            return "depthwise"
        if is_out:
            return "out"
        return "gin" if mod.groups > 1 else "in"
    if kind == "linear":
        return "out" if is_out else "in"
    if kind in NORM_KINDS:
        if kind in LAYER_NORM_KINDS and len(mod.normalized_shape) != 1:
            raise _unsupported(name, mod, root, "LayerNorm over more than one dimension")
        return "norm"
    if isinstance(mod, nn.GroupNorm):
        raise _unsupported(name, mod, root, "GroupNorm normalises over groups of channels; pruning them is not exact")
    raise _unsupported(name, mod, root, "no S2H replacement exists for this layer type (or it overrides forward)")


def _reaches_output(dg, dep, fine_ops) -> bool:
    ops = _tp().ops
    mod, node = dep.target.module, dep.target
    if isinstance(mod, ops._OutputOp):
        return True
    carries_group = isinstance(mod, fine_ops) or dg.is_out_channel_pruning_fn(dep.handler)
    return not node.outputs and carries_group


def _group_divisor(channels: int, divisor: int) -> int:
    """The bucket size for a group: ``divisor`` when it divides the channels, else their gcd."""
    return math.gcd(int(channels), int(divisor))


# --------------------------------------------------------------------------------------------
# Importance reorder
# --------------------------------------------------------------------------------------------

_PARAMS_BY_KIND = {
    # (attribute, axis) pairs permuted for each member kind
    "out": (("weight", 0), ("bias", 0)),
    "depthwise": (("weight", 0), ("bias", 0)),
    "in": (("weight", 1),),
    "gin": (("weight", 1),),  # a grouped conv: axis 1 holds one convolution group's channels
    "norm": (("weight", 0), ("bias", 0), ("running_mean", 0), ("running_var", 0)),
}


def group_importance(model: nn.Module, group: GroupInfo, _rows: dict | None = None) -> torch.Tensor:
    """L1 norm of each channel's filters, summed over the group's producers (root order)."""
    rows = {} if _rows is None else _rows  # module name -> L1 norm of each output row
    imp = torch.zeros(group.channels, dtype=torch.float64)
    for m in group.members:
        if m.kind not in ("out", "depthwise"):
            continue
        r = rows.get(m.module)
        if r is None:
            w = model.get_submodule(m.module).weight.detach()
            r = rows[m.module] = w.abs().reshape(w.shape[0], -1).sum(1).double().cpu()
        s = m.segment
        imp += r.narrow(0, s.start, s.channels * s.repeat).view(s.channels, s.repeat).sum(1)
    return imp


@torch.no_grad()
def reorder_channels(model: nn.Module, groups: Sequence[GroupInfo]) -> list[torch.Tensor]:
    """Permute every group's channels by importance, descending, in every member. Returns the perms.

    Channel ``j`` of the group after the call is channel ``perm[j]`` before it. The function
    computed by the model is unchanged. Row norms do not change when other groups permute a
    layer's inputs, so every permutation is computed first, and each tensor is gathered once.
    """
    rows: dict = {}
    perms = [torch.sort(group_importance(model, g, rows), descending=True, stable=True).indices for g in groups]
    sources: dict[tuple[str, str, int], torch.Tensor] = {}
    for g, perm in zip(groups, perms):
        for m in g.members:
            mod = model.get_submodule(m.module)
            s = m.segment
            if m.kind == "gin":  # the same permutation in every convolution group: apply it once
                if s.start >= mod.in_channels // mod.groups:
                    continue
            block = (s.start + torch.arange(s.channels * s.repeat).view(s.channels, s.repeat)[perm]).reshape(-1)
            for attr, axis in _PARAMS_BY_KIND[m.kind]:
                t = getattr(mod, attr, None)
                if t is None:
                    continue
                key = (m.module, attr, axis)
                src = sources.get(key)
                if src is None:
                    src = sources[key] = torch.arange(t.shape[axis])
                src[s.start : s.stop] = block
    for (name, attr, axis), src in sources.items():
        t = getattr(model.get_submodule(name), attr)
        t.data = t.data.index_select(axis, src.to(t.device))
    return perms
