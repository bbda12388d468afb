"""The base every S2H layer shares: its channel specs, its model's :class:`MaskState`, the branch."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..masks import ChannelSpec, MaskState

__all__ = ["S2HLayer", "adopt", "device_of", "swap_modules"]


def adopt(new: nn.Module, old: nn.Module) -> nn.Module:
    """Give ``new`` (built on the meta device) the parameters and buffers of ``old``, shared."""
    for name in list(new._parameters):
        new._parameters[name] = old._parameters[name]
    for name in list(old._buffers):
        new._buffers[name] = old._buffers[name]
    new.train(old.training)
    return new


def swap_modules(root: nn.Module, mapping: dict[nn.Module, nn.Module]) -> None:
    """Replace every reference to a key of ``mapping`` under ``root`` (shared modules included)."""
    for parent in list(root.modules()):
        for name, child in list(parent._modules.items()):
            if child in mapping:
                parent._modules[name] = mapping[child]


class S2HLayer:
    """Mixin of a converted layer: channel specs, the model's MaskState, and ``to_plain``.

    Subclasses implement ``to_plain(keep)``: the plain ``nn`` module holding the hard branch's
    channels for the keep counts ``keep`` (what :func:`s2h.export` builds the exported model from).
    """

    def s2h_init(self, mask_group: str | None) -> None:
        #: name of the dependency group of the output channels (set by s2h.convert)
        self.mask_group = mask_group
        self.in_spec: ChannelSpec | None = None
        self.out_spec: ChannelSpec | None = None
        #: apply the soft mask on this layer's own output channels (its group has no norm layer)
        self.soft_out = False
        self.mask_state: MaskState | None = None
        self.plain_type: type | None = None  # export as this subclass of the plain layer (keep_plain_type)
        self.post: tuple[str, ...] = ()

    def keep_plain_type(self, orig: nn.Module, post: tuple[str, ...] = ()) -> None:
        """Export as ``type(orig)`` (a subclass of the plain layer, e.g. timm's ``LayerNorm``).

        The attributes ``orig`` has beyond the S2H layer's (timm's ``_fast_norm``) are carried to
        the plain module; ``post``: submodules of ``orig`` applied after the layer (timm
        ``BatchNormAct2d``'s ``drop`` and ``act``), adopted as submodules of this layer.
        """
        self.plain_type = type(orig)
        self.plain_extra = {k: v for k, v in vars(orig).items() if k not in vars(self) and not k.startswith("__")}
        self.post = tuple(post)
        for name in post:
            self._modules[name] = orig._modules[name]

    def apply_post(self, y):
        """The submodules of ``post`` (activation, drop) applied to the layer's output."""
        for name in getattr(self, "post", ()):
            y = self._modules[name](y)
        return y

    def as_plain_type(self, new: nn.Module) -> nn.Module:
        """``new`` (a plain torch.nn layer) as an instance of the replaced layer's own class."""
        plain_type = getattr(self, "plain_type", None)
        if plain_type is None or plain_type is type(new):
            return new
        for k, v in self.plain_extra.items():
            new.__dict__.setdefault(k, v)
        for name in self.post:
            new._modules[name] = self._modules[name]
        new.__class__ = plain_type
        return new

    def bind(self, state: MaskState | None, in_spec: ChannelSpec | None, out_spec: ChannelSpec | None,
             soft_out: bool = False, mask_group: str | None = None) -> None:
        """Attach the layer to a model's masks (done by s2h.convert)."""
        self.mask_state = state
        self.in_spec, self.out_spec = in_spec, out_spec
        self.soft_out = bool(soft_out)
        if mask_group is not None:
            self.mask_group = mask_group

    def active_branch(self) -> str:
        """The branch this layer runs now: its model's, "dense" when unbound or none is set."""
        st = self.mask_state
        b = None if st is None else st.active_branch()
        return "dense" if b is None else b

    def kept(self, spec: ChannelSpec | None, device):
        """What the hard branch keeps of ``spec``'s dimension (None: all)."""
        if spec is None:
            return None
        return spec.kept(self.mask_state.keep_list, device)

    def soft_vector(self, spec: ChannelSpec | None):
        """The soft mask over ``spec``'s dimension (None: no group there)."""
        if spec is None:
            return None
        st = self.mask_state
        return spec.soft_mask(st.w, st.channel_offsets)

    def plain_selection(self, keep: Sequence[int], device) -> tuple:
        """(output selection, input selection) of the hard network for keep counts ``keep``."""
        sel_out = self.out_spec.kept(keep, device) if self.out_spec is not None else None
        sel_in = self.in_spec.kept(keep, device) if self.in_spec is not None else None
        return sel_out, sel_in

    def plain_size(self, keep: Sequence[int], full: int) -> int:
        return self.out_spec.kept_size(keep) if self.out_spec is not None else full

    def to_plain(self, keep: Sequence[int]) -> nn.Module:  # pragma: no cover - every layer overrides it
        raise NotImplementedError


def device_of(module: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (CPU when it has none)."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")
