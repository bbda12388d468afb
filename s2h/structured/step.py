"""The S2HPruner training step, fused and minimal-work (docs/DESIGN.md §2, the paper's Algorithm 1).

::

    model = s2h.convert(net, torch.randn(1, 3, 32, 32), target_flops=0.15)
    opt = torch.optim.SGD(model.weight_parameters(), lr=0.05, momentum=0.9, weight_decay=3e-4)
    pruner = s2h.S2HPruner(model, opt)                 # masks: Adam(u, lr=0.02); β = γ = 1; R on hard FLOPs
    for x, y in loader:
        stats = pruner.step(x, y)                      # one iteration of Algorithm 1
    small = model.export()

Defaults (``DEFAULTS``) reach the FLOPs target in a short run; ``**PAPER_SETTINGS`` (``ce_coef=0.5,
gap_coef=5, resource_target="soft"``) reproduce the paper's CNN runs. The rest: :mod:`.step_base`.

**Recipes.** ``step(x, y)`` is ``backward(x, y)`` (phases 1–5 for one micro-batch, gradients
accumulated) then ``update()`` (phases 6–7): ``accumulate=N`` (or calling ``backward`` N times,
then ``update``) equals one step on the concatenated batch (BatchNorm aside). ``y``: integer
labels or target probabilities (mixup/cutmix), ``label_smoothing=``; ``clip_grad_norm=`` (θ) and
``clip_mask_grad_norm=`` (u); ``scaler=`` a ``torch.amp.GradScaler`` with ``autocast=torch.float16``.

**The minimal-work step** (counting a forward as 1F and a backward as 2F), one method per phase:

1. :meth:`~S2HPruner.compute_masks`: ``w, E, keep`` from ONE ``channel_masks`` call, the keep counts
   read to the host (the step's one device read, which also reads the previous steps' checks).
   The network sees ``w`` through a detached leaf ``w_leaf``.
2. :meth:`~S2HPruner.run_forwards`: soft ``N(θ⊙w)(x)`` (1F) and hard ``N(θ⟨m⟩)(x)`` on sliced weights
   (f·F; on CUDA on the model's second stream).
3. :meth:`~S2HPruner.compute_gap`: the gap and both its gradients from one ``kl_gap_with_grads``;
   the CE gradient ``(softmax(ys)·Σt − t)/B`` in closed form; the checks as a device tensor.
4. :meth:`~S2HPruner.run_backward`: ONE backward with two roots (2F + 2f·F): θ.grad and ``ce·∂l/∂w``.
5. :meth:`~S2HPruner.compute_mask_gradient`: ``autograd.grad(ys, w_leaf, ∂d/∂ys)``: input gradients
   only (1F), no weight gradient.
6. :meth:`~S2HPruner.balance_mask_gradient`: ``r`` on its own tiny FLOPs graph, the balancing; then
   :meth:`~S2HPruner.clip_gradients` and 7. :meth:`~S2HPruner.update_parameters`.

Total (4 + 3f)F against 3F for a plain dense step; ablated terms are never computed.

**Distributed** (``torchrun``): the network in ``DistributedDataParallel``, ``u`` broadcast from rank
0 once, the raw mask gradients averaged *before* the (non-linear) balancing: one process's ``u.grad``.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from s2h_kernels import channel_masks, kl_gap_with_grads

from .model import HARD_WIDTHS, S2HModel
from .step_base import (  # TABLE5, TERMS, ...: re-exported, s2h.structured.step is their documented home too
    BALANCES,
    DEFAULTS,
    PAPER_SETTINGS,
    RESOURCE_TARGETS,
    TABLE5,
    TERMS,
    NonFiniteLossError,
    S2HStepBase,
    all_reduce_mean,
    balance_u_grad,
    check_coef,
    resolve_terms,
    world_size,
)
from .step_stats import DeviceChecks, StepState, StepStats

__all__ = ["S2HPruner", "StepState", "StepStats", "NonFiniteLossError", "TERMS", "TABLE5", "BALANCES",
           "RESOURCE_TARGETS", "DEFAULTS", "PAPER_SETTINGS", "resolve_terms"]

_FULL = (torch.float32, torch.float64)


class S2HPruner(S2HStepBase):
    """S2HPruner's training step (Algorithm 1), fused and minimal-work; see the module docstring.

    Args:
        model: an :class:`~s2h.S2HModel` from :func:`s2h.convert` (it carries ``target_flops``).
        optimizer: any optimizer over ``model.weight_parameters()`` (duck-typed: wrappers work).
        mask_optimizer: any optimizer over ``model.mask_parameters()``; default ``Adam(lr=mask_lr)``.
        mask_lr: the default mask optimizer's learning rate (0.02).
        ce_coef, gap_coef: β and γ for θ (and for u with ``balance="none"``). Default 1 and 1; the
            paper uses 0.5 and 5 for CNNs (``**PAPER_SETTINGS``), 1 and 1 for Transformers (A4).
        resource_coef: the coefficient of g_R→u (5).
        temperature: T of the gap's softmaxes (no T² factor).
        balance: "paper" (per group), "paper-global" or "none".
        ablate: gradient terms to disable (Table 5); enable: ``("G_soft_theta",)`` to add g_G→θ
            through the soft network.
        resource_target: "hard" (default: R on the hard network's FLOPs, straight-through to E, as in
            the authors' demo) or "soft" (the paper: R on the expected FLOPs F(E)).
        label_smoothing: ε of the CE term (as ``F.cross_entropy``); ``y`` may also be probabilities.
        accumulate: ``step`` updates every N calls (micro-batches); N micro-batches equal one step on
            their concatenation (BatchNorm statistics aside).
        clip_grad_norm, clip_mask_grad_norm: clip θ's / u's gradient to this total 2-norm (after
            accumulation, unscaling and balancing); the norms before clipping are in the stats.
        scaler: a ``torch.amp.GradScaler`` (fp16 autocast): cotangents are scaled, both optimizers
            stepped through it, ``scaler.update()`` called once per update.
        autocast: run the forwards under ``torch.autocast(dtype=autocast)`` (e.g. ``torch.float16``,
            ``torch.bfloat16``); the FLOPs, losses and mask updates always run without autocast.
        eager_checks: check labels and finiteness before updating (one more device read per step; a
            failing step changes nothing). Default: the checks run on the device and raise at the
            next read (the next step, or reading the stats), naming the step.
        ddp: wrap the network in DistributedDataParallel (default: under torchrun with > 1 process).
        cuda_streams: the hard branch on the model's second CUDA stream (not under DDP);
            hard_channels_last: the hard branch on a channels-last copy of a 4-D input.
        check_finite: NaN/inf losses raise :class:`NonFiniteLossError`.
    """

    def __init__(self, model: S2HModel, optimizer: torch.optim.Optimizer,
                 mask_optimizer: torch.optim.Optimizer | None = None, mask_lr: float = DEFAULTS["mask_lr"],
                 ce_coef: float = DEFAULTS["ce_coef"], gap_coef: float = DEFAULTS["gap_coef"],
                 resource_coef: float = DEFAULTS["resource_coef"], temperature: float = 1.0, balance: str = "paper",
                 ablate: Sequence[str] = (), *, enable: Sequence[str] = (), ddp: bool | None = None,
                 cuda_streams: bool = True, hard_channels_last: bool = False, check_finite: bool = True,
                 resource_target: str = DEFAULTS["resource_target"], label_smoothing: float = 0.0,
                 accumulate: int = 1, clip_grad_norm: float | None = None, clip_mask_grad_norm: float | None = None,
                 scaler=None, autocast: torch.dtype | None = None, eager_checks: bool = False,
                 ddp_kwargs: dict | None = None):
        super().__init__(model, optimizer, mask_optimizer, mask_lr, ce_coef, gap_coef, resource_coef,
                         temperature, balance, ablate, enable=enable, check_finite=check_finite,
                         resource_target=resource_target, label_smoothing=label_smoothing)
        if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
            raise ValueError(f"S2HPruner: accumulate must be an integer >= 1, got {accumulate!r}")
        self.accumulate = accumulate
        self.clip_grad_norm = None if clip_grad_norm is None else check_coef("clip_grad_norm", clip_grad_norm)
        self.clip_mask_grad_norm = (None if clip_mask_grad_norm is None
                                    else check_coef("clip_mask_grad_norm", clip_mask_grad_norm))
        if scaler is not None and not all(callable(getattr(scaler, m, None))
                                          for m in ("scale", "unscale_", "step", "update")):
            raise TypeError(f"S2HPruner: scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        self.scaler = scaler  # (state_dict/load_state_dict: S2HStepBase)
        if autocast is not None and not isinstance(autocast, torch.dtype):
            raise TypeError(f"S2HPruner: autocast must be a torch.dtype or None, got {autocast!r}")
        self.autocast = autocast
        self.eager_checks = bool(eager_checks)
        self.cuda_streams = bool(cuda_streams)
        self.hard_channels_last = hard_channels_last
        #: phase timings for profiling (benchmarks/test_bench_step.py): set to ``{}`` to collect
        self.timings: dict | None = None
        #: the checks waiting on the device (``checks.reads``: device reads so far)
        self.checks = DeviceChecks(self._raise_for)
        self._state: StepState | None = None
        offs = model.group_offsets
        sizes = (offs[1:] - offs[:-1]).to(torch.int64)
        self._gid = torch.repeat_interleave(torch.arange(len(sizes), device=offs.device), sizes)
        self._n_groups = len(sizes)
        self._divisors = None if all(g.divisor == 1 for g in model.groups) else model.group_divisors
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

    @property
    def pending_micro_batches(self) -> int:
        """Micro-batches accumulated since the last update (0: none)."""
        return 0 if self._state is None else self._state.micro

    def _tick(self, name: str) -> None:
        t = self.timings
        if t is None:
            return
        now = time.perf_counter()
        last = t.get("_last")
        if last is not None and name != "start":
            t[name] = t.get(name, 0.0) + now - last
        t["_last"] = now

    def _no_autocast(self, x: torch.Tensor):
        return torch.autocast(x.device.type, enabled=False) if torch.is_autocast_enabled(x.device.type) \
            else contextlib.nullcontext()

    def _raise_for(self, step: int, v: list[float]) -> None:
        """A pending check read back: ``v = [bad_labels, min, max, loss, gap, resource_loss, classes]``."""
        if v[0]:
            raise self.label_error(int(v[6]), v[1], v[2], step)
        if self.check_finite and not all(abs(t) < float("inf") for t in v[3:6]):
            self.raise_nonfinite({"loss": v[3], "gap": v[4], "resource_loss": v[5]}, step)

    def sync(self) -> None:
        """Read the pending checks now (one device read; raises a failed one)."""
        if len(self.checks):
            self.checks.read([])

    # ------------------------------------------------------------------ the step
    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepStats:
        """One micro-batch: :meth:`backward`, and :meth:`update` every ``accumulate`` calls.

        Returns :class:`StepStats` (read lazily): ``loss`` (soft CE), ``acc`` (soft top-1 on the
        batch), ``hard_acc``, ``gap`` (KL), ``resource_loss``, ``soft_flops`` and ``hard_flops``
        (fractions of dense), ``keep`` (kept channels per group, by name), ``step`` (the update's
        index), ``updated`` (whether this call stepped the optimizers), ``grad_norm`` /
        ``mask_grad_norm`` when clipping.
        """
        stats = self.backward(x, y)
        if self._state.micro >= self.accumulate:
            self.update()
        return stats

    def backward(self, x: torch.Tensor, y: torch.Tensor) -> StepStats:
        """Phases 1–5 for one micro-batch: θ and mask gradients accumulate until :meth:`update`.

        Micro-batches of sizes b_1..b_N followed by ``update()`` equal one step on their
        concatenation (per-sample means over all N·b samples; BatchNorm statistics aside).
        """
        self.check_batch(x, y)
        self.warn_eval_mode()
        s = self._state
        try:
            if s is None:
                self.zero_grads()
                s = self._state = StepState()
                self.compute_masks(s)
            s.x, s.y, s.micro, s.pending = x, y, s.micro + 1, []
            s.b0 = s.b0 or x.shape[0]
            s.n += x.shape[0]
            self.run_forwards(s)
            with self._no_autocast(x):
                self.compute_gap(s)
                self.run_backward(s)
                self.compute_mask_gradient(s)
        except BaseException:
            self.abort()
            raise
        s.x = s.y = None
        return s.stats

    def update(self) -> StepStats:
        """Phases 6–7: finish the accumulated gradients, balance u's, clip, step both optimizers."""
        s = self._state
        if s is None:
            raise RuntimeError("S2HPruner.update: no gradients to apply; call backward(x, y) first")
        stats = s.stats
        try:
            with self._no_autocast(s.keep):
                self.finish_gradients(s)
                self.balance_mask_gradient(s)
                stats.add(**self.clip_gradients())
                self.update_parameters()
        finally:
            self._state = None
            self.model.mask_state.clear()
        self.num_steps += 1
        stats.set_host(updated=True)
        return stats

    def abort(self) -> None:  # drop the accumulated gradients and masks (nothing is updated)
        self._state = None
        self.model.mask_state.clear()
        self.zero_grads()

    def compute_masks(self, s: StepState) -> None:
        """Phase 1: ``w, E, keep`` from one ``channel_masks`` call (fp32 logits for a half/bf16 model);
        the keep counts and earlier steps' checks read in one transfer; the resource loss."""
        self._tick("start")
        model, u = self.model, self.model.u
        if model.hard_width not in HARD_WIDTHS:
            raise ValueError(f"S2HModel: hard_width must be one of {HARD_WIDTHS}, got {model.hard_width!r}")
        um = u if u.dtype in _FULL else u.float()
        if model.groups:
            w, E, keep = channel_masks(um, model.group_offsets, temperature=model.temperature,
                                       divisors=self._divisors, hard_width=model.hard_width)
        else:
            w, E = um.new_zeros(0), um.new_zeros(0)
            keep = torch.zeros(0, dtype=torch.int64, device=u.device)
        keep_list = [int(k) for k in self.checks.read([keep])]
        st = model.mask_state
        st.w, st.expected, st.keep, st.keep_list, st.version = w, E, keep, keep_list, model._mask_version()
        s.w, s.E, s.keep = w, E, keep
        s.w_leaf = w.detach().to(u.dtype).requires_grad_(self._mask_soft)
        st.w = s.w_leaf
        s.r = self.resource_loss(E, keep)
        with torch.no_grad():
            dense = model.dense_flops()
            s.flops = (model.flops(E.detach()) / dense, model.flops(keep) / dense)
        if self.scaler is not None:
            s.scale = self.scaler.scale(torch.ones((), dtype=torch.float32, device=u.device))
        self._tick("masks")

    def run_forwards(self, s: StepState) -> None:
        """Phase 2: the soft and the hard forward (the hard one on the model's side stream on CUDA)."""
        x, net, model = s.x, self._net, self.model
        if self.eager_checks:
            s.snap = self.snapshot_stats()
        cast = (torch.autocast(x.device.type, dtype=self.autocast) if self.autocast is not None
                else contextlib.nullcontext())
        with cast:
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
        self.check_logits(s.ys, s.y)
        if self.eager_checks:
            try:
                self.check_labels(s.y, s.ys.shape[1])
            except ValueError:
                self.restore_stats(s.snap)
                raise
        self._tick("forward")

    def compute_gap(self, s: StepState) -> None:
        """Phase 3: the gap and both of its gradients in one pass; CE (integer or soft targets) and its
        gradient in closed form; the step's checks as one device tensor; the lazy statistics."""
        ys, yh, y = s.ys, s.yh, s.y
        B, C = ys.shape
        dt = ys.dtype if ys.dtype in _FULL else torch.float32
        ysd, yhd = ys.detach().to(dt), yh.detach().to(dt)
        gap, g_soft, g_hard = kl_gap_with_grads(ysd, yhd, self.temperature, "batchmean")
        with torch.no_grad():
            logp = F.log_softmax(ysd, dim=1)
            t = self.targets(y, C, dt)
            loss = -(t * logp).sum() / B
            g_ce = logp.exp_().mul_(t.sum(1, keepdim=True)).sub_(t).div_(B)  # ∂l/∂ys
            cls = y.long() if y.dim() == 1 else t.argmax(1)
            acc = (ysd.argmax(1) == cls).to(dt).mean()
            hard_acc = (yhd.argmax(1) == cls).to(dt).mean()
            zero = loss.new_zeros(())
            if y.dim() == 1:
                yl = y.long()
                lab = (((yl < 0) | (yl >= C)).any().to(dt), yl.min().to(dt), yl.max().to(dt))
            else:
                lab = (zero, zero, zero)
            flags = torch.stack([*lab, loss, gap.to(dt), s.r.detach().to(dt), zero + C]).to(torch.float64)
        if self.eager_checks:
            v = flags.tolist()
            if self.check_finite and not all(abs(t) < float("inf") for t in v[3:6]):
                self.restore_stats(s.snap)
                self.raise_nonfinite({"loss": v[3], "gap": v[4], "resource_loss": v[5]})
        else:
            self.checks.add(self.num_steps, flags)
        s.snap = None
        k = s.x.shape[0] / s.b0 if s.x.shape[0] != s.b0 else None  # the micro-batch's weight
        mult = s.scale if k is None else (k if s.scale is None else s.scale * k)
        s.g_ce, s.g_soft, s.g_hard = (g if mult is None else g * mult for g in (g_ce, g_soft, g_hard))
        s.g_ce, s.g_soft, s.g_hard = s.g_ce.to(ys.dtype), s.g_soft.to(ys.dtype), s.g_hard.to(yh.dtype)
        keep = dict(zip((g.name for g in self.model.groups), self.model.mask_state.keep_list))
        s.stats = StepStats({"step": self.num_steps, "keep": keep, "micro_batch": s.micro - 1, "updated": False},
                            {"loss": loss, "gap": gap, "resource_loss": s.r.detach(), "acc": acc, "hard_acc": hard_acc,
                             "soft_flops": s.flops[0], "hard_flops": s.flops[1]}, self.checks.read)
        self._tick("gap")

    def run_backward(self, s: StepState) -> None:
        """Phase 4: ONE backward, CE through soft (to θ and w_leaf), the gap's hard side through hard (to θ)."""
        T, ce, gp = self.terms, self.ce_coef, self.gap_coef
        c_soft = None
        if "L_theta" in T:
            c_soft = ce * s.g_ce
        if "G_soft_theta" in T:
            c_soft = gp * s.g_soft if c_soft is None else c_soft + gp * s.g_soft
        s.w_in_main = "L_u" in T and "L_theta" in T and "G_soft_theta" not in T
        if "L_u" in T and not s.w_in_main:
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
        last = s.micro % self.accumulate == 0
        sync = self._net.no_sync() if self.ddp and not last else contextlib.nullcontext()
        if roots:
            with sync:
                torch.autograd.backward(roots, cots, retain_graph=bool(s.pending),
                                        inputs=None if s.w_in_main else self._weights)
        self._tick("backward")

    def compute_mask_gradient(self, s: StepState) -> None:
        """Phase 5: the gap's soft side (and L_u when not in the main call) to w_leaf only, no weight
        gradient; accumulated over micro-batches."""
        for i, (key, cot) in enumerate(s.pending):
            (g,) = torch.autograd.grad(s.ys, s.w_leaf, cot, retain_graph=i < len(s.pending) - 1)
            s.g_w[key] = g if s.g_w[key] is None else s.g_w[key] + g
        s.ys = s.yh = None  # frees both graphs
        s.pending = []
        self._tick("mask_pass")

    def finish_gradients(self, s: StepState) -> None:
        """The accumulated gradients as means over all samples (× b0/n); under DDP the raw mask
        gradients averaged across ranks; θ's unscaled by the GradScaler."""
        if s.w_in_main:
            s.g_w["L"] = s.w_leaf.grad
        present = [k for k in ("L", "G") if s.g_w[k] is not None]
        if s.n != s.b0:
            f = s.b0 / s.n
            grads = [p.grad for p in self._weights if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, f)
            for k in present:
                s.g_w[k] = s.g_w[k] * f
        if self.ddp and present:
            for k, v in zip(present, all_reduce_mean([s.g_w[k] for k in present], self.world_size)):
                s.g_w[k] = v
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)

    def balance_mask_gradient(self, s: StepState) -> None:
        """Phase 6: u.grad from the channel-mask VJPs (tiny) of the raw mask gradients, balanced. With a
        GradScaler the balancing runs on scaled gradients (it is homogeneous of degree 1), then
        ``scaler.unscale_(mask_optimizer)`` unscales u.grad and looks for infs."""
        u, rc = self.model.u, self.resource_coef
        present = [k for k in ("L", "G") if s.g_w[k] is not None]
        gw = {k: s.g_w[k].to(s.w.dtype) for k in present}
        if self.balance == "none":
            tensors, grads = [s.r], [torch.full_like(s.r, rc) if s.scale is None else s.scale.to(s.r.dtype) * rc]
            gsum = None
            for k in present:
                gsum = gw[k] if gsum is None else gsum + gw[k]
            if gsum is not None:
                tensors.append(s.w)
                grads.append(gsum)
            (gu,) = torch.autograd.grad(tensors, [u], grads, allow_unused=True)
            u.grad = gu if gu is not None else torch.zeros_like(u)
        else:
            (gR,) = torch.autograd.grad(s.r, u, retain_graph=bool(present), allow_unused=True)
            gR = torch.zeros_like(u) if gR is None else gR
            if s.scale is not None:
                gR = gR * s.scale.to(gR.dtype)
            gu = {}
            for i, k in enumerate(present):
                (gu[k],) = torch.autograd.grad(s.w, u, gw[k], retain_graph=i < len(present) - 1)
            u.grad = balance_u_grad(gu.get("L"), gu.get("G"), gR, self._gid, self._n_groups, self.balance, rc)
        if self.scaler is not None:
            self.scaler.unscale_(self.mask_optimizer)
        self._tick("u_grad")

    def clip_gradients(self) -> dict[str, torch.Tensor]:
        """Clip θ's and u's gradients to ``clip_grad_norm`` / ``clip_mask_grad_norm`` (no device read);
        returns the norms before clipping."""
        out = {}
        if self.clip_grad_norm is not None:
            params = [p for p in self._weights if p.grad is not None]
            out["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)
        if self.clip_mask_grad_norm is not None:
            out["mask_grad_norm"] = torch.nn.utils.clip_grad_norm_([self.model.u], self.clip_mask_grad_norm)
        return out

    def update_parameters(self) -> None:
        """Phase 7: both optimizer steps (through the GradScaler, then ``scaler.update()``, if given)."""
        if self.scaler is not None:
            self.scaler.step(self.mask_optimizer)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.mask_optimizer.step()
            self.optimizer.step()
        self._tick("optimizers")
