"""The S2HPruner training step, fused and minimal-work (docs/DESIGN.md §2, the paper's Algorithm 1).

::

    model = s2h.convert(net, torch.randn(1, 3, 32, 32), target_flops=0.15)
    opt = torch.optim.SGD(model.weight_parameters(), lr=0.05, momentum=0.9, weight_decay=3e-4)
    pruner = s2h.S2HPruner(model, opt)                 # mask optimizer: SGD(u, lr=mask_lr)
    for x, y in loader:
        stats = pruner.step(x, y)                      # one iteration of Algorithm 1
    small = model.export()

The gradients, the balancing and the Table 5 ablations: :mod:`s2h.structured.step_base`.

**The minimal-work step** (what :meth:`S2HPruner.step` does, one method per phase; counting a
forward as 1F and a backward as 2F):

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

**Distributed.** Under ``torch.distributed`` (``torchrun``), the wrapped network is put in
``DistributedDataParallel`` (θ gradients all-reduced by DDP, overlapping the backward), ``u`` is
broadcast from rank 0 once, and the raw mask gradients (∂/∂w of the CE and of the gap) are
averaged across ranks *before* the balancing, so every rank computes the same ``u.grad`` as a
single process on the combined batch would: masks and their optimizer state stay identical.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from s2h_kernels import kl_gap_with_grads

from .model import S2HModel
from .step_base import (  # TABLE5, TERMS, ...: re-exported, s2h.structured.step is their documented home too
    BALANCES,
    RESOURCE_TARGETS,
    TABLE5,
    TERMS,
    NonFiniteLossError,
    S2HStepBase,
    balance_u_grad,
    resolve_terms,
    world_size,
)

__all__ = ["S2HPruner", "StepState", "NonFiniteLossError", "TERMS", "TABLE5", "BALANCES", "RESOURCE_TARGETS",
           "resolve_terms"]


@dataclass
class StepState:
    """What one step's phases hand each other (see :meth:`S2HPruner.step`)."""

    x: torch.Tensor
    y: torch.Tensor
    w: torch.Tensor | None = None  # soft masks (with the channel-mask graph to u)
    E: torch.Tensor | None = None  # expected widths
    keep: torch.Tensor | None = None
    w_leaf: torch.Tensor | None = None  # what the network sees: w detached
    snap: list | None = None  # running statistics before the forwards
    ys: torch.Tensor | None = None
    yh: torch.Tensor | None = None
    r: torch.Tensor | None = None  # the resource loss
    stats: list[float] = field(default_factory=list)
    g_ce: torch.Tensor | None = None  # ∂l/∂ys
    g_soft: torch.Tensor | None = None  # ∂d/∂ys
    g_hard: torch.Tensor | None = None  # ∂d/∂yh
    g_w: dict = field(default_factory=dict)  # raw mask gradients: "L" (CE), "G" (gap)
    pending: list = field(default_factory=list)  # cotangents on ys still to carry to w_leaf


class S2HPruner(S2HStepBase):
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
        cuda_streams: run the hard branch on the model's second CUDA stream (CUDA inputs only; not
            under DDP, whose buffer broadcasts and gradient hooks assume one stream).
        hard_channels_last: run the hard (sliced) branch on a channels-last copy of a 4-D input
            (the soft branch keeps the input's layout). oneDNN's NCHW kernels are slow for narrow
            convolutions in isolation, but over a whole ResNet-56 step it did not pay
            (benchmarks/results/step_cpu.md), so it is off by default.
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
        self.cuda_streams = bool(cuda_streams)
        self.hard_channels_last = hard_channels_last
        #: phase timings for profiling (benchmarks/test_bench_step.py): set to ``{}`` to collect
        self.timings: dict | None = None
        offs = model.group_offsets
        sizes = (offs[1:] - offs[:-1]).to(torch.int64)
        self._gid = torch.repeat_interleave(torch.arange(len(sizes), device=offs.device), sizes)
        self._n_groups = len(sizes)
        world = world_size()
        self.ddp = (world > 1) if ddp is None else bool(ddp)
        self.world_size = world if self.ddp else 1
        if self.ddp:
            if not dist.is_initialized():
                raise RuntimeError("S2HPruner: ddp=True needs torch.distributed to be initialised (torchrun)")
            kw = dict(ddp_kwargs or {})
            dev = model.u.device
            if dev.type == "cuda" and "device_ids" not in kw:
                kw["device_ids"] = [dev.index]
            with torch.no_grad():
                dist.broadcast(model.u.data, src=0)
            self._net = DistributedDataParallel(model.model, **kw)
        else:
            self._net = model.model

    @property
    def _mask_soft(self) -> bool:  # a gradient reaches the masks through the soft network
        return "L_u" in self.terms or "G_u" in self.terms

    @property
    def _soft_grad(self) -> bool:
        return self._mask_soft or "L_theta" in self.terms or "G_soft_theta" in self.terms

    @property
    def _hard_grad(self) -> bool:
        return "G_hard_theta" in self.terms

    @property
    def network(self) -> nn.Module:
        """What the step runs: ``model.model``, or its DistributedDataParallel wrapper."""
        return self._net

    def _tick(self, name: str) -> None:
        t = self.timings
        if t is None:
            return
        now = time.perf_counter()
        last = t.get("_last")
        if last is not None and name != "start":
            t[name] = t.get(name, 0.0) + now - last
        t["_last"] = now

    def _all_reduce_mean(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Average tensors across ranks (one collective). Identity with one process."""
        if not self.ddp or not tensors:
            return tensors
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        flat.div_(self.world_size)
        out, pos = [], 0
        for t in tensors:
            out.append(flat[pos:pos + t.numel()].view_as(t))
            pos += t.numel()
        return out

    # ------------------------------------------------------------------ the step
    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        """One iteration: masks, forwards, fused gap, minimal-work backward, mask gradient, balancing, update.

        Returns ``loss`` (soft CE), ``acc`` (soft top-1 on the batch), ``hard_acc``, ``gap`` (KL),
        ``resource_loss``, ``soft_flops`` and ``hard_flops`` (fractions of dense), ``keep``
        (kept channels per group, by name) and ``step`` (the step's index).
        """
        self.check_batch(x, y)
        self.zero_grads()
        s = StepState(x, y)
        try:
            self.compute_masks(s)
            self.run_forwards(s)
            self.compute_gap(s)
            self.run_backward(s)
            self.compute_mask_gradient(s)
            self.balance_mask_gradient(s)
            self.update_parameters()
        finally:
            self.model.mask_state.clear()
        return self.step_result(s)

    def compute_masks(self, s: StepState) -> None:
        """Phase 1: ``w, E, keep`` from one ``channel_masks`` call; the network sees ``w`` through a detached leaf."""
        self._tick("start")
        s.w, s.E, s.keep = self.model.update_masks()
        s.w_leaf = s.w.detach().requires_grad_(self._mask_soft)
        self.model.mask_state.w = s.w_leaf
        s.snap = self.snapshot_stats()
        self._tick("masks")

    def run_forwards(self, s: StepState) -> None:
        """Phase 2: the soft and the hard forward (the hard one on the model's side stream on CUDA)."""
        x, net, model = s.x, self._net, self.model
        if x.is_cuda and self.cuda_streams and not self.ddp:
            cur = torch.cuda.current_stream(x.device)
            side = model.side_stream(x.device)
            side.wait_stream(cur)
            with torch.cuda.stream(side):
                with torch.set_grad_enabled(self._hard_grad), model.branch("hard"):
                    s.yh = net(x)
            with torch.set_grad_enabled(self._soft_grad), model.branch("soft"):
                s.ys = net(x)
            cur.wait_stream(side)
            x.record_stream(side)
            s.yh.record_stream(cur)
        else:
            with torch.set_grad_enabled(self._soft_grad), model.branch("soft"):
                s.ys = net(x)
            self._tick("soft_forward")
            xh = x
            if self.hard_channels_last and x.dim() == 4:
                xh = x.contiguous(memory_format=torch.channels_last)
            with torch.set_grad_enabled(self._hard_grad), model.branch("hard"):
                s.yh = net(xh)
        if s.ys.dim() != 2:
            raise ValueError(f"S2HPruner.step: the model must return (batch, classes) logits, got {tuple(s.ys.shape)}")
        try:
            self.check_labels(s.y, s.ys.shape[1])
        except ValueError:
            self.restore_stats(s.snap)
            raise
        s.y = s.y.long()
        self._tick("forward")

    def compute_gap(self, s: StepState) -> None:
        """Phase 3: the gap and both of its gradients in one pass; CE and its gradient in closed form."""
        model, ys, y = self.model, s.ys, s.y
        ysd = ys.detach()
        gap, s.g_soft, s.g_hard = kl_gap_with_grads(ysd, s.yh.detach(), self.temperature, "batchmean")
        logp = F.log_softmax(ysd if ysd.dtype in (torch.float32, torch.float64) else ysd.float(), dim=1)
        loss = F.nll_loss(logp, y)
        s.r = self.resource_loss(s.E, s.keep)
        with torch.no_grad():
            B = ys.shape[0]
            hard_keep = s.keep.to(s.E.dtype)
            s.stats = torch.stack([
                loss.double(), gap.double(), s.r.detach().double(),
                (ysd.argmax(1) == y).double().mean(), (s.yh.detach().argmax(1) == y).double().mean(),
                model.flops(s.E.detach()).double() / model.dense_flops(),
                model.flops(hard_keep).double() / model.dense_flops(),
            ]).tolist()
        if self.check_finite and not all(math.isfinite(v) for v in s.stats[:3]):
            self.restore_stats(s.snap)
            self.raise_nonfinite({"loss": s.stats[0], "gap": s.stats[1], "resource_loss": s.stats[2]})
        s.snap = None
        with torch.no_grad():
            g_ce = logp.exp()
            g_ce[torch.arange(B, device=y.device), y] -= 1.0
            s.g_ce = g_ce.div_(B).to(ys.dtype)  # ∂l/∂ys
        self._tick("gap")

    def run_backward(self, s: StepState) -> None:
        """Phase 4: ONE backward, CE through soft (to θ and w_leaf), the gap's hard side through hard (to θ)."""
        T, ce, gp = self.terms, self.ce_coef, self.gap_coef
        c_soft = None
        if "L_theta" in T:
            c_soft = ce * s.g_ce
        if "G_soft_theta" in T:
            c_soft = gp * s.g_soft if c_soft is None else c_soft + gp * s.g_soft
        w_in_main = "L_u" in T and "L_theta" in T and "G_soft_theta" not in T
        if "L_u" in T and not w_in_main:
            s.pending.append(("L", ce * s.g_ce))
        if "G_u" in T:
            s.pending.append(("G", gp * s.g_soft))
        roots, cots = [], []
        if c_soft is not None:
            roots.append(s.ys)
            cots.append(c_soft)
        if self._hard_grad:
            roots.append(s.yh)
            cots.append(gp * s.g_hard)
        if roots:
            torch.autograd.backward(roots, cots, retain_graph=bool(s.pending),
                                    inputs=None if w_in_main else self._weights)
        s.g_w = {"L": s.w_leaf.grad if w_in_main else None, "G": None}
        self._tick("backward")

    def compute_mask_gradient(self, s: StepState) -> None:
        """Phase 5: the gap's soft side (and L_u when not in the main call) to w_leaf only, no weight
        gradient; under DDP the raw mask gradients are averaged before the (non-linear) balancing."""
        for i, (key, cot) in enumerate(s.pending):
            (s.g_w[key],) = torch.autograd.grad(s.ys, s.w_leaf, cot, retain_graph=i < len(s.pending) - 1)
        s.ys = s.yh = None  # frees both graphs
        self._tick("mask_pass")
        present = [k for k in ("L", "G") if s.g_w[k] is not None]
        if self.ddp and present:
            for k, v in zip(present, self._all_reduce_mean([s.g_w[k] for k in present])):
                s.g_w[k] = v

    def balance_mask_gradient(self, s: StepState) -> None:
        """Phase 6: u.grad from the channel-mask VJPs (tiny) of the raw mask gradients, balanced."""
        u, rc = self.model.u, self.resource_coef
        present = [k for k in ("L", "G") if s.g_w[k] is not None]
        if self.balance == "none":
            tensors, grads = [s.r], [torch.full_like(s.r, rc)]
            gsum = None
            for k in present:
                gsum = s.g_w[k] if gsum is None else gsum + s.g_w[k]
            if gsum is not None:
                tensors.append(s.w)
                grads.append(gsum)
            (gu,) = torch.autograd.grad(tensors, [u], grads, allow_unused=True)
            u.grad = gu if gu is not None else torch.zeros_like(u)
        else:
            (gR,) = torch.autograd.grad(s.r, u, retain_graph=bool(present), allow_unused=True)
            if gR is None:
                gR = torch.zeros_like(u)
            gu = {}
            for i, k in enumerate(present):
                (gu[k],) = torch.autograd.grad(s.w, u, s.g_w[k], retain_graph=i < len(present) - 1)
            u.grad = balance_u_grad(gu.get("L"), gu.get("G"), gR, self._gid, self._n_groups, self.balance, rc)
        self._tick("u_grad")

    def update_parameters(self) -> None:
        """Phase 7: both optimizer steps."""
        self.mask_optimizer.step()
        self.optimizer.step()
        self._tick("optimizers")

    def step_result(self, s: StepState) -> dict[str, Any]:
        """The step's statistics; advances the step counter."""
        stats = s.stats
        out = {
            "step": self.num_steps, "loss": stats[0], "gap": stats[1], "resource_loss": stats[2],
            "acc": stats[3], "hard_acc": stats[4], "soft_flops": stats[5], "hard_flops": stats[6],
            "keep": {g.name: int(k) for g, k in zip(self.model.groups, s.keep.tolist())},
        }
        self.num_steps += 1
        return out
