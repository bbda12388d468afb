"""What the phases of a step hand each other, what a step returns (read lazily), the checks that wait on the device.

The hard widths are data-dependent, so :class:`s2h.S2HPruner` reads the device once per step: the
keep counts, to slice the weights. Everything else stays on the device until someone asks:

* :class:`StepStats` (what ``step`` returns) holds the statistics as 0-d tensors; the first value
  read (``stats["loss"]``, ``float(...)``, ``dict(stats)``, ``print``) reads all of them in one
  transfer. ``stats.tensors`` gives the tensors without reading (sum them on the device).
* :class:`DeviceChecks` holds each step's checks (labels in range, finite losses) as one small
  tensor; they are read together with the next read (the next step's keep counts, or a stats
  read) and raise there, naming the step they belong to.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

__all__ = ["StepStats", "StepState", "DeviceChecks"]


class DeviceChecks:
    """Pending per-step checks; :meth:`read` brings them to the host with other tensors, in one transfer.

    A check is ``(step, flags)`` with ``flags = [bad_labels, label_min, label_max, loss, gap,
    resource_loss]`` (float64, on the device); ``raise_for(step, values)`` turns a failed one into
    the exception.
    """

    def __init__(self, raise_for: Callable[[int, list[float]], None]):
        self._pending: list[tuple[int, torch.Tensor]] = []
        self._raise_for = raise_for
        #: device reads done by :meth:`read` (what the tests and the profiler count)
        self.reads = 0

    def add(self, step: int, flags: torch.Tensor) -> None:
        self._pending.append((step, flags))

    def __len__(self) -> int:
        return len(self._pending)

    def clear(self) -> None:
        self._pending = []

    def read(self, tensors: list[torch.Tensor]) -> list[float]:
        """The values of ``tensors`` (flattened, as floats) after the pending checks, all in one
        device-to-host transfer; raises the first failed check (pending checks are cleared)."""
        pend, self._pending = self._pending, []
        parts = [f for _, f in pend] + [t.detach().reshape(-1) for t in tensors]
        if not parts:
            return []
        dev = parts[0].device
        host = torch.cat([p.to(device=dev, dtype=torch.float64) for p in parts]).tolist()
        self.reads += 1
        pos = 0
        for step, f in pend:
            vals = host[pos:pos + f.numel()]
            pos += f.numel()
            self._raise_for(step, vals)
        return host[pos:]


class StepStats(Mapping):
    """The statistics of one ``step`` / ``backward`` call: a read-only mapping.

    ``step``, ``keep`` (kept channels per group, by name), ``micro_batch`` and ``updated`` are host
    values; ``loss``, ``acc``, ``hard_acc``, ``gap``, ``resource_loss``, ``soft_flops``,
    ``hard_flops`` (and ``grad_norm`` / ``mask_grad_norm`` when clipping) live on the device until
    the first of them is read, then all are read at once and returned as Python floats.
    """

    def __init__(self, host: dict[str, Any], device: dict[str, torch.Tensor],
                 reader: Callable[[list[torch.Tensor]], list[float]]):
        self._host = dict(host)
        self._device = dict(device)
        self._reader = reader
        self._values: dict[str, float] | None = None

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """The device statistics as 0-d tensors (nothing is read)."""
        return dict(self._device)

    def add(self, **tensors: torch.Tensor) -> None:
        """More device statistics (before the first read)."""
        if self._values is not None:
            raise RuntimeError("StepStats: already read")
        self._device.update(tensors)

    def set_host(self, **values: Any) -> None:
        self._host.update(values)

    def _read(self) -> dict[str, float]:
        if self._values is None:
            names = list(self._device)
            vals = self._reader([self._device[k] for k in names])
            self._values = dict(zip(names, vals))
        return self._values

    def __getitem__(self, key: str):
        if key in self._host:
            return self._host[key]
        if key in self._device:
            return self._read()[key]
        raise KeyError(key)

    def __contains__(self, key) -> bool:  # without reading
        return key in self._host or key in self._device

    def __iter__(self) -> Iterator[str]:
        yield from self._host
        yield from self._device

    def __len__(self) -> int:
        return len(self._host) + len(self._device)

    def __repr__(self) -> str:
        return f"StepStats({dict(self)!r})"


@dataclass
class StepState:
    """What the phases of one update hand each other; lives from the first ``backward`` to ``update``.

    Masks, the resource loss and the accumulated raw mask gradients belong to the whole update;
    ``x``, ``y``, the logits and the cotangents to the current micro-batch.
    """

    x: torch.Tensor | None = None
    y: torch.Tensor | None = None
    w: torch.Tensor | None = None  # soft masks (with the channel-mask graph to u)
    E: torch.Tensor | None = None  # expected widths
    keep: torch.Tensor | None = None
    w_leaf: torch.Tensor | None = None  # what the network sees: w detached
    r: torch.Tensor | None = None  # the resource loss (fp32, graph to u)
    flops: tuple = ()  # (soft, hard) FLOPs fractions, 0-d device tensors
    snap: list | None = None  # running statistics before the forwards (eager checks)
    ys: torch.Tensor | None = None
    yh: torch.Tensor | None = None
    stats: StepStats | None = None  # the current micro-batch's
    g_ce: torch.Tensor | None = None  # ∂l/∂ys (times the micro-batch's factor)
    g_soft: torch.Tensor | None = None  # ∂d/∂ys
    g_hard: torch.Tensor | None = None  # ∂d/∂yh
    g_w: dict = field(default_factory=lambda: {"L": None, "G": None})  # raw mask gradients, accumulated
    w_in_main: bool = False  # g_L→w accumulates in w_leaf.grad
    pending: list = field(default_factory=list)  # cotangents on ys still to carry to w_leaf
    micro: int = 0  # micro-batches so far
    n: int = 0  # samples so far
    b0: int = 0  # the first micro-batch's size: cotangents are scaled by b_i / b0, grads by b0 / n at the end
    scale: torch.Tensor | None = None  # the GradScaler's scale (a device tensor)
