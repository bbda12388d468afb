"""What the fused step and the literal reference share: terms, Table 5, checks, balancing (docs/DESIGN.md §2).

Gradients (g_L: soft cross-entropy; g_G: the gap d = KL(softmax(ys/T) || softmax(yh/T)), batchmean,
no T² factor; g_R: ``model.resource_loss()``)::

    θ.grad = ce·g_L(θ, through soft) + gap·g_G(θ, through hard only)
    u.grad = ce·g_L(u) + gap·g_G(u, through soft) + rc·g_R(u)                       balance="none"
    u.grad = ‖g_R‖·ĝ/‖ĝ‖ + rc·g_R,  ĝ = g_L(u)/‖g_L(u)‖ + g_G(u)/‖g_G(u)‖        balance="paper"

with the norms taken per dependency group ("paper", the authors' demo) or over all of u
("paper-global"). A term whose coefficient or gradient is zero drops out of ĝ.

**Ablations** (Table 5): ``ablate`` names terms to disable among ``L_theta`` (g_L→θ),
``G_hard_theta`` (g_G→θ through hard), ``L_u`` (g_L→u) and ``G_u`` (g_G→u). ``G_soft_theta``
(g_G→θ through soft, which the paper blocks) is off by default; ``enable=("G_soft_theta",)``
turns it on for Table 5's first row. :data:`TABLE5` lists the rows. g_R→u is always on.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .model import S2HModel

__all__ = ["S2HStepBase", "NonFiniteLossError", "TERMS", "TABLE5", "BALANCES", "RESOURCE_TARGETS",
           "resolve_terms", "balance_u_grad", "check_coef", "world_size"]

TERMS = ("L_theta", "G_hard_theta", "G_soft_theta", "L_u", "G_u")
DEFAULT_OFF = ("G_soft_theta",)
BALANCES = ("paper", "paper-global", "none")
RESOURCE_TARGETS = ("soft", "hard")

#: Rows of the paper's Table 5 (ResNet-50, CIFAR-100, 15% FLOPs): which terms are on, and the
#: top-1 the paper reports. Pass ``ablate=row["ablate"], enable=row["enable"]``.
TABLE5 = (
    {"row": 1, "ablate": (), "enable": ("G_soft_theta",), "paper_top1": 65.55},
    {"row": 2, "ablate": (), "enable": (), "paper_top1": 79.77},
    {"row": 3, "ablate": ("G_hard_theta",), "enable": (), "paper_top1": 3.95},
    {"row": 4, "ablate": ("L_theta",), "enable": (), "paper_top1": 1.73},
    {"row": 5, "ablate": ("G_u",), "enable": (), "paper_top1": 78.30},
    {"row": 6, "ablate": ("L_u",), "enable": (), "paper_top1": 78.77},
    {"row": 7, "ablate": ("L_u", "G_u"), "enable": (), "paper_top1": 77.69},
)


class NonFiniteLossError(FloatingPointError):
    """A step produced a NaN/inf loss; raised before any parameter was updated."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


def resolve_terms(ablate: Iterable[str] = (), enable: Iterable[str] = ()) -> frozenset[str]:
    """The active gradient terms: all of :data:`TERMS` but ``G_soft_theta``, plus ``enable``, minus ``ablate``."""
    if isinstance(ablate, str):
        ablate = (ablate,)
    if isinstance(enable, str):
        enable = (enable,)
    ablate, enable = tuple(ablate), tuple(enable)
    for name, given in (("ablate", ablate), ("enable", enable)):
        bad = [t for t in given if t not in TERMS]
        if bad:
            raise ValueError(f"S2HPruner: {name} names unknown gradient terms {bad}; the terms are {TERMS}")
    both = set(ablate) & set(enable)
    if both:
        raise ValueError(f"S2HPruner: terms {sorted(both)} are both ablated and enabled")
    return frozenset((set(TERMS) - set(DEFAULT_OFF) | set(enable)) - set(ablate))


def check_coef(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)) or float(v) < 0:
        raise ValueError(f"S2HPruner: {name} must be a finite number >= 0, got {v!r}")
    return float(v)


def world_size() -> int:
    """Processes in the initialised torch.distributed group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class S2HStepBase:
    """Constructor, validation and checkpoint state shared by the fused trainer and the reference."""

    def __init__(self, model: S2HModel, optimizer: torch.optim.Optimizer,
                 mask_optimizer: torch.optim.Optimizer | None = None, mask_lr: float = 0.01,
                 ce_coef: float = 0.5, gap_coef: float = 5.0, resource_coef: float = 5.0,
                 temperature: float = 1.0, balance: str = "paper", ablate: Sequence[str] = (), *,
                 enable: Sequence[str] = (), check_finite: bool = True, resource_target: str = "soft"):
        name = type(self).__name__
        if not isinstance(model, S2HModel):
            raise TypeError(f"{name}: model must be an S2HModel from s2h.convert, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"{name}: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if balance not in BALANCES:
            raise ValueError(f"{name}: balance must be one of {BALANCES}, got {balance!r}")
        self.ce_coef = check_coef("ce_coef", ce_coef)
        self.gap_coef = check_coef("gap_coef", gap_coef)
        self.resource_coef = check_coef("resource_coef", resource_coef)
        mask_lr = check_coef("mask_lr", mask_lr)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or \
                not (math.isfinite(float(temperature)) and float(temperature) > 0):
            raise ValueError(f"{name}: temperature must be a finite number > 0, got {temperature!r}")
        self.temperature = float(temperature)
        self.balance = balance
        self.terms = resolve_terms(ablate, enable)
        self.model = model
        self.optimizer = optimizer
        u = model.u
        in_opt = [p for g in optimizer.param_groups for p in g["params"]]
        if any(p is u for p in in_opt):
            raise ValueError(f"{name}: optimizer holds the mask logits u; give it model.weight_parameters() "
                             "and the masks to mask_optimizer")
        if mask_optimizer is None:
            mask_optimizer = torch.optim.SGD(model.mask_parameters(), lr=mask_lr)
        elif not isinstance(mask_optimizer, torch.optim.Optimizer):
            raise TypeError(f"{name}: mask_optimizer must be a torch.optim.Optimizer or None, "
                            f"got {type(mask_optimizer).__name__}")
        elif not any(p is u for g in mask_optimizer.param_groups for p in g["params"]):
            raise ValueError(f"{name}: mask_optimizer does not hold model.u (use model.mask_parameters())")
        self.mask_optimizer = mask_optimizer
        self.check_finite = bool(check_finite)
        if resource_target not in RESOURCE_TARGETS:
            raise ValueError(f"{name}: resource_target must be one of {RESOURCE_TARGETS}, got {resource_target!r}")
        self.resource_target = resource_target
        self.num_steps = 0
        self._weights = [p for p in model.weight_parameters()]
        self._has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        # running statistics the forwards update: restored when a step is rejected (bad labels, NaN)
        self._stat_buffers = [b for n, b in model.named_buffers()
                              if n.rsplit(".", 1)[-1].startswith(("running_", "num_batches_tracked"))]
        offs = model.group_offsets.tolist()
        self._group_slices = [(offs[i], offs[i + 1]) for i in range(len(offs) - 1)]

    # ------------------------------------------------------------------ checks
    def check_batch(self, x: torch.Tensor, y: torch.Tensor) -> None:
        name = type(self).__name__
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError(f"{name}.step: x and y must be tensors")
        if y.dim() != 1 or y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise ValueError(f"{name}.step: y must be a 1-D tensor of integer class labels, "
                             f"got shape {tuple(y.shape)} dtype {y.dtype}")
        if x.dim() == 0 or x.shape[0] != y.shape[0]:
            raise ValueError(f"{name}.step: x has batch size {x.shape[0] if x.dim() else 0} but y has {y.shape[0]}")
        if x.shape[0] == 0:
            raise ValueError(f"{name}.step: empty batch")
        if x.shape[0] == 1 and self._has_bn and self.model.training:
            raise ValueError(f"{name}.step: a batch of size 1 cannot train a model with BatchNorm (batch statistics "
                             "of one sample are undefined); use a batch of at least 2 (e.g. drop_last=True)")

    def check_labels(self, y: torch.Tensor, classes: int) -> None:
        bad = (y < 0) | (y >= classes)
        if bool(bad.any()):
            lo, hi = int(y.min()), int(y.max())
            raise ValueError(f"{type(self).__name__}.step: labels must be in [0, {classes}) for a model with {classes} "
                             f"outputs; got labels in [{lo}, {hi}]")

    def resource_loss(self, E: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """R = (F/F_dense − T)². "soft": F = F(E) (the paper). "hard": F = the hard network's FLOPs
        F(k) with a straight-through gradient to E (the authors' demo), so the budget binds the
        network that is exported rather than its expectation."""
        model = self.model
        if self.resource_target == "soft":
            return model.resource_loss()
        widths = E + (keep.to(E.dtype) - E).detach()
        return (model.flops(widths).to(model.u.dtype) / model.dense_flops() - model.target_flops) ** 2

    def snapshot_stats(self) -> list[torch.Tensor]:
        return [b.detach().clone() for b in self._stat_buffers]

    def restore_stats(self, snap: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for b, v in zip(self._stat_buffers, snap):
                b.data.copy_(v)  # .data: a graph may still hold these buffers

    def raise_nonfinite(self, what: dict[str, float]) -> None:
        step = self.num_steps
        vals = ", ".join(f"{k}={v}" for k, v in what.items())
        raise NonFiniteLossError(f"non-finite loss at step {step} ({vals}); nothing was updated (parameters, "
                                 "masks, optimizer states and BatchNorm statistics are as before the step)", step)

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """Optimizer states and the step counter (the model and LR schedulers are saved separately)."""
        return {"optimizer": self.optimizer.state_dict(), "mask_optimizer": self.mask_optimizer.state_dict(),
                "num_steps": self.num_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.mask_optimizer.load_state_dict(state["mask_optimizer"])
        self.num_steps = int(state["num_steps"])

    def zero_grads(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.mask_optimizer.zero_grad(set_to_none=True)
        for p in self._weights:
            p.grad = None
        self.model.u.grad = None


# -------------------------------------------------------------------------------------------- balancing


def balance_u_grad(gL, gG, gR, gid, n_groups: int, mode: str, rc: float) -> torch.Tensor:
    """u.grad from the three u-gradients. gL, gG already carry their coefficients (or are None)."""
    if mode == "none":
        out = rc * gR
        for g in (gL, gG):
            if g is not None:
                out = out + g
        return out

    def norm(g):
        if mode == "paper-global":
            return torch.linalg.vector_norm(g).expand_as(g)
        sq = torch.zeros(n_groups, dtype=g.dtype, device=g.device).index_add_(0, gid, g * g)
        return sq.sqrt()[gid]

    h = torch.zeros_like(gR)
    for g in (gL, gG):
        if g is not None:
            n = norm(g)
            h = h + torch.where(n > 0, g / n.clamp_min(torch.finfo(g.dtype).tiny), torch.zeros_like(g))
    nh, nr = norm(h), norm(gR)
    h = torch.where(nh > 0, h * (nr / nh.clamp_min(torch.finfo(h.dtype).tiny)), torch.zeros_like(h))
    return h + rc * gR
