"""``s2h.convert`` and :class:`S2HModel`: a model whose channels are pruned by S2HPruner (DESIGN §2).

::

    m = s2h.convert(torchvision.models.resnet50(), torch.randn(1, 3, 224, 224), target_flops=0.15)
    m.update_masks()                       # once per step: (w, E, keep) for every group, one op call
    with s2h.branch("soft"):  ys = m(x)    # θ⊙w: full width, soft masks after the norms
    with s2h.branch("hard"):  yh = m(x)    # θ<m>: sliced weights, narrower activations
    ys, yh = m.forward_pair(x)             # both, each layer reading its weight once
    r = m.resource_loss()                  # (soft_flops / dense_flops - target)², grad reaches u
    small = m.export()                     # plain nn.Conv2d / nn.Linear / nn.BatchNorm2d, fewer channels
"""
from __future__ import annotations

import copy
import operator
import warnings
from typing import Any, Sequence

import torch
from torch import nn

from s2h_kernels import channel_masks

from . import flops as _flops
from . import transformers as _transformers
from .groups import GroupInfo, find_groups, reorder_channels, trace_errors
from .layers import (
    BRANCHES,
    S2H_LAYER_TYPES,
    ChannelSpec,
    MaskState,
    S2HBatchNorm1d,
    S2HBatchNorm2d,
    S2HConv2d,
    S2HLayerNorm,
    S2HLinear,
    branch,
    current_branch,
    swap_modules,
)

__all__ = ["S2HModel", "convert"]

HARD_WIDTHS = ("threshold", "expected")


class S2HModel(nn.Module):
    """A converted model: the wrapped network (``.model``), one packed mask logit vector ``u``.

    Branch of ``forward``: the innermost ``with s2h.branch(...)`` block, else ``default_branch``
    ("soft" unless you change it). Masks are computed by :meth:`update_masks` once per step and
    cached; ``forward`` recomputes them by itself when ``u`` changed since (an optimiser step, a
    ``load_state_dict``), when nothing is cached, or when the cache was computed without grad and
    grad is now needed.
    """

    def __init__(self, model: nn.Module, groups: list[GroupInfo], state: MaskState, costs,
                 config: dict[str, Any]):
        super().__init__()
        self.model = model
        self.groups = groups
        self.config = config
        self.target_flops = float(config["target_flops"])
        self.temperature = float(config["temperature"])
        self.hard_width = config["hard_width"]
        self.default_branch = "soft"
        dev = next((p.device for p in model.parameters()), torch.device("cpu"))
        # u in the network's floating dtype (a float64 network gets float64 logits)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())
        buckets = [g.buckets for g in groups]
        offsets = [0]
        for b in buckets:
            offsets.append(offsets[-1] + b)
        self.u = nn.Parameter(torch.zeros(offsets[-1], device=dev, dtype=dtype))
        self.register_buffer("group_offsets", torch.tensor(offsets, dtype=torch.int64, device=dev), persistent=False)
        self.register_buffer("group_divisors", torch.tensor([g.divisor for g in groups], dtype=torch.int64, device=dev),
                             persistent=False)
        self.register_buffer("group_channels", torch.tensor([g.channels for g in groups], dtype=torch.int64, device=dev),
                             persistent=False)
        self._unit_divisors = all(g.divisor == 1 for g in groups)
        self._mask_state = state
        table = _flops.FlopsTable(costs, len(groups))
        self.flops_layers = table.names
        for k, t in table.tensors().items():
            self.register_buffer(f"_flops_{k}", t.to(dev), persistent=False)
        self._dense_flops = float(self._flops(self.group_channels))
        object.__setattr__(self, "_pair", {"gm": None, "mode": None})

    # ---------------------------------------------------------------- parameters and masks
    def mask_parameters(self) -> list[nn.Parameter]:
        """``[u]``: the packed mask logits of every group (slice group g with ``group_offsets``)."""
        return [self.u]

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every other trainable parameter (the network's weights)."""
        return [p for p in self.parameters() if p is not self.u and p.requires_grad]

    def _mask_version(self) -> tuple:
        """What the cached masks depend on: u's storage and in-place version, τ, the hard width."""
        return (self.u._version, self.u.data_ptr(), self.u.device, self.temperature, self.hard_width)

    def update_masks(self):
        """Compute ``(w, E, keep)`` for all groups with ONE ``channel_masks`` call and cache them.

        The next soft, hard and paired forwards (and ``soft_flops``/``hard_flops``) use the cache.
        ``w`` and ``E`` share one autograd node: backpropagate through both in one call, or pass
        ``retain_graph=True`` to the first. Call it once per optimisation step (per micro-batch
        when accumulating gradients).
        """
        if self.hard_width not in HARD_WIDTHS:
            raise ValueError(f"S2HModel: hard_width must be one of {HARD_WIDTHS}, got {self.hard_width!r}")
        if not self.groups:  # nothing to prune (everything ignored or unprunable)
            w, e = self.u.new_zeros(0), self.u.new_zeros(0)
            keep = torch.zeros(0, dtype=torch.int64, device=self.u.device)
        else:
            divisors = None if self._unit_divisors else self.group_divisors
            w, e, keep = channel_masks(self.u, self.group_offsets, temperature=self.temperature,
                                       divisors=divisors, hard_width=self.hard_width)
        self._mask_state.set(w, e, keep, version=self._mask_version())
        return w, e, keep

    def _ensure_masks(self, grad: bool = True) -> MaskState:
        """The cached masks, recomputed when stale: u changed, nothing cached, or (``grad``) the
        cache has no autograd graph while grad is enabled for u."""
        st = self._mask_state
        need_graph = grad and torch.is_grad_enabled() and self.u.requires_grad
        stale = st.w is None or st.version != self._mask_version()
        if stale or (need_graph and st.w.grad_fn is None and st.w.numel()):
            with torch.set_grad_enabled(need_graph):
                self.update_masks()
        return st

    def keep_counts(self) -> dict[str, int]:
        """Hard width (channels kept) per group, by group name."""
        st = self._ensure_masks(grad=False)
        return {g.name: k for g, k in zip(self.groups, st.keep_list)}

    def expected_widths(self) -> dict[str, float]:
        """Expected width E (channels) per group, by group name."""
        st = self._ensure_masks(grad=False)
        return {g.name: float(e) for g, e in zip(self.groups, st.expected.detach().tolist())}

    # ---------------------------------------------------------------- forwards
    def forward(self, *args, **kwargs):
        br = current_branch() or self.default_branch
        if br not in BRANCHES:
            raise ValueError(f"S2HModel: default_branch must be one of {BRANCHES}, got {br!r}")
        if br != "dense":
            self._ensure_masks()
        with branch(br):
            return self.model(*args, **kwargs)

    def forward_pair(self, *args):
        """``(soft output, hard output)`` of one input, each S2H layer running both branches at once.

        The network is traced once with ``torch.fx`` (S2H layers as leaves) into a paired graph
        that calls ``layer.forward_pair(x_soft, x_hard)``: a Triton dual-GEMM per linear and two
        CUDA streams per conv on a GPU, two calls on the CPU. A model ``torch.fx`` cannot trace
        falls back to two whole forwards, with a warning, once.
        """
        self._ensure_masks()
        gm = self._pair_graph()
        if gm is None:
            with branch("soft"):
                ys = self.model(*args)
            with branch("hard"):
                yh = self.model(*args)
            return ys, yh
        return gm(*args)

    @property
    def pair_mode(self) -> str | None:
        """"graph" (paired fx graph), "sequential" (two forwards) or None (not built yet)."""
        return self._pair["mode"]

    def _pair_graph(self):
        if self._pair["mode"] is None:
            try:
                self._pair["gm"] = _build_pair_graph(self.model)
                self._pair["mode"] = "graph"
            except Exception as e:  # noqa: BLE001 - any tracing failure
                warnings.warn(f"S2HModel.forward_pair: torch.fx cannot trace the model ({type(e).__name__}: {e}); "
                              "running the soft and hard branches as two forwards instead", stacklevel=3)
                self._pair["gm"] = None
                self._pair["mode"] = "sequential"
        return self._pair["gm"]

    def __deepcopy__(self, memo):
        pair = self._pair
        object.__setattr__(self, "_pair", {"gm": None, "mode": None})
        try:
            cls = type(self)
            new = cls.__new__(cls)
            memo[id(self)] = new
            for k, v in self.__dict__.items():
                object.__setattr__(new, k, copy.deepcopy(v, memo))
        finally:
            object.__setattr__(self, "_pair", pair)
        return new

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() / .float() convert every floating buffer; the FLOPs tables stay
        # float64 (MAC counts overflow fp16 and lose integers in fp32) and only follow the device.
        tables = {k: t for k, t in self._buffers.items() if k.startswith("_flops_")}
        out = super()._apply(fn, recurse)
        for k, t in tables.items():
            self._buffers[k] = t.to(self._buffers[k].device)
        return out

    # ---------------------------------------------------------------- FLOPs
    def _flops(self, widths: torch.Tensor) -> torch.Tensor:
        return _flops.flops_of(widths, self._flops_coef, self._flops_a_in, self._flops_c_in,
                               self._flops_a_out, self._flops_c_out)

    def soft_flops(self) -> torch.Tensor:
        """Expected MACs per sample from the expected widths E (a tensor; its gradient reaches u)."""
        st = self._ensure_masks()
        return self._flops(st.expected).to(self.u.dtype)

    def hard_flops(self) -> float:
        """MACs per sample of the hard network (= of ``export()``)."""
        st = self._ensure_masks(grad=False)
        return float(self._flops(st.keep))

    def dense_flops(self) -> float:
        """MACs per sample of the unpruned network."""
        return self._dense_flops

    def resource_loss(self) -> torch.Tensor:
        """``(soft_flops / dense_flops - target_flops)²``."""
        return (self.soft_flops() / self._dense_flops - self.target_flops) ** 2

    # ---------------------------------------------------------------- export
    def export(self, widths: dict[str, int] | Sequence[int] | None = None) -> nn.Module:
        """A plain ``nn.Module`` with the hard network's channels (current keep counts, or ``widths``)."""
        from .export import export

        return export(self, widths)

    def extra_repr(self) -> str:
        return (f"groups={len(self.groups)}, buckets={self.u.numel()}, target_flops={self.target_flops}, "
                f"temperature={self.temperature}, hard_width={self.hard_width!r}")


# -------------------------------------------------------------------------------------------- paired graph


_PAIR_LEAVES = S2H_LAYER_TYPES + _transformers.S2H_ATTENTION_TYPES  # layers with a forward_pair


class _PairTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _PAIR_LEAVES) or super().is_leaf_module(m, qualname)


def _build_pair_graph(model: nn.Module) -> torch.fx.GraphModule:
    """An fx graph computing (soft, hard): S2H layers -> forward_pair, every other op twice."""
    graph = _PairTracer().trace(model)
    new = torch.fx.Graph()
    env_s: dict = {}
    env_h: dict = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            p = new.node_copy(node)
            env_s[node] = env_h[node] = p
        elif node.op == "output":
            out_s = torch.fx.map_arg(node.args[0], lambda n: env_s[n])
            out_h = torch.fx.map_arg(node.args[0], lambda n: env_h[n])
            new.output((out_s, out_h))
        elif node.op == "call_module" and isinstance(model.get_submodule(node.target), _PAIR_LEAVES):
            if len(node.args) != 1 or node.kwargs:
                raise RuntimeError(f"S2H layer '{node.target}' is called with more than one input")
            (arg,) = node.args
            mod = new.get_attr(node.target)
            pair = new.call_method("forward_pair", (mod, env_s[arg], env_h[arg]))
            env_s[node] = new.call_function(operator.getitem, (pair, 0))
            env_h[node] = new.call_function(operator.getitem, (pair, 1))
        else:
            inputs = node.all_input_nodes
            if all(env_s[n] is env_h[n] for n in inputs) and node.op == "get_attr":
                c = new.node_copy(node, lambda n: env_s[n])
                env_s[node] = env_h[node] = c
            else:
                env_s[node] = new.node_copy(node, lambda n: env_s[n])
                env_h[node] = new.node_copy(node, lambda n: env_h[n])
    new.lint()
    return torch.fx.GraphModule(model, new)


# -------------------------------------------------------------------------------------------- convert

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
            inplace: bool = False) -> S2HModel:
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

    Raises a ValueError naming the module for a layer S2H cannot prune, and a RuntimeError naming
    the module for a model that cannot be traced.
    """
    _check_args(model, target_flops, divisor, temperature, hard_width)
    inputs = _example_tuple(example_inputs)
    _, ignored_names = _resolve_ignored(model, ignored_layers)  # names, against the caller's model
    if not inplace:
        model = copy.deepcopy(model)
    ignored, _ = _resolve_ignored(model, ignored_names or None)
    attention = _transformers.prepare(model, ignored, divisor)  # Transformers: S2H attention, head groups
    groups = attention.merge(model, find_groups(model, inputs, ignored + attention.ignored, divisor))
    if reorder:
        reorder_channels(model, groups)

    # channel specs per module
    per_mod: dict[str, dict[str, list]] = {}
    for g in groups:
        for m in g.members:
            d = per_mod.setdefault(m.module, {"in": [], "out": [], "soft_out": False})
            if m.kind in ("out", "depthwise", "norm"):
                d["out"].append(m.segment)
                if m.kind != "norm" and not g.has_norm:
                    d["soft_out"] = True
            if m.kind == "in":
                d["in"].append(m.segment)
    grouped_norms = {n for g in groups for m in g.members if m.kind == "norm" for n in [m.module]}

    layers = _replace_modules(model, grouped_norms)
    modes = {m: m.training for m in model.modules()}  # the new layers adopted their originals' modes
    channel_offsets = [0]
    for g in groups:
        channel_offsets.append(channel_offsets[-1] + g.channels)
    state = MaskState(channel_offsets)
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
    attention.bind(state, groups)
    for m, t in modes.items():
        m.training = t

    # per-layer costs from one dense forward (eval, no grad), then a hard forward as a smoke test
    batch = inputs[0].shape[0]
    model.eval()
    try:
        with torch.no_grad(), trace_errors(model, "the dense forward"):
            costs = attention.record_costs(model, lambda: model(*inputs), batch, groups)  # + attention matmuls
        config = {
            "target_flops": float(target_flops), "temperature": float(temperature), "hard_width": hard_width,
            "divisor": int(divisor), "ignored_layers": ignored_names,
            "example_inputs": [[list(t.shape), str(t.dtype).removeprefix("torch.")] for t in inputs],
            "groups": [[g.name, g.channels] for g in groups],
        }
        s2h = S2HModel(model, groups, state, costs, config)
        with torch.no_grad():
            s2h.update_masks()
            with branch("hard"), trace_errors(model, "the hard-branch forward (narrower activations)"):
                model(*inputs)
        state.clear()
    finally:
        for m, t in modes.items():
            m.training = t
    s2h.training = model.training  # the wrapper only: submodules keep their own modes
    return s2h
