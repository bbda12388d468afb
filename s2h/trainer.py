"""The S2HPruner training step, fused and minimal-work (DESIGN §2, the paper's Algorithm 1).

::

    model = s2h.convert(net, torch.randn(1, 3, 32, 32), target_flops=0.15)
    opt = torch.optim.SGD(model.weight_parameters(), lr=0.05, momentum=0.9, weight_decay=3e-4)
    pruner = s2h.S2HPruner(model, opt)                 # mask optimizer: SGD(u, lr=mask_lr)
    for x, y in loader:
        stats = pruner.step(x, y)                      # one iteration of Algorithm 1
    small = model.export()

Gradients (g_L: soft cross-entropy; g_G: the gap d = KL(softmax(ys/T) || softmax(yh/T)), batchmean,
no T² factor; g_R: ``model.resource_loss()``)::

    θ.grad = ce·g_L(θ, through soft) + gap·g_G(θ, through hard only)
    u.grad = ce·g_L(u) + gap·g_G(u, through soft) + rc·g_R(u)                       balance="none"
    u.grad = ‖g_R‖·ĝ/‖ĝ‖ + rc·g_R,  ĝ = g_L(u)/‖g_L(u)‖ + g_G(u)/‖g_G(u)‖        balance="paper"

with the norms taken per dependency group ("paper", the authors' demo) or over all of u
("paper-global"). A term whose coefficient or gradient is zero drops out of ĝ.

**The minimal-work step** (what :meth:`S2HPruner.step` does; counting a forward as 1F and a
backward as 2F):

1. ``update_masks()``: ``w, E, keep`` for every group from ONE ``channel_masks`` call. The network
   sees ``w`` through a detached leaf ``w_leaf``, so every gradient that reaches the masks stops
   at ``w_leaf`` and is carried to ``u`` by the (tiny) channel-mask VJP afterwards.
2. Soft forward ``ys = N(θ⊙w)(x)`` (1F) and hard forward ``yh = N(θ⟨m⟩)(x)`` on sliced weights
   (f·F at a FLOPs fraction f). On CUDA the hard branch runs on a second stream, so its forward
   and (autograd keeps the forward's stream) its backward overlap the soft work.
3. ``s2h_kernels.kl_gap_with_grads``: the gap and both of its gradients from one pass; the CE
   gradient ``(softmax(ys) − onehot)/B`` in closed form. Nothing is recomputed.
4. ONE backward call with two roots: ``ys`` with cotangent ``ce·∂l/∂ys`` and ``yh`` with
   ``gap·∂d/∂yh`` (2F + 2f·F). It fills θ.grad and ``w_leaf.grad = ce·∂l/∂w``.
5. ``torch.autograd.grad(ys, w_leaf, grad_outputs=∂d/∂ys)``: the gap's soft side reaches the
   masks only. Autograd computes input gradients only (1F): no weight gradient is computed.
6. ``r`` is differentiated on its own tiny FLOPs graph (E → u); the balancing combines the three
   u-gradients; ``optimizer.step()`` and ``mask_optimizer.step()``.

Total (4 + 3f)F against 3F for a plain dense step. No gradient is computed and then thrown away:
ablated terms are never computed (a hard branch with no θ term runs under ``no_grad``).

**Ablations** (Table 5): ``ablate`` names terms to disable among ``L_theta`` (g_L→θ),
``G_hard_theta`` (g_G→θ through hard), ``L_u`` (g_L→u) and ``G_u`` (g_G→u). ``G_soft_theta``
(g_G→θ through soft, which the paper blocks) is off by default; ``enable=("G_soft_theta",)``
turns it on for Table 5's first row. :data:`TABLE5` lists the rows. g_R→u is always on.

**Distributed.** Under ``torch.distributed`` (``torchrun``), the wrapped network is put in
``DistributedDataParallel`` (θ gradients all-reduced by DDP, overlapping the backward), ``u`` is
broadcast from rank 0 once, and the raw mask gradients (∂/∂w of the CE and of the gap) are
averaged across ranks *before* the balancing, so every rank computes the same ``u.grad`` as a
single process on the combined batch would: masks and their optimizer state stay identical.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import branch
from .model import S2HModel

__all__ = ["S2HPruner", "NonFiniteLossError", "TERMS", "TABLE5", "BALANCES", "resolve_terms"]

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


def _check_coef(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)) or float(v) < 0:
        raise ValueError(f"S2HPruner: {name} must be a finite number >= 0, got {v!r}")
    return float(v)


def _dist_world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _S2HStepBase:
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
        self.ce_coef = _check_coef("ce_coef", ce_coef)
        self.gap_coef = _check_coef("gap_coef", gap_coef)
        self.resource_coef = _check_coef("resource_coef", resource_coef)
        mask_lr = _check_coef("mask_lr", mask_lr)
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
    def _check_batch(self, x: torch.Tensor, y: torch.Tensor) -> None:
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

    def _check_labels(self, y: torch.Tensor, classes: int) -> None:
        bad = (y < 0) | (y >= classes)
        if bool(bad.any()):
            lo, hi = int(y.min()), int(y.max())
            raise ValueError(f"{type(self).__name__}.step: labels must be in [0, {classes}) for a model with {classes} "
                             f"outputs; got labels in [{lo}, {hi}]")

    def _resource_loss(self, E: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """R = (F/F_dense − T)². "soft": F = F(E) (the paper). "hard": F = the hard network's FLOPs
        F(k) with a straight-through gradient to E (the authors' demo), so the budget binds the
        network that is exported rather than its expectation."""
        model = self.model
        if self.resource_target == "soft":
            return model.resource_loss()
        widths = E + (keep.to(E.dtype) - E).detach()
        return (model._flops(widths).to(model.u.dtype) / model.dense_flops() - model.target_flops) ** 2

    def _snapshot_stats(self) -> list[torch.Tensor]:
        return [b.detach().clone() for b in self._stat_buffers]

    def _restore_stats(self, snap: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for b, v in zip(self._stat_buffers, snap):
                b.data.copy_(v)  # .data: a graph may still hold these buffers

    def _raise_nonfinite(self, what: dict[str, float]) -> None:
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

    def _zero_grads(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.mask_optimizer.zero_grad(set_to_none=True)
        for p in self._weights:
            p.grad = None
        self.model.u.grad = None


# -------------------------------------------------------------------------------------------- balancing


def _balance_vectorised(gL, gG, gR, gid, n_groups: int, mode: str, rc: float) -> torch.Tensor:
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


# -------------------------------------------------------------------------------------------- fused trainer


class S2HPruner(_S2HStepBase):
    """S2HPruner's training step (Algorithm 1), fused and minimal-work; see the module docstring.

    Args:
        model: an :class:`~s2h.S2HModel` from :func:`s2h.convert` (it carries ``target_flops``).
        optimizer: any optimizer over ``model.weight_parameters()``.
        mask_optimizer: any optimizer over ``model.mask_parameters()``; default ``SGD(lr=mask_lr)``.
        ce_coef, gap_coef: β and γ for θ (0.5 and 5 for CNNs, 1 and 1 for Transformers, App. A4),
            and for u with ``balance="none"``.
        resource_coef: the coefficient of g_R→u (5).
        temperature: T of the gap's softmaxes (no T² factor).
        balance: "paper" (per group), "paper-global" or "none".
        ablate: gradient terms to disable (Table 5); enable: ``("G_soft_theta",)`` to add g_G→θ
            through the soft network.
        ddp: wrap the network in DistributedDataParallel; default: when torch.distributed is
            initialised with more than one process.
        cuda_streams: run the hard branch on a second CUDA stream (CUDA inputs only; not under DDP,
            whose buffer broadcasts and gradient hooks assume one stream).
        hard_channels_last: run the hard (sliced) branch on a channels-last copy of a 4-D input
            (the soft branch keeps the input's layout). oneDNN's NCHW kernels are slow for narrow
            convolutions in isolation (an 8-channel 32x32 conv's forward+backward costs more than the
            16-channel one's, channels-last 2.4x less), but over a whole ResNet-56 step it was a wash
            on 1 thread and slower on 2 (benchmarks/results/step_cpu.md), so it is off by default.
        check_finite: raise :class:`NonFiniteLossError` (before updating anything) on a NaN/inf loss.
        resource_target: "soft" (the paper: R on the expected FLOPs F(E)) or "hard" (R on the hard
            network's FLOPs, straight-through to E, as in the authors' demo).
    """

    def __init__(self, model: S2HModel, optimizer: torch.optim.Optimizer,
                 mask_optimizer: torch.optim.Optimizer | None = None, mask_lr: float = 0.01,
                 ce_coef: float = 0.5, gap_coef: float = 5.0, resource_coef: float = 5.0,
                 temperature: float = 1.0, balance: str = "paper", ablate: Sequence[str] = (), *,
                 enable: Sequence[str] = (), ddp: bool | None = None, cuda_streams: bool = True,
                 hard_channels_last: bool = False, check_finite: bool = True,
                 resource_target: str = "soft", ddp_kwargs: dict | None = None):
        super().__init__(model, optimizer, mask_optimizer, mask_lr, ce_coef, gap_coef, resource_coef,
                         temperature, balance, ablate, enable=enable, check_finite=check_finite,
                         resource_target=resource_target)
        from s2h_kernels import kl_gap_with_grads

        self._kl_gap_with_grads = kl_gap_with_grads
        self.cuda_streams = bool(cuda_streams)
        self.hard_channels_last = hard_channels_last
        self.timings: dict | None = None
        self._side = {}
        offs = model.group_offsets
        sizes = (offs[1:] - offs[:-1]).to(torch.int64)
        self._gid = torch.repeat_interleave(torch.arange(len(sizes), device=offs.device), sizes)
        self._n_groups = len(sizes)
        world = _dist_world()
        self.ddp = (world > 1) if ddp is None else bool(ddp)
        self.world_size = world if self.ddp else 1
        if self.ddp:
            import torch.distributed as dist
            from torch.nn.parallel import DistributedDataParallel as DDP

            if not dist.is_initialized():
                raise RuntimeError("S2HPruner: ddp=True needs torch.distributed to be initialised (torchrun)")
            kw = dict(ddp_kwargs or {})
            dev = model.u.device
            if dev.type == "cuda" and "device_ids" not in kw:
                kw["device_ids"] = [dev.index]
            with torch.no_grad():
                dist.broadcast(model.u.data, src=0)
            self._net = DDP(model.model, **kw)
        else:
            self._net = model.model

    @property
    def network(self) -> nn.Module:
        """What the step runs: ``model.model``, or its DistributedDataParallel wrapper."""
        return self._net

    def _tick(self, name: str) -> None:
        # phase timings for profiling (benchmarks/test_bench_step.py): set ``self.timings = {}``
        t = self.timings
        if t is None:
            return
        import time

        now = time.perf_counter()
        last = t.get("_last")
        if last is not None and name != "start":
            t[name] = t.get(name, 0.0) + now - last
        t["_last"] = now

    def _hard_cl(self, x: torch.Tensor) -> bool:
        return bool(self.hard_channels_last) and x.dim() == 4

    def _side_stream(self, device):
        s = self._side.get(device)
        if s is None:
            s = self._side[device] = torch.cuda.Stream(device=device)
        return s

    def _all_reduce_mean(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Average tensors across ranks (one collective). Identity with one process."""
        if not self.ddp or not tensors:
            return tensors
        import torch.distributed as dist

        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        flat.div_(self.world_size)
        out, pos = [], 0
        for t in tensors:
            out.append(flat[pos:pos + t.numel()].view_as(t))
            pos += t.numel()
        return out

    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        """One iteration: forwards, fused gap, minimal-work backward, balancing, both optimizer steps.

        Returns ``loss`` (soft CE), ``acc`` (soft top-1 on the batch), ``hard_acc``, ``gap`` (KL),
        ``resource_loss``, ``soft_flops`` and ``hard_flops`` (fractions of dense), ``keep``
        (kept channels per group, by name) and ``step`` (the step's index).
        """
        self._check_batch(x, y)
        model, net, T = self.model, self._net, self.terms
        self._zero_grads()
        u = model.u
        ce, gp, rc = self.ce_coef, self.gap_coef, self.resource_coef
        mask_soft = "L_u" in T or "G_u" in T
        soft_grad = mask_soft or "L_theta" in T or "G_soft_theta" in T
        hard_grad = "G_hard_theta" in T

        self._tick("start")
        # 1. masks: one channel_masks call; the network sees w through a detached leaf
        w, E, keep = model.update_masks()
        st = model._mask_state
        w_leaf = w.detach().requires_grad_(mask_soft)
        st.w = w_leaf
        snap = self._snapshot_stats()
        try:
            self._tick("masks")
            # 2. soft and hard forwards (hard on a side stream on CUDA)
            if x.is_cuda and self.cuda_streams and not self.ddp:
                cur = torch.cuda.current_stream(x.device)
                side = self._side_stream(x.device)
                side.wait_stream(cur)
                with torch.cuda.stream(side):
                    with torch.set_grad_enabled(hard_grad), branch("hard"):
                        yh = net(x)
                with torch.set_grad_enabled(soft_grad), branch("soft"):
                    ys = net(x)
                cur.wait_stream(side)
                x.record_stream(side)
                yh.record_stream(cur)
            else:
                with torch.set_grad_enabled(soft_grad), branch("soft"):
                    ys = net(x)
                self._tick("soft_forward")
                xh = x
                if self._hard_cl(x):
                    xh = x.contiguous(memory_format=torch.channels_last)
                with torch.set_grad_enabled(hard_grad), branch("hard"):
                    yh = net(xh)
            if ys.dim() != 2:
                raise ValueError(f"S2HPruner.step: the model must return (batch, classes) logits, got {tuple(ys.shape)}")
            classes = ys.shape[1]
            try:
                self._check_labels(y, classes)
            except ValueError:
                self._restore_stats(snap)
                raise
            y = y.long()

            self._tick("forward")
            # 3. the gap and both of its gradients in one pass; CE and its gradient in closed form
            ysd = ys.detach()
            gap, g_soft, g_hard = self._kl_gap_with_grads(ysd, yh.detach(), self.temperature, "batchmean")
            logp = F.log_softmax(ysd if ysd.dtype in (torch.float32, torch.float64) else ysd.float(), dim=1)
            loss = F.nll_loss(logp, y)
            r = self._resource_loss(E, keep)
            with torch.no_grad():
                B = ys.shape[0]
                hard_keep = keep.to(E.dtype)
                stats = torch.stack([
                    loss.double(), gap.double(), r.detach().double(),
                    (ysd.argmax(1) == y).double().mean(), (yh.detach().argmax(1) == y).double().mean(),
                    model._flops(E.detach()).double() / model.dense_flops(),
                    model._flops(hard_keep).double() / model.dense_flops(),
                ]).tolist()
            if self.check_finite and not all(math.isfinite(v) for v in stats[:3]):
                self._restore_stats(snap)
                self._raise_nonfinite({"loss": stats[0], "gap": stats[1], "resource_loss": stats[2]})
            del snap
            with torch.no_grad():
                g_ce = logp.exp()
                g_ce[torch.arange(B, device=y.device), y] -= 1.0
                g_ce = g_ce.div_(B).to(ys.dtype)  # ∂l/∂ys

            self._tick("gap")
            # 4. ONE backward: CE through soft (to θ and w_leaf), the gap's hard side through hard (to θ)
            c_soft = None
            if "L_theta" in T:
                c_soft = ce * g_ce
            if "G_soft_theta" in T:
                c_soft = gp * g_soft if c_soft is None else c_soft + gp * g_soft
            w_in_main = "L_u" in T and "L_theta" in T and "G_soft_theta" not in T
            pending = []  # cotangents on ys still to be carried to w_leaf (input gradients only)
            if "L_u" in T and not w_in_main:
                pending.append(("L", ce * g_ce))
            if "G_u" in T:
                pending.append(("G", gp * g_soft))
            roots, cots = [], []
            if c_soft is not None:
                roots.append(ys)
                cots.append(c_soft)
            if hard_grad:
                roots.append(yh)
                cots.append(gp * g_hard)
            if roots:
                torch.autograd.backward(roots, cots, retain_graph=bool(pending),
                                        inputs=None if w_in_main else self._weights)
            g_w = {"L": w_leaf.grad if w_in_main else None, "G": None}
            self._tick("backward")
            # 5. the gap's soft side (and L_u when not in the main call): to w_leaf only, no weight gradient
            for i, (key, cot) in enumerate(pending):
                (g_w[key],) = torch.autograd.grad(ys, w_leaf, cot, retain_graph=i < len(pending) - 1)
            del ys, yh

            self._tick("mask_pass")
            # DDP: average the raw mask gradients before the (non-linear) balancing
            present = [k for k in ("L", "G") if g_w[k] is not None]
            if self.ddp and present:
                for k, v in zip(present, self._all_reduce_mean([g_w[k] for k in present])):
                    g_w[k] = v

            # 6. u.grad: channel-mask VJPs (tiny), balancing
            if self.balance == "none":
                tensors, grads = [r], [torch.full_like(r, rc)]
                gsum = None
                for k in present:
                    gsum = g_w[k] if gsum is None else gsum + g_w[k]
                if gsum is not None:
                    tensors.append(w)
                    grads.append(gsum)
                (gu,) = torch.autograd.grad(tensors, [u], grads, allow_unused=True)
                u.grad = gu if gu is not None else torch.zeros_like(u)
            else:
                (gR,) = torch.autograd.grad(r, u, retain_graph=bool(present), allow_unused=True)
                if gR is None:
                    gR = torch.zeros_like(u)
                gu = {}
                for i, k in enumerate(present):
                    (gu[k],) = torch.autograd.grad(w, u, g_w[k], retain_graph=i < len(present) - 1)
                u.grad = _balance_vectorised(gu.get("L"), gu.get("G"), gR, self._gid, self._n_groups,
                                             self.balance, rc)
            self._tick("u_grad")
            self.mask_optimizer.step()
            self.optimizer.step()
            self._tick("optimizers")
        finally:
            st.clear()
        keep_list = keep.tolist()
        out = {
            "step": self.num_steps, "loss": stats[0], "gap": stats[1], "resource_loss": stats[2],
            "acc": stats[3], "hard_acc": stats[4], "soft_flops": stats[5], "hard_flops": stats[6],
            "keep": {g.name: int(k) for g, k in zip(model.groups, keep_list)},
        }
        self.num_steps += 1
        return out
