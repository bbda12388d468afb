""":class:`S2HModel`: a model whose channels are pruned by S2HPruner (docs/DESIGN.md §2).

::

    m = s2h.convert(torchvision.models.resnet50(), torch.randn(1, 3, 224, 224), target_flops=0.15)
    m.update_masks()                       # once per step: (w, E, keep) for every group, one op call
    with m.branch("soft"):  ys = m(x)      # θ⊙w: full width, soft masks after the norms
    with m.branch("hard"):  yh = m(x)      # θ<m>: sliced weights, narrower activations
    ys, yh = m.forward_pair(x)             # both, each layer reading its weight once
    r = m.resource_loss()                  # (soft_flops / dense_flops - target)², grad reaches u
    small = m.export()                     # plain nn.Conv2d / nn.Linear / nn.BatchNorm2d, fewer channels
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Any, Sequence

import torch
from torch import nn

from s2h_kernels import channel_masks

from .export import export
from .flops import FlopsTable, flops_of
from .groups import GroupInfo
from .masks import BRANCHES, MaskState
from .pairing import build_pair_graph
from .report import ConversionReport, report_of

__all__ = ["S2HModel", "HARD_WIDTHS"]

HARD_WIDTHS = ("threshold", "expected")


class S2HModel(nn.Module):
    """A converted model: the wrapped network (``.model``), one packed mask logit vector ``u``.

    Branch of ``forward``: the innermost ``with model.branch(...)`` block, else ``default_branch``
    ("soft" unless you change it). The branch is this model's own: another model, in this thread
    or another, is unaffected. Masks are computed by :meth:`update_masks` once per step and
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
        self.mask_state = state
        table = FlopsTable(costs, len(groups))
        self.flops_layers = table.names
        for k, t in table.tensors().items():
            self.register_buffer(f"_flops_{k}", t.to(dev), persistent=False)
        self._dense_flops = float(self.flops(self.group_channels))
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
        self.mask_state.set(w, e, keep, version=self._mask_version())
        return w, e, keep

    def ensure_masks(self, grad: bool = True) -> MaskState:
        """The cached masks, recomputed when stale: u changed, nothing cached, or (``grad``) the
        cache has no autograd graph while grad is enabled for u."""
        st = self.mask_state
        need_graph = grad and torch.is_grad_enabled() and self.u.requires_grad
        stale = st.w is None or st.version != self._mask_version()
        if stale or (need_graph and st.w.grad_fn is None and st.w.numel()):
            with torch.set_grad_enabled(need_graph):
                self.update_masks()
        return st

    def keep_counts(self) -> dict[str, int]:
        """Hard width (channels kept) per group, by group name."""
        st = self.ensure_masks(grad=False)
        return {g.name: k for g, k in zip(self.groups, st.keep_list)}

    def expected_widths(self) -> dict[str, float]:
        """Expected width E (channels) per group, by group name."""
        st = self.ensure_masks(grad=False)
        return {g.name: float(e) for g, e in zip(self.groups, st.expected.detach().tolist())}

    # ---------------------------------------------------------------- branch and forwards
    def branch(self, name: str) -> contextlib.AbstractContextManager:
        """``with model.branch("soft" | "hard" | "dense"):`` every S2H layer of this model runs that branch."""
        return self.mask_state.use_branch(name)

    def current_branch(self) -> str | None:
        """The branch set by the innermost ``model.branch`` block (None outside any)."""
        return self.mask_state.active_branch()

    def side_stream(self, device) -> "torch.cuda.Stream":
        """This model's second CUDA stream on ``device`` (paired convolutions, the hard forward)."""
        return self.mask_state.side_stream(device)

    def forward(self, *args, **kwargs):
        br = self.mask_state.active_branch() or self.default_branch
        if br not in BRANCHES:
            raise ValueError(f"S2HModel: default_branch must be one of {BRANCHES}, got {br!r}")
        if br != "dense":
            self.ensure_masks()
        with self.mask_state.use_branch(br):
            return self.model(*args, **kwargs)

    def forward_pair(self, *args):
        """``(soft output, hard output)`` of one input, each S2H layer running both branches at once.

        The network is traced once with ``torch.fx`` (S2H layers as leaves) into a paired graph
        that calls ``layer.forward_pair(x_soft, x_hard)``: a Triton dual-GEMM per linear and two
        CUDA streams per conv on a GPU, two calls on the CPU. A model ``torch.fx`` cannot trace
        falls back to two whole forwards, with a warning, once.
        """
        self.ensure_masks()
        gm = self._pair_graph()
        if gm is None:
            with self.branch("soft"):
                ys = self.model(*args)
            with self.branch("hard"):
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
                self._pair["gm"] = build_pair_graph(self.model)
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
    def flops(self, widths: torch.Tensor) -> torch.Tensor:
        """MACs per sample (float64 tensor) for per-group ``widths`` (E, keep counts or channels)."""
        return flops_of(widths, self._flops_coef, self._flops_a_in, self._flops_c_in,
                               self._flops_a_out, self._flops_c_out)

    def soft_flops(self) -> torch.Tensor:
        """Expected MACs per sample from the expected widths E (a tensor; its gradient reaches u), in fp32
        at least: fp16 overflows at the MAC counts of real networks."""
        st = self.ensure_masks()
        dtype = torch.promote_types(self.u.dtype, torch.float32)
        return self.flops(st.expected.to(dtype)).to(dtype)

    def hard_flops(self) -> float:
        """MACs per sample of the hard network (= of ``export()``)."""
        st = self.ensure_masks(grad=False)
        return float(self.flops(st.keep))

    def dense_flops(self) -> float:
        """MACs per sample of the unpruned network."""
        return self._dense_flops

    def resource_loss(self) -> torch.Tensor:
        """``(soft_flops / dense_flops - target_flops)²``."""
        return (self.soft_flops() / self._dense_flops - self.target_flops) ** 2

    # ---------------------------------------------------------------- export
    def export(self, widths: dict[str, int] | Sequence[int] | None = None) -> nn.Module:
        """A plain ``nn.Module`` with the hard network's channels (current keep counts, or ``widths``)."""
        return export(self, widths)

    def report(self) -> ConversionReport:
        """Which groups ``convert`` prunes and which it keeps dense (and why); ``print`` it for a table."""
        return report_of(self)

    def extra_repr(self) -> str:
        text = (f"groups={len(self.groups)}, buckets={self.u.numel()}, target_flops={self.target_flops}, "
                f"temperature={self.temperature}, hard_width={self.hard_width!r}")
        if self.config.get("report") is not None:
            text += "\n" + self.report().summary()
        return text


