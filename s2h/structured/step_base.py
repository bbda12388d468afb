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
import warnings
from typing import Any, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .model import S2HModel

__all__ = ["S2HStepBase", "NonFiniteLossError", "TERMS", "TABLE5", "BALANCES", "RESOURCE_TARGETS", "DEFAULTS",
           "PAPER_SETTINGS", "resolve_terms", "all_reduce_mean", "balance_u_grad", "check_coef", "check_optimizer",
           "default_mask_optimizer", "world_size"]

TERMS = ("L_theta", "G_hard_theta", "G_soft_theta", "L_u", "G_u")
DEFAULT_OFF = ("G_soft_theta",)
BALANCES = ("paper", "paper-global", "none")
RESOURCE_TARGETS = ("soft", "hard")
INT_LABELS = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)

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


#: The defaults of :class:`s2h.S2HPruner` and ``python -m s2h prune``: Adam at 0.02 on the mask
#: logits, θ coefficients β = γ = 1, the resource loss on the hard network's FLOPs. They reach the
#: FLOPs target in a short run (README); the paper's CNN settings are :data:`PAPER_SETTINGS`.
DEFAULTS = {"mask_optimizer": "adam", "mask_lr": 0.02, "ce_coef": 1.0, "gap_coef": 1.0, "resource_coef": 5.0,
            "resource_target": "hard"}
#: What reproduces the paper's CNN runs (Algorithm 1, Appendix A4): ``S2HPruner(..., **PAPER_SETTINGS)``.
#: (Its Transformer runs use ce_coef = gap_coef = 1.)
PAPER_SETTINGS = {"ce_coef": 0.5, "gap_coef": 5.0, "resource_target": "soft"}

_OPTIMIZER_METHODS = ("step", "zero_grad", "state_dict", "load_state_dict")


def check_optimizer(owner: str, what: str, opt) -> None:
    """Any optimizer-like object: ``param_groups`` and the four methods (wrappers such as timm's
    Lookahead or Lightning's are accepted, not only ``torch.optim.Optimizer`` subclasses)."""
    ok = hasattr(opt, "param_groups") and all(callable(getattr(opt, m, None)) for m in _OPTIMIZER_METHODS)
    if not ok:
        raise TypeError(f"{owner}: {what} must be an optimizer (param_groups, step, zero_grad, state_dict, "
                        f"load_state_dict), got {type(opt).__name__}")


def default_mask_optimizer(model: S2HModel, lr: float = DEFAULTS["mask_lr"]):
    """The default mask optimizer: ``Adam(model.mask_parameters(), lr)``."""
    return torch.optim.Adam(model.mask_parameters(), lr=lr)


class S2HStepBase:
    """Constructor, validation and checkpoint state shared by the fused trainer and the reference."""

    def __init__(self, model: S2HModel, optimizer: torch.optim.Optimizer,
                 mask_optimizer: torch.optim.Optimizer | None = None, mask_lr: float = DEFAULTS["mask_lr"],
                 ce_coef: float = DEFAULTS["ce_coef"], gap_coef: float = DEFAULTS["gap_coef"],
                 resource_coef: float = DEFAULTS["resource_coef"], temperature: float = 1.0, balance: str = "paper",
                 ablate: Sequence[str] = (), *, enable: Sequence[str] = (), check_finite: bool = True,
                 resource_target: str = DEFAULTS["resource_target"], label_smoothing: float = 0.0):
        name = type(self).__name__
        if not isinstance(model, S2HModel):
            raise TypeError(f"{name}: model must be an S2HModel from s2h.convert, got {type(model).__name__}")
        check_optimizer(name, "optimizer", optimizer)
        if balance not in BALANCES:
            raise ValueError(f"{name}: balance must be one of {BALANCES}, got {balance!r}")
        self.ce_coef = check_coef("ce_coef", ce_coef)
        self.gap_coef = check_coef("gap_coef", gap_coef)
        self.resource_coef = check_coef("resource_coef", resource_coef)
        mask_lr = check_coef("mask_lr", mask_lr)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or \
                not (math.isfinite(float(temperature)) and float(temperature) > 0):
            raise ValueError(f"{name}: temperature must be a finite number > 0, got {temperature!r}")
        self.label_smoothing = check_coef("label_smoothing", label_smoothing)
        if self.label_smoothing >= 1.0:
            raise ValueError(f"{name}: label_smoothing must be in [0, 1), got {label_smoothing!r}")
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
            mask_optimizer = default_mask_optimizer(model, mask_lr)
        else:
            check_optimizer(name, "mask_optimizer", mask_optimizer)
            if not any(p is u for g in mask_optimizer.param_groups for p in g["params"]):
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
        self._warned_eval = False
        self.scaler = None

    # ------------------------------------------------------------------ checks
    def check_batch(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Host-side checks (shapes and dtypes only: nothing is read from the device)."""
        name = type(self).__name__
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError(f"{name}.step: x and y must be tensors")
        soft = y.dim() == 2 and y.is_floating_point()
        if not soft and (y.dim() != 1 or y.dtype not in INT_LABELS):
            raise ValueError(f"{name}.step: y must be a 1-D tensor of integer class labels or a 2-D float tensor "
                             f"of target probabilities (batch, classes), got shape {tuple(y.shape)} dtype {y.dtype}")
        if x.dim() == 0 or x.shape[0] != y.shape[0]:
            raise ValueError(f"{name}.step: x has batch size {x.shape[0] if x.dim() else 0} but y has {y.shape[0]}")
        if x.shape[0] == 0:
            raise ValueError(f"{name}.step: empty batch")
        if x.shape[0] == 1 and self._has_bn and self.model.training:
            raise ValueError(f"{name}.step: a batch of size 1 cannot train a model with BatchNorm (batch statistics "
                             "of one sample are undefined); use a batch of at least 2 (e.g. drop_last=True)")

    def warn_eval_mode(self) -> None:
        """Warn (once per trainer) when the network is in eval mode: BatchNorm statistics would not be
        updated and dropout would be off, which is rarely what training wants."""
        if self._warned_eval or self.model.model.training:
            return
        self._warned_eval = True
        warnings.warn(f"{type(self).__name__}.step: the model is in eval mode, so BatchNorm running statistics are "
                      "not updated and dropout is off; call model.train() before training (warned once)",
                      UserWarning, stacklevel=3)

    def check_logits(self, ys: torch.Tensor, y: torch.Tensor) -> None:
        if ys.dim() != 2:
            raise ValueError(f"{type(self).__name__}.step: the model must return (batch, classes) logits, got "
                             f"{tuple(ys.shape)}")
        if y.dim() == 2 and y.shape[1] != ys.shape[1]:
            raise ValueError(f"{type(self).__name__}.step: soft targets have {y.shape[1]} classes but the model "
                             f"returns {ys.shape[1]}")

    def label_error(self, classes: int, lo, hi, step: int | None = None) -> ValueError:
        when = "" if step is None else (f" (step {step}; found on the device after the step, whose update was "
                                        "applied)")
        return ValueError(f"{type(self).__name__}.step: labels must be in [0, {classes}) for a model with {classes} "
                          f"outputs; got labels in [{int(lo)}, {int(hi)}]{when}")

    def check_labels(self, y: torch.Tensor, classes: int) -> None:
        """Eager label check (reads the device): integer labels in [0, classes)."""
        if y.dim() != 1:
            return
        bad = (y < 0) | (y >= classes)
        if bool(bad.any()):
            raise self.label_error(classes, y.min(), y.max())

    def targets(self, y: torch.Tensor, classes: int, dtype: torch.dtype) -> torch.Tensor:
        """The CE target distribution (batch, classes): one-hot labels or the given probabilities, with
        label smoothing ε: ``(1 - ε)·t + ε/C`` (what ``F.cross_entropy(label_smoothing=ε)`` uses).
        Integer labels are clamped into range (a bad label is reported by the checks, never indexed)."""
        if y.dim() == 1:
            t = torch.zeros(y.shape[0], classes, dtype=dtype, device=y.device)
            t.scatter_(1, y.long().clamp(0, classes - 1).unsqueeze(1), 1.0)
        else:
            t = y.to(dtype)
        eps = self.label_smoothing
        if eps > 0:
            t = t * (1.0 - eps) + eps / classes
        return t

    def resource_loss(self, E: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """R = (F/F_dense − T)², in fp32 (fp64 for an fp64 model) whatever the model's dtype: MAC
        counts overflow fp16 and bf16 has 3 significant digits. "soft": F = F(E) (the paper).
        "hard": F = the hard network's FLOPs F(k) with a straight-through gradient to E (the authors'
        demo), so the budget binds the network that is exported rather than its expectation."""
        model = self.model
        dt = E.dtype if E.dtype in (torch.float32, torch.float64) else torch.float32
        E = E.to(dt)
        widths = E if self.resource_target == "soft" else E + (keep.to(dt) - E).detach()
        return (model.flops(widths).to(dt) / model.dense_flops() - model.target_flops) ** 2

    def snapshot_stats(self) -> list[torch.Tensor]:
        return [b.detach().clone() for b in self._stat_buffers]

    def restore_stats(self, snap: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for b, v in zip(self._stat_buffers, snap):
                b.data.copy_(v)  # .data: a graph may still hold these buffers

    def raise_nonfinite(self, what: dict[str, float], step: int | None = None) -> None:
        """Eager (``step`` None: the current step, nothing updated) or found after the step's update."""
        vals = ", ".join(f"{k}={v}" for k, v in what.items())
        if step is None:
            raise NonFiniteLossError(f"non-finite loss at step {self.num_steps} ({vals}); nothing was updated "
                                     "(parameters, masks, optimizer states and BatchNorm statistics are as before "
                                     "the step)", self.num_steps)
        raise NonFiniteLossError(f"non-finite loss at step {step} ({vals}); found on the device after that step, "
                                 "whose update was applied: restore the last checkpoint (or pass eager_checks=True "
                                 "to check before updating, at one more device read per step)", step)

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """Optimizer states, the step counter and a GradScaler's state (take it between updates; the
        model and LR schedulers are saved separately)."""
        out = {"optimizer": self.optimizer.state_dict(), "mask_optimizer": self.mask_optimizer.state_dict(),
               "num_steps": self.num_steps}
        if self.scaler is not None:
            out["scaler"] = self.scaler.state_dict()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.mask_optimizer.load_state_dict(state["mask_optimizer"])
        self.num_steps = int(state["num_steps"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    def zero_grads(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.mask_optimizer.zero_grad(set_to_none=True)
        for p in self._weights:
            p.grad = None
        self.model.u.grad = None


# -------------------------------------------------------------------------------------------- balancing


def all_reduce_mean(tensors: list[torch.Tensor], world: int) -> list[torch.Tensor]:
    """Average tensors across ranks (one collective). Identity with one process."""
    if world <= 1 or not tensors:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat.div_(world)
    out, pos = [], 0
    for t in tensors:
        out.append(flat[pos:pos + t.numel()].view_as(t))
        pos += t.numel()
    return out


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
