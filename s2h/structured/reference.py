"""The literal Algorithm 1 of the S2HPruner paper, in eager PyTorch: the oracle and the baseline.

:class:`S2HReference` takes the same constructor arguments as :class:`s2h.S2HPruner` and makes the
same updates, computed the way the paper's pseudo-code writes them::

    ys = N(θ⊙w)(x)                      # soft
    yh = N(θ⊙m)(x)                      # hard, as MASKED FULL-WIDTH compute (m: binary prefix mask)
    l = CE(ys, y);  r = R(w, T)
    d1 = KL(yh, ys.detach());  d2 = KL(yh.detach(), ys)
    (l + r).backward()                  # g_L→θ, g_L→u, g_R→u
    d1.backward()                       # g_G→θ through hard
    d2.backward(inputs=masks)           # g_G→u through soft (and g_G→θ through soft if enabled)
    θ ← O(β·g_L→θ + γ·g_G→θ⟨m⟩);  u ← O(balance(g_L→u, g_G→u, g_R→u))

Everything is independent of the fused step's machinery: the masks come from the pure-PyTorch
``s2h_kernels.reference.channel_masks``, the losses from ``F.cross_entropy`` and
``F.kl_div(..., log_target=True)`` with eager autograd, the hard network is the soft network's
full-width compute with ``w`` replaced by the binary mask, and the balancing is a plain loop over
the groups. So ``l`` and ``r`` can be separated after the single ``(l + r).backward()``, ``w`` and
``E`` come from two mask calls on two copies of ``u`` (``u_soft`` for the network, ``u_res`` for
the FLOPs), and every gradient term is computed (ablated ones are then dropped).

Masked full width equals the sliced hard network for conv/linear layers and BatchNorm (the mask
applies after the norm, zeroing the pruned channels' outputs and hence their consumers' inputs).
BatchNorm running statistics: the masked hard forward updates the *hard* branch's statistics (the
soft and hard buffers are swapped around it) and the pruned channels' entries are restored, as
the sliced forward leaves them. A grouped LayerNorm normalises over the kept channels only in the
sliced network, which masked compute cannot reproduce: the reference refuses such models.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F

from s2h_kernels.reference import channel_masks as ref_channel_masks

from .layers import S2HBatchNorm, S2HLayerNorm
from .layers.norm import STAT_NAMES
from .step_base import S2HStepBase

__all__ = ["S2HReference"]


class S2HReference(S2HStepBase):
    """Algorithm 1 as written (three backward calls, masked full-width hard network).

    Same constructor as :class:`s2h.S2HPruner` (``ddp``/``cuda_streams`` are not supported: the
    reference runs one process, on the current stream).
    """

    def __init__(self, *args, masks_fn=None, **kwargs):
        super().__init__(*args, **kwargs)
        #: the channel-mask function (default: the pure-PyTorch reference). Tests that compare fp32
        #: steps pass ``s2h_kernels.channel_masks`` so both runs see bit-identical masks.
        self.masks_fn = ref_channel_masks if masks_fn is None else masks_fn
        for name, mod in self.model.named_modules():
            if isinstance(mod, S2HLayerNorm) and mod.out_spec is not None:
                raise ValueError(f"S2HReference: '{name}' is a grouped LayerNorm; masked full-width compute "
                                 "is not the sliced hard network there")

    # ------------------------------------------------------------------ helpers
    def _binary_mask(self, keep: torch.Tensor) -> torch.Tensor:
        chans = self.model.group_channels.tolist()
        parts = [(torch.arange(c, device=keep.device) < int(k)).to(self.model.u.dtype)
                 for c, k in zip(chans, keep.tolist())]
        return torch.cat(parts)

    @contextlib.contextmanager
    def _hard_statistics(self, m: torch.Tensor):
        """Make the soft branch's BN read/update the hard statistics; restore pruned entries after."""
        offsets = self.model.mask_state.channel_offsets
        saved = []
        for mod in self.model.modules():
            if isinstance(mod, S2HBatchNorm) and mod.track_running_stats:
                b = mod._buffers
                for n in STAT_NAMES:
                    b[f"{n}_soft"], b[f"{n}_hard"] = b[f"{n}_hard"], b[f"{n}_soft"]
                kept = mod.out_spec.soft_mask(m, offsets) if mod.out_spec is not None else None
                saved.append((mod, kept, b["running_mean_soft"].clone(), b["running_var_soft"].clone()))
        try:
            yield
        finally:
            with torch.no_grad():
                for mod, kept, rm0, rv0 in saved:
                    b = mod._buffers
                    if kept is not None:
                        # .data: the forward saved these buffers for backward; restoring the pruned
                        # entries must not bump their version counter
                        k = kept > 0
                        b["running_mean_soft"].data.copy_(torch.where(k, b["running_mean_soft"], rm0))
                        b["running_var_soft"].data.copy_(torch.where(k, b["running_var_soft"], rv0))
                    for n in STAT_NAMES:
                        b[f"{n}_soft"], b[f"{n}_hard"] = b[f"{n}_hard"], b[f"{n}_soft"]

    def _take_grads(self, params):
        out = []
        for p in params:
            out.append(p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
            p.grad = None
        return out

    def _balance(self, gL, gG, gR) -> torch.Tensor:
        rc = self.resource_coef
        if self.balance == "none":
            out = rc * gR
            for g in (gL, gG):
                if g is not None:
                    out = out + g
            return out
        slices = [(0, gR.numel())] if self.balance == "paper-global" else self._group_slices
        out = torch.empty_like(gR)
        for a, b in slices:
            h = torch.zeros_like(gR[a:b])
            for g in (gL, gG):
                if g is not None:
                    n = torch.linalg.vector_norm(g[a:b])
                    if float(n) > 0:
                        h = h + g[a:b] / n
            nh = torch.linalg.vector_norm(h)
            nr = torch.linalg.vector_norm(gR[a:b])
            if float(nh) > 0:
                h = h / nh * nr
            out[a:b] = h + rc * gR[a:b]
        return out

    # ------------------------------------------------------------------ the step
    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        self.check_batch(x, y)
        self.warn_eval_mode()
        model, net, T = self.model, self.model.model, self.terms
        self.zero_grads()
        u = model.u
        weights = self._weights
        u_soft = u.detach().clone().requires_grad_(True)
        u_res = u.detach().clone().requires_grad_(True)
        divisors = model.group_divisors
        kw = dict(temperature=model.temperature, divisors=divisors, hard_width=model.hard_width)
        w, _, keep = self.masks_fn(u_soft, model.group_offsets, **kw)
        _, E, keep_res = self.masks_fn(u_res, model.group_offsets, **kw)
        st = model.mask_state
        st.set(w, E, keep, version=model._mask_version())
        m = self._binary_mask(keep)
        snap = self.snapshot_stats()
        try:
            with model.branch("soft"):
                ys = net(x)                                  # θ⊙w
            try:
                self.check_logits(ys, y)
                self.check_labels(y, ys.shape[1])
            except ValueError:
                self.restore_stats(snap)
                raise
            st.w = m
            with self._hard_statistics(m), model.branch("soft"):
                yh = net(x)                                  # θ⊙m, full width
            st.w = w
            Tk = self.temperature
            target = y.long() if y.dim() == 1 else y.to(ys.dtype)  # labels or probabilities
            l = F.cross_entropy(ys, target, label_smoothing=self.label_smoothing)
            r = self.resource_loss(E, keep_res)  # "soft": F(E); "hard": F(keep), straight-through to E
            d1 = F.kl_div(F.log_softmax(yh / Tk, 1), F.log_softmax(ys.detach() / Tk, 1), reduction="batchmean",
                          log_target=True)
            d2 = F.kl_div(F.log_softmax(yh.detach() / Tk, 1), F.log_softmax(ys / Tk, 1), reduction="batchmean",
                          log_target=True)
            vals = [float(l.detach()), float(d2.detach()), float(r.detach())]
            if self.check_finite and not all(math.isfinite(v) for v in vals):
                self.restore_stats(snap)
                self.raise_nonfinite({"loss": vals[0], "gap": vals[1], "resource_loss": vals[2]})

            (l + r).backward(retain_graph=True)
            gL_theta = self._take_grads(weights)
            gL_u = u_soft.grad.detach().clone() if u_soft.grad is not None else torch.zeros_like(u)
            gR_u = u_res.grad.detach().clone() if u_res.grad is not None else torch.zeros_like(u)
            u_soft.grad = None
            d1.backward()
            gGh_theta = self._take_grads(weights)
            soft_theta = "G_soft_theta" in T
            d2.backward(inputs=[u_soft] + (weights if soft_theta else []))
            gGs_theta = self._take_grads(weights) if soft_theta else None
            gG_u = u_soft.grad.detach().clone() if u_soft.grad is not None else torch.zeros_like(u)
        finally:
            st.clear()

        self._apply_gradients(gL_theta, gGh_theta, gGs_theta, gL_u, gG_u, gR_u)
        self.mask_optimizer.step()
        self.optimizer.step()
        return self._result(vals, ys, yh, y, E, keep)

    def _apply_gradients(self, gL_theta, gGh_theta, gGs_theta, gL_u, gG_u, gR_u) -> None:
        """θ.grad and u.grad from the separated terms, ablated ones dropped."""
        T, ce, gp, u = self.terms, self.ce_coef, self.gap_coef, self.model.u
        with torch.no_grad():
            for i, p in enumerate(self._weights):
                g = torch.zeros_like(p)
                if "L_theta" in T:
                    g = g + ce * gL_theta[i]
                if "G_hard_theta" in T:
                    g = g + gp * gGh_theta[i]
                if gGs_theta is not None:
                    g = g + gp * gGs_theta[i]
                p.grad = g
            u.grad = self._balance(ce * gL_u if "L_u" in T else None, gp * gG_u if "G_u" in T else None, gR_u)

    def _result(self, vals, ys, yh, y, E, keep) -> dict[str, Any]:
        model = self.model
        with torch.no_grad():
            yv = y.long() if y.dim() == 1 else y.argmax(1)
            dense = model.dense_flops()
            out = {
                "step": self.num_steps, "loss": vals[0], "gap": vals[1], "resource_loss": vals[2],
                "acc": float((ys.argmax(1) == yv).float().mean()), "hard_acc": float((yh.argmax(1) == yv).float().mean()),
                "soft_flops": float(model.flops(E.detach())) / dense,
                "hard_flops": float(model.flops(keep.to(E.dtype))) / dense,
                "keep": {g.name: int(k) for g, k in zip(model.groups, keep.tolist())},
            }
        self.num_steps += 1
        return out
