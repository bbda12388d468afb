"""S2H for vision Transformers: heads (ViT), head dimensions (Swin) and MLP channels.

The paper prunes "the head numbers (ViT) or head feature dimensions (Swin) of attention layers and
the channel numbers of linear layers" (Appendix A1). :func:`s2h.convert` calls :func:`prepare`
before it traces a model, and this module then:

* swaps every attention module it knows for an S2H attention module (group over; exported as):

  - :class:`s2h.models.vit.Attention` -> :class:`S2HAttention` (heads; ``vit.Attention``);
  - ``torch.nn.MultiheadAttention``, self-attention as in torchvision's ViT ->
    :class:`S2HMultiheadAttention` (heads; :class:`MultiheadSelfAttention`, same call convention);
  - :class:`s2h.models.vit.WindowAttention` and torchvision's ``ShiftedWindowAttention`` (Swin V1)
    -> :class:`S2HWindowAttention` (head dimensions; ``vit.WindowAttention``).

  Each holds a ``qkv`` and a ``proj`` ``nn.Linear`` (an ``nn.MultiheadAttention``'s packed
  ``in_proj_weight`` and ``out_proj`` become them, sharing the parameters) that :func:`s2h.convert`
  turns into :class:`~s2h.structured.layers.S2HLinear` like any other linear layer;
* makes one mask group per attention module (:func:`AttentionPlan.merge`):

  - **heads** (ViT): ``C = num_heads`` channels. The group owns, in ``qkv``'s output, the three
    blocks q, k, v (head ``h`` = entries ``h*d … h*d+d-1`` of each: a segment with ``repeat = d``)
    and, in ``proj``'s input, the heads' outputs. The hard branch keeps a prefix of ``k`` heads:
    ``qkv`` computes ``3*k*d`` features, ``proj`` reads ``k*d``. The soft mask ``w_h`` scales head
    ``h``'s output ``softmax(q_h k_hᵀ·s) v_h`` before ``proj``.
  - **head dimensions** (Swin): ``C = head_dim`` channels, shared by every head of the module
    (one segment per head in q, k, v and in ``proj``'s input). The hard branch keeps the first
    ``k`` dims of every head, with the scale ``s`` of the full head dim (so the hard network is
    exactly the soft network with a 0/1 mask). The soft mask ``w_j`` scales dim ``j`` of every
    head's query (its share of ``q·k``) and value (its share of the output). ``divisor`` applies
    (buckets of ``gcd(divisor, head_dim)`` dims); heads are always counted one by one;
* leaves the MLP hidden channels to the dependency groups of :func:`s2h.structured.groups.find_groups`
  (``fc1``'s output and ``fc2``'s input: one group per block, soft mask on ``fc1``'s output);
* counts the attention matmuls: ``QKᵀ`` and ``AV`` cost ``2·N²·d`` MACs per head per sample
  (``N`` tokens; in windows for Swin: ``2·windows·heads·n²`` per head dim), linear in the group
  width, so the resource loss sees them; unpruned attention modules add a fixed cost;
* exports each S2H attention module to a plain module with fewer heads / narrower heads.

**The residual stream (embedding dimension) is not pruned.** Why:

1. It would change every LayerNorm. A LayerNorm normalises over the embedding: the soft network
   (full width, then ``×w``) and the literal algorithm's masked hard network normalise over all
   ``C`` channels, the sliced hard network over the ``k`` kept ones — different statistics, so
   the hard network would no longer be the discretised soft network (and
   :class:`s2h.S2HReference` cannot check it: it refuses grouped LayerNorms).
2. It is one width for the whole network (patch embedding, class token, position embedding, every
   ``proj``/``fc2`` output, every norm, every ``qkv``/``fc1`` input): a single coarse choice.
3. It is not needed for the FLOPs budget: ``qkv``, ``proj``, the attention matmuls, ``fc1`` and
   ``fc2`` all shrink with the heads (or head dims) and MLP groups — 99.7% of ``vit_cifar``'s MACs
   — so targets like 15% are reachable.

The paper's Fig. 4(d)/(e) shows the embedding pruned too (e.g. 96/192 for ViT), so this is a
deliberate difference. To keep the trace away from the residual stream, every attention module's
``qkv`` and ``proj`` are passed to Torch-Pruning as ignored layers: the residual group (which
holds ``proj``'s output) and the raw ``qkv`` group are never returned by ``find_groups``.

Notes: attention runs as explicit matmuls everywhere (S2H and exported modules), so
``FlopCounterMode`` counts QKᵀ and AV (it does not count ``scaled_dot_product_attention`` on the
CPU, which ``nn.MultiheadAttention`` uses). ``S2HModel.forward_pair`` pairs the attention modules
of ``vit_cifar``/``swin_cifar``/torchvision's Swin in its graph; torchvision's ViT calls its
attention with three arguments, which the paired graph does not take, so it falls back to two
forwards (with a warning). Swin V2 attention and cross-attention are refused with an error.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..models.vit import Attention, WindowAttention, token_attention, window_attention, window_geometry
from .flops import LayerCost, record_layer_costs
from .groups import GroupInfo, Member
from .layers import swap_modules
from .masks import ChannelSpec, MaskState, Segment

__all__ = [
    "S2HAttentionLayer",
    "S2HAttention",
    "S2HMultiheadAttention",
    "S2HWindowAttention",
    "MultiheadSelfAttention",
    "S2H_ATTENTION_TYPES",
    "AttentionPlan",
    "prepare",
]


def _new(cls, **attrs):
    """An instance of ``cls`` (an nn.Module) with the given attributes, without running its __init__."""
    obj = cls.__new__(cls)
    nn.Module.__init__(obj)
    for k, v in attrs.items():
        setattr(obj, k, v)
    return obj


def _linear_from(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A plain nn.Linear holding these very parameters (shared, not copied)."""
    lin = _new(nn.Linear, in_features=weight.shape[1], out_features=weight.shape[0])
    lin.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
    lin.bias = bias if (bias is None or isinstance(bias, nn.Parameter)) else nn.Parameter(bias)
    return lin


class S2HAttentionLayer:
    """Branch selection, mask access and ``to_plain`` shared by the S2H attention modules."""

    #: "heads" or "head_dims": what the module's mask group counts
    group_kind = "heads"

    def _s2h_init(self) -> None:
        self.mask_state: MaskState | None = None
        self.group: int | None = None  # index of the module's mask group; None: unpruned
        self.mask_group: str | None = None

    def bind(self, state: MaskState | None, group: int | None, name: str | None) -> None:
        self.mask_state, self.group, self.mask_group = state, group, name

    def _soft_mask(self) -> torch.Tensor | None:
        """The group's soft mask (per head or per head dim) in the soft branch, else None."""
        st = self.mask_state
        if st is None or self.group is None or st.active_branch() != "soft":
            return None
        st.require("soft", self)
        off = st.channel_offsets[self.group]
        return st.w[off:off + self.group_channels]

    @property
    def group_channels(self) -> int:
        return self.num_heads if self.group_kind == "heads" else self.head_dim

    def forward_pair(self, x_soft: torch.Tensor, x_hard: torch.Tensor):
        """Soft and hard outputs (two calls; the qkv/proj S2HLinears slice themselves)."""
        with self.mask_state.use_branch("soft"):
            ys = self(x_soft)
        with self.mask_state.use_branch("hard"):
            yh = self(x_hard)
        return ys, yh

    def _plain_linears(self, keep: Sequence[int]):
        """qkv and proj as plain nn.Linear holding the hard branch's slices."""
        return self.qkv.to_plain(keep), self.proj.to_plain(keep)

    def _kept_channels(self, keep: Sequence[int]) -> int:
        return self.group_channels if self.group is None else int(keep[self.group])


class S2HAttention(S2HAttentionLayer, Attention):
    """Token self-attention (``[B, N, C]``) with a mask group over its heads."""

    group_kind = "heads"

    @classmethod
    def from_module(cls, m: Attention) -> "S2HAttention":
        obj = _new(cls, num_heads=m.num_heads, head_dim=m.head_dim, scale=m.scale, attn_drop=m.attn_drop,
                   proj_drop=m.proj_drop, qkv=m.qkv, proj=m.proj)
        obj._s2h_init()
        obj.train(m.training)
        return obj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return token_attention(x, self.qkv, self._proj, self.head_dim, self.scale, self.attn_drop, self.training,
                               head_mask=self._soft_mask())

    def attention_macs(self, x: torch.Tensor, batch: int) -> float:
        """MACs of QKᵀ and AV per head per sample for input ``x``."""
        b, n = x.shape[0], x.shape[1]
        return 2.0 * n * n * self.head_dim * b / batch

    def _plain_cls(self):
        return Attention

    def to_plain(self, keep: Sequence[int]) -> nn.Module:
        """A plain attention module with the kept heads (used by :func:`s2h.export`)."""
        qkv, proj = self._plain_linears(keep)
        new = _new(self._plain_cls(), num_heads=self._kept_channels(keep), head_dim=self.head_dim, scale=self.scale,
                   attn_drop=self.attn_drop, proj_drop=self.proj_drop, qkv=qkv, proj=proj)
        for k in ("batch_first",):
            if hasattr(self, k):
                setattr(new, k, getattr(self, k))
        new.train(self.training)
        return new


def _mha_forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                 average_attn_weights=True, is_causal=False, head_mask=None):
    """``nn.MultiheadAttention``'s call convention for self-attention without masks."""
    if key is not query or value is not query:
        raise RuntimeError(f"{type(self).__name__}: only self-attention (query is key is value) is supported")
    if key_padding_mask is not None or attn_mask is not None or is_causal:
        raise RuntimeError(f"{type(self).__name__}: attention masks are not supported")
    x = query if self.batch_first else query.transpose(0, 1)
    out = token_attention(x, self.qkv, self._proj, self.head_dim, self.scale, self.attn_drop, self.training,
                          head_mask=head_mask, need_weights=need_weights)
    if need_weights:
        out, probs = out
        probs = probs.mean(1) if average_attn_weights else probs
    else:
        probs = None
    if not self.batch_first:
        out = out.transpose(0, 1)
    return out, probs


class MultiheadSelfAttention(Attention):
    """A plain pruned stand-in for ``nn.MultiheadAttention`` (self-attention): fewer heads, same call.

    ``forward(query, key, value, ..., need_weights=True)`` returns ``(output, weights)`` like
    ``nn.MultiheadAttention``; ``key`` and ``value`` must be ``query`` and masks are not supported.
    """

    batch_first = True

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        # written out (no callables) so that torch.jit.script compiles the exported model
        if not torch.jit.is_scripting():
            if key is not query or value is not query:
                raise RuntimeError("MultiheadSelfAttention: only self-attention (query is key is value) is supported")
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise RuntimeError("MultiheadSelfAttention: attention masks are not supported")
        x = query if self.batch_first else query.transpose(0, 1)
        B, N = x.shape[0], x.shape[1]
        qkv = self.qkv(x).reshape(B, N, 3, -1, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        probs: Optional[torch.Tensor] = None
        if need_weights:
            probs = attn.mean(1) if average_attn_weights else attn
        attn = F.dropout(attn, self.attn_drop, self.training)
        out = self.proj((attn @ v).transpose(1, 2).reshape(B, N, -1))
        out = F.dropout(out, self.proj_drop, self.training)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, probs


class S2HMultiheadAttention(S2HAttention):
    """``nn.MultiheadAttention`` (self-attention) with a mask group over its heads; same call convention."""

    @classmethod
    def from_module(cls, m: nn.MultiheadAttention) -> "S2HMultiheadAttention":
        e, h = m.embed_dim, m.num_heads
        qkv = _linear_from(m.in_proj_weight, m.in_proj_bias)
        proj = _linear_from(m.out_proj.weight, m.out_proj.bias)
        obj = _new(cls, num_heads=h, head_dim=e // h, scale=(e // h) ** -0.5, attn_drop=float(m.dropout),
                   proj_drop=0.0, qkv=qkv, proj=proj, batch_first=bool(m.batch_first))
        obj._s2h_init()
        obj.train(m.training)
        return obj

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        return _mha_forward(self, query, key, value, key_padding_mask, need_weights, attn_mask,
                            average_attn_weights, is_causal, head_mask=self._soft_mask())

    def attention_macs(self, x: torch.Tensor, batch: int) -> float:
        b, n = (x.shape[0], x.shape[1]) if self.batch_first else (x.shape[1], x.shape[0])
        return 2.0 * n * n * self.head_dim * b / batch

    def forward_pair(self, x_soft, x_hard):
        with self.mask_state.use_branch("soft"):
            ys = self(x_soft, x_soft, x_soft, need_weights=False)
        with self.mask_state.use_branch("hard"):
            yh = self(x_hard, x_hard, x_hard, need_weights=False)
        return ys, yh

    def _plain_cls(self):
        return MultiheadSelfAttention


class S2HWindowAttention(S2HAttentionLayer, WindowAttention):
    """Shifted-window self-attention (``[B, H, W, C]``) with a mask group over its head dimensions."""

    group_kind = "head_dims"

    @classmethod
    def from_module(cls, m: nn.Module) -> "S2HWindowAttention":
        h = m.num_heads
        head_dim = getattr(m, "head_dim", None) or m.qkv.out_features // (3 * h)
        scale = getattr(m, "scale", None)
        if scale is None:  # torchvision: (C // num_heads) ** -0.5 of the input width C
            scale = (m.qkv.in_features // h) ** -0.5
        obj = _new(cls, window_size=list(m.window_size), shift_size=list(m.shift_size), num_heads=h,
                   head_dim=head_dim, scale=float(scale), attention_dropout=float(m.attention_dropout),
                   dropout=float(m.dropout), qkv=m.qkv, proj=m.proj,
                   relative_position_bias_table=m.relative_position_bias_table)
        obj.register_buffer("relative_position_index", m.relative_position_index)
        obj._s2h_init()
        obj.train(m.training)
        return obj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return window_attention(x, self.qkv, self.proj, self.num_heads, self.scale, self.get_relative_position_bias(),
                                self.window_size, self.shift_size, self.attention_dropout, self.dropout, self.training,
                                dim_mask=self._soft_mask())

    def attention_macs(self, x: torch.Tensor, batch: int) -> float:
        """MACs of QKᵀ and AV per head dimension per sample for input ``x`` (padded windows included)."""
        b, h, w = x.shape[0], x.shape[1], x.shape[2]
        _, _, nw, _ = window_geometry(h, w, self.window_size, self.shift_size)
        n = self.window_size[0] * self.window_size[1]
        return 2.0 * nw * self.num_heads * n * n * b / batch

    def to_plain(self, keep: Sequence[int]) -> nn.Module:
        """A plain window attention module with the kept head dimensions."""
        qkv, proj = self._plain_linears(keep)
        new = _new(WindowAttention, window_size=list(self.window_size), shift_size=list(self.shift_size),
                   num_heads=self.num_heads, head_dim=self._kept_channels(keep), scale=self.scale,
                   attention_dropout=self.attention_dropout, dropout=self.dropout, qkv=qkv, proj=proj,
                   relative_position_bias_table=nn.Parameter(self.relative_position_bias_table.detach().clone()))
        new.register_buffer("relative_position_index", self.relative_position_index.clone())
        new.train(self.training)
        return new


S2H_ATTENTION_TYPES = (S2HAttention, S2HWindowAttention)


# --------------------------------------------------------------------------------------------
# Finding and swapping attention modules
# --------------------------------------------------------------------------------------------


def _tv_window_types():
    try:
        from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2
    except Exception:  # pragma: no cover - torchvision missing or changed
        return (), ()
    return (ShiftedWindowAttention,), (ShiftedWindowAttentionV2,)


def _s2h_module_for(name: str, m: nn.Module) -> nn.Module | None:
    """The S2H attention module replacing ``m``, None when ``m`` is no attention module; errors name the module."""
    if isinstance(m, S2H_ATTENTION_TYPES):
        raise ValueError(f"s2h.convert: '{name}' is already an S2H attention module (convert the original model)")
    win, win_v2 = _tv_window_types()
    if win_v2 and isinstance(m, win_v2):
        raise ValueError(f"s2h.convert: '{name}' is a Swin V2 ShiftedWindowAttentionV2 (cosine attention, continuous "
                         "position bias), which S2H cannot prune yet; use swin_t/s/b (V1) or s2h.models.swin_cifar")
    if type(m) is Attention:
        return S2HAttention.from_module(m)
    if type(m) is WindowAttention or (win and type(m) in win):
        return S2HWindowAttention.from_module(m)
    if isinstance(m, nn.MultiheadAttention):
        if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
            raise ValueError(f"s2h.convert: '{name}' is an nn.MultiheadAttention with separate key/value "
                             "dimensions, bias_k/bias_v or add_zero_attn (cross-attention), which S2H cannot "
                             "convert; S2H supports self-attention (kdim = vdim = embed_dim)")
        return S2HMultiheadAttention.from_module(m)
    return None


@dataclass
class _Entry:
    name: str
    module: nn.Module  # the S2H attention module
    pruned: bool
    divisor: int = 1


@dataclass
class AttentionPlan:
    """What :func:`prepare` did to a model, and the hooks :func:`s2h.convert` calls later."""

    entries: list[_Entry] = field(default_factory=list)

    @property
    def ignored(self) -> list[nn.Module]:
        """``qkv`` and ``proj`` of every attention module: Torch-Pruning must not group them."""
        return [lin for e in self.entries for lin in (e.module.qkv, e.module.proj)]

    def merge(self, model: nn.Module, groups: list[GroupInfo]) -> list[GroupInfo]:
        """``groups`` plus one group per pruned attention module, in module order, re-indexed."""
        new = list(groups)
        for e in self.entries:
            if not e.pruned:
                continue
            g = _attention_group(e)
            if g is not None:
                new.append(g)
        order = {n: i for i, (n, _) in enumerate(model.named_modules())}
        new.sort(key=lambda g: order.get(g.name, len(order)))
        for gi, g in enumerate(new):
            g.members = [Member(m.module, m.kind, Segment(gi, m.segment.start, m.segment.channels, m.segment.repeat))
                         for m in g.members]
        return new

    def bind(self, state: MaskState, groups: Sequence[GroupInfo]) -> None:
        """Attach the S2H attention modules to the masks; no soft mask on ``qkv``'s output itself."""
        index = {g.name: i for i, g in enumerate(groups)}
        for e in self.entries:
            gi = index.get(e.name)
            e.module.bind(state, gi, e.name if gi is not None else None)
            e.module.qkv.soft_out = False
            e.module.proj.soft_out = False

    def record_costs(self, model: nn.Module, run, batch: int, groups: Sequence[GroupInfo]):
        """:func:`~s2h.structured.flops.record_layer_costs` plus one cost per attention module (QKᵀ and AV)."""
        coefs: dict[nn.Module, float] = {}

        def hook(mod, args, kwargs, out):
            x = args[0] if args else kwargs.get("query", kwargs.get("x"))
            coefs[mod] = coefs.get(mod, 0.0) + mod.attention_macs(x, batch)

        handles = [e.module.register_forward_hook(hook, with_kwargs=True) for e in self.entries]
        try:
            costs = record_layer_costs(model, run, batch)
        finally:
            for h in handles:
                h.remove()
        for e in self.entries:
            m = e.module
            if m not in coefs:
                continue
            c = m.group_channels
            spec = None if m.group is None else ChannelSpec(c, [Segment(m.group, 0, c, 1)])
            costs.append(LayerCost(f"{e.name}.attention", coefs[m], spec, None, c, 1))
        return costs


def _attention_group(e: _Entry) -> GroupInfo | None:
    m = e.module
    h, d = m.num_heads, m.head_dim
    qkv, proj = f"{e.name}.qkv", f"{e.name}.proj"
    if m.group_kind == "heads":
        channels, divisor = h, 1
        members = [Member(qkv, "out", Segment(-1, p * h * d, h, d)) for p in range(3)]
        members.append(Member(proj, "in", Segment(-1, 0, h, d)))
    else:
        channels, divisor = d, math.gcd(d, e.divisor)
        members = [Member(qkv, "out", Segment(-1, i * d, d, 1)) for i in range(3 * h)]
        members += [Member(proj, "in", Segment(-1, i * d, d, 1)) for i in range(h)]
    if channels // divisor < 2:
        return None  # one bucket: nothing to choose
    return GroupInfo(name=e.name, channels=channels, divisor=divisor, members=members)


def prepare(model: nn.Module, ignored: Sequence[nn.Module] = (), divisor: int = 1,
            converters: Sequence = ()) -> AttentionPlan:
    """Swap every known attention module of ``model`` (in place) for its S2H module.

    An attention module in ``ignored`` (or whose ``qkv``/``out_proj`` is) is swapped too, but gets
    no mask group: it runs at full width in every branch. ``converters``: more ``f(name, module)``
    returning an S2H attention module or None, tried first (timm's attention). Raises a ValueError naming the module for
    an attention module S2H cannot prune (Swin V2, cross-attention ``nn.MultiheadAttention``).
    """
    ignored_set = {id(m) for m in ignored}
    plan = AttentionPlan()
    swap: dict[nn.Module, nn.Module] = {}
    for name, m in model.named_modules():
        if m in swap:
            continue
        new = next((c for c in (f(name, m) for f in converters) if c is not None), None) or _s2h_module_for(name, m)
        if new is None:
            continue
        subs = [m] + list(m.children())
        pruned = not any(id(s) in ignored_set for s in subs)
        swap[m] = new
        plan.entries.append(_Entry(name, new, pruned, int(divisor)))
    swap_modules(model, swap)
    return plan
