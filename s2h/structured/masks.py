"""What one converted model's S2H layers share: channel specs, the masks, the active branch.

Branches (docs/DESIGN.md §2):

* ``"dense"``: the original layer, full width, no mask (also what an unconverted layer always does).
* ``"soft"``: full width; the group's per-channel keep probability ``w`` scales the output channels
  *after the norm*.
* ``"hard"``: the weights are sliced to the kept channels of the input and output groups; no
  masked compute, the activations themselves are narrower.

The branch belongs to a model: ``with model.branch("hard"):`` sets it on the model's
:class:`MaskState`, which every layer of that model reads. Two models (a teacher and a student,
two experiments in a thread pool) can be in different branches at the same time. One model is not
meant to run in two branches on two threads at once.
"""
from __future__ import annotations

import contextlib
import contextvars
import warnings
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

__all__ = ["BRANCHES", "Segment", "ChannelSpec", "MaskState", "take", "check_branch", "branch", "current_branch"]

BRANCHES = ("soft", "hard", "dense")

# The deprecated model-less ``s2h.branch(name)``: context-local (per thread / task), never process-wide,
# and only consulted when the model itself has no branch set.
_LEGACY_BRANCH: contextvars.ContextVar[str | None] = contextvars.ContextVar("s2h_legacy_branch", default=None)


def check_branch(name: str) -> str:
    if name not in BRANCHES:
        raise ValueError(f"s2h.branch: unknown branch {name!r}; choose one of {BRANCHES}")
    return name


@dataclass(frozen=True)
class Segment:
    """Group ``group`` owns entries ``[start, start + channels * repeat)`` of a dimension.

    Channel ``j`` of the group (in importance order) occupies entries
    ``start + j*repeat … start + (j+1)*repeat - 1``: ``repeat > 1`` where a flatten turned each
    channel into ``repeat`` features. The hard branch keeps ``[start, start + k*repeat)``.
    """

    group: int
    start: int
    channels: int
    repeat: int = 1

    @property
    def stop(self) -> int:
        return self.start + self.channels * self.repeat


class ChannelSpec:
    """One channel dimension of size ``size``: the group segments in it; other entries are fixed."""

    def __init__(self, size: int, segments: Sequence[Segment] = ()):
        segs = sorted(segments, key=lambda s: s.start)
        for a, b in zip(segs, segs[1:]):
            if a.stop > b.start:
                raise ValueError(f"ChannelSpec: overlapping segments {a} and {b}")
        if segs and segs[-1].stop > size:
            raise ValueError(f"ChannelSpec: segment {segs[-1]} exceeds the dimension size {size}")
        self.size = int(size)
        self.segments = tuple(segs)
        # the common case: one group covering the whole dimension from 0 -> a prefix slice
        self.is_prefix = len(segs) == 1 and segs[0].start == 0 and segs[0].stop == size
        self._index_cache: dict[tuple, torch.Tensor] = {}
        self._soft_index: dict[torch.device, torch.Tensor] = {}

    @property
    def groups(self) -> tuple[int, ...]:
        return tuple(s.group for s in self.segments)

    def kept_size(self, keep: Sequence[int]) -> int:
        """Entries kept by the hard branch for per-group keep counts ``keep`` (in channels)."""
        n = self.size
        for s in self.segments:
            n -= (s.channels - keep[s.group]) * s.repeat
        return n

    def kept(self, keep: Sequence[int], device: torch.device) -> slice | torch.Tensor | None:
        """What the hard branch keeps: None (all), a prefix slice, or ascending int64 indices."""
        if not self.segments:
            return None
        if self.is_prefix:
            s = self.segments[0]
            k = keep[s.group]
            return None if k == s.channels else slice(0, k * s.repeat)
        key = tuple(keep[s.group] for s in self.segments) + (str(device),)
        idx = self._index_cache.get(key)
        if idx is None:
            parts, pos = [], 0
            for s in self.segments:
                parts.append(torch.arange(pos, s.start))
                parts.append(torch.arange(s.start, s.start + keep[s.group] * s.repeat))
                pos = s.stop
            parts.append(torch.arange(pos, self.size))
            idx = torch.cat(parts).to(device)
            if len(self._index_cache) > 64:
                self._index_cache.clear()
            self._index_cache[key] = idx
        return idx

    def soft_mask(self, w: torch.Tensor, channel_offsets: Sequence[int]) -> torch.Tensor | None:
        """The per-entry soft mask (``w`` of each entry's group channel, 1 on fixed entries)."""
        if not self.segments:
            return None
        if self.is_prefix and self.segments[0].repeat == 1:
            s = self.segments[0]
            off = channel_offsets[s.group]
            return w[off : off + s.channels]
        idx = self._soft_index.get(w.device)
        if idx is None:
            one = int(channel_offsets[-1])  # index of the appended 1
            idx = torch.full((self.size,), one, dtype=torch.int64)
            for s in self.segments:
                ch = torch.arange(s.channels).repeat_interleave(s.repeat)
                idx[s.start : s.stop] = channel_offsets[s.group] + ch
            idx = idx.to(w.device)
            self._soft_index[w.device] = idx
        return torch.cat([w, w.new_ones(1)]).index_select(0, idx)

    def __repr__(self) -> str:
        return f"ChannelSpec(size={self.size}, segments={list(self.segments)})"


def take(t: torch.Tensor | None, dim: int, sel) -> torch.Tensor | None:
    """``t`` restricted to ``sel`` (None: all, a slice, or indices) along ``dim``."""
    if t is None or sel is None:
        return t
    if isinstance(sel, slice):
        return t.narrow(dim, sel.start, sel.stop - sel.start)
    return t.index_select(dim, sel)


class MaskState:
    """What one model's S2H layers share, filled by ``S2HModel.update_masks()``.

    ``w``: soft mask per channel, packed in group order (``channel_offsets[g]`` is where group g
    starts; differentiable). ``expected``: E per group. ``keep``: int64 keep counts per group, and
    ``keep_list`` the same as Python ints (what the hard branch slices with). ``branch``: the
    branch the model's layers run (None: dense, or the deprecated model-less ``s2h.branch``).
    ``side_stream(device)``: the model's second CUDA stream (paired forwards, the hard branch).
    """

    def __init__(self, channel_offsets: Sequence[int]):
        self.channel_offsets = [int(c) for c in channel_offsets]
        self.w: torch.Tensor | None = None
        self.expected: torch.Tensor | None = None
        self.keep: torch.Tensor | None = None
        self.keep_list: list[int] | None = None
        self.version: tuple | None = None  # what the cache was computed from
        self.branch: str | None = None
        self._streams: dict = {}

    def __deepcopy__(self, memo):
        # a copy starts without cached masks (they hold an autograd graph into the original's u),
        # in no branch and without streams
        new = MaskState(self.channel_offsets)
        memo[id(self)] = new
        return new

    def set(self, w, expected, keep, version=None) -> None:
        self.w, self.expected, self.keep = w, expected, keep
        self.keep_list = [int(k) for k in keep.tolist()]
        self.version = version

    def clear(self) -> None:
        self.w = self.expected = self.keep = self.keep_list = None
        self.version = None

    def require(self, what: str, layer: nn.Module) -> None:
        if self.w is None:
            raise RuntimeError(
                f"{type(layer).__name__}: the {what} branch needs masks; call S2HModel.update_masks() "
                "or run the layer through S2HModel.forward"
            )

    @contextlib.contextmanager
    def use_branch(self, name: str) -> Iterator[None]:
        """Run the model's layers in branch ``name`` inside the block (nests; restores on exit)."""
        check_branch(name)
        previous = self.branch
        self.branch = name
        try:
            yield
        finally:
            self.branch = previous

    def active_branch(self) -> str | None:
        """The model's branch, else the deprecated context-local one, else None (dense)."""
        return self.branch if self.branch is not None else _LEGACY_BRANCH.get()

    def side_stream(self, device) -> "torch.cuda.Stream":
        """This model's second CUDA stream on ``device`` (created on first use)."""
        s = self._streams.get(device)
        if s is None:
            s = self._streams[device] = torch.cuda.Stream(device=device)
        return s


@contextlib.contextmanager
def _legacy_branch(name: str) -> Iterator[None]:
    check_branch(name)
    token = _LEGACY_BRANCH.set(name)
    try:
        yield
    finally:
        _LEGACY_BRANCH.reset(token)


def branch(model, name: str | None = None):
    """``s2h.branch(model, "hard")``: the same as ``model.branch("hard")``.

    ``s2h.branch("hard")`` (no model) is deprecated: it selects the branch of every model without
    a branch of its own, in the current thread only.
    """
    if isinstance(model, str) and name is None:
        warnings.warn("s2h.branch(name) without a model is deprecated; use `with model.branch(name):` "
                      "(or s2h.branch(model, name))", DeprecationWarning, stacklevel=2)
        return _legacy_branch(model)
    if name is None:
        raise TypeError("s2h.branch: give the model and the branch name, s2h.branch(model, 'hard')")
    return model.branch(name)


def current_branch(model=None) -> str | None:
    """The branch ``model`` runs now (None: no branch set). Without a model: the deprecated
    model-less ``s2h.branch`` block's branch, or None."""
    if model is None:
        return _LEGACY_BRANCH.get()
    return model.current_branch()
