"""Fused KL gap with split-detach gradients (DESIGN §2) and CA-KLD (DESIGN §3).

**KL gap** (the S2HPruner distillation term). Per row, ``p = softmax(s/T)`` from the soft logits
(the target) and ``q = softmax(h/T)`` from the hard logits::

    d     = KL(p || q) = sum_j p_j (log p_j - log q_j)
    dd/dh = (q - p) / T                       # d1's gradient: flows into the hard network
    dd/ds = p * (log p - log q - d) / T       # d2's gradient: may only reach the masks

One pass over the logits yields d and both gradients; nothing of size B x C is stored beyond the
two gradients (online softmax: a running maximum and rescaled sums, so any C works).

**CA-KLD** (teacher-guided one-shot pruning). Per row, optionally standardised
``z -> (z - mean) / (std + eps)``, then divided by T; ``P_S`` student, ``P_T`` teacher::

    loss = gamma * KL(P_T || P_S) + (1 - gamma) * KL(P_S || P_T)

both directions in the same pass. ``gamma=None`` is the teacher's mean top-1 probability over the
batch, detached (softmax of the raw teacher logits, T = 1: how sure the teacher is).

**Temperature convention: no T² factor.** Both losses are exactly the KL divergences above, and the
gradients are their exact derivatives, so the fused op agrees with
``F.kl_div(F.log_softmax(h / T), F.softmax(s / T))``. Hinton-style KD multiplies the loss by T² to
keep gradient magnitudes independent of T; that is a loss weight, and it belongs to the caller
(``T**2 * kl_gap(...)``), where it is visible next to the other loss coefficients.

**Numerics.** Everything is computed in log-softmax form with fp32 accumulation (fp64 for fp64
inputs). A term ``p_j * f_j`` is 0 when ``p_j == 0``: ``-inf`` logits (masked classes) and
probabilities that underflow give finite gradients, where eager ``F.kl_div`` with a probability
target returns NaN. NaN inputs propagate: a NaN logit makes its row's loss and gradients NaN
(for CA-KLD with ``gamma=None``, a NaN teacher row makes gamma, hence every row, NaN).
A soft (or teacher) row that is entirely ``-inf`` is not a distribution and gives NaN.
A hard row that is ``-inf`` where the soft row has mass gives ``d = +inf`` (the true KL).

Backends: C++ on the CPU (csrc/cpu/kl_gap.cpp), CUDA C++ (csrc/cuda/kl_gap.cu), and the Triton
kernels below (the default for CUDA tensors), all with the math of csrc/common/kl_gap.h.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ._autograd import register_lean_autograd
from ._backend import check_float, check_same_device, resolve_backend

REDUCTIONS = ("batchmean", "sum", "mean", "none")
CA_KLD_EPS = 1e-7

# ----------------------------------------------------------------------------------------------
# Triton kernels: one program per row, a loop over BLOCK-class chunks (online softmax, any C).
# ----------------------------------------------------------------------------------------------


@triton.jit
def _rescale(acc, old):
    # acc * old, where a 0 factor drops acc (its terms are underflowed probabilities).
    return tl.where(old == 0, 0.0, acc * old)


@triton.jit
def _pmul(e, f):
    # e * f with 0 * anything = 0 when e == 0 (a zero probability contributes nothing).
    return tl.where(e == 0, 0.0, e * f)


@triton.jit
def _kl_gap_kernel(
    s_ptr, h_ptr, loss_ptr, gs_ptr, gh_ptr, C, stride_s, stride_h, stride_g, inv_t, gscale,
    BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    h_row = h_ptr + row * stride_h
    offs = tl.arange(0, BLOCK)
    ms = tl.full([], float("-inf"), ACC)
    mh = tl.full([], float("-inf"), ACC)
    zs = tl.zeros([], ACC)
    zh = tl.zeros([], ACC)
    w = tl.zeros([], ACC)
    # Pass 1: online softmax of both rows and w = sum_j exp(a_j - ms) (a_j - b_j).
    for c in range(0, C, BLOCK):
        valid = c + offs < C
        a = tl.load(s_row + c + offs, mask=valid, other=float("-inf")).to(ACC) * inv_t
        b = tl.load(h_row + c + offs, mask=valid, other=float("-inf")).to(ACC) * inv_t
        ms_new = tl.maximum(ms, tl.max(a, axis=0))
        sh = tl.where(ms_new == float("-inf"), 0.0, ms_new)
        es = tl.exp(a - sh)
        old = tl.exp(ms - sh)
        zs = zs * old + tl.sum(es, axis=0)
        w = _rescale(w, old) + tl.sum(_pmul(es, a - b), axis=0)
        ms = ms_new
        mh_new = tl.maximum(mh, tl.max(b, axis=0))
        sh = tl.where(mh_new == float("-inf"), 0.0, mh_new)
        zh = zh * tl.exp(mh - sh) + tl.sum(tl.exp(b - sh), axis=0)
        mh = mh_new
    # log p = (a - ms) - lzs, in that order: the largest logit's log p is exact even for huge |a|.
    lzs = tl.log(zs)
    lzh = tl.log(zh)
    d = w / zs - ((ms - mh) + (lzs - lzh))
    # Pass 2: both gradients.
    for c in range(0, C, BLOCK):
        valid = c + offs < C
        a = tl.load(s_row + c + offs, mask=valid, other=float("-inf")).to(ACC) * inv_t
        b = tl.load(h_row + c + offs, mask=valid, other=float("-inf")).to(ACC) * inv_t
        ls = (a - ms) - lzs
        lh = (b - mh) - lzh
        p = tl.exp(ls)
        q = tl.exp(lh)
        gh = (q - p) * gscale
        gs = _pmul(p, ls - lh - d) * gscale
        tl.store(gs_ptr + row * stride_g + c + offs, gs.to(gs_ptr.dtype.element_ty), mask=valid)
        tl.store(gh_ptr + row * stride_g + c + offs, gh.to(gh_ptr.dtype.element_ty), mask=valid)
    tl.store(loss_ptr + row, d)


@triton.jit
def _top1_kernel(z_ptr, out_ptr, C, stride, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Top-1 probability of softmax(z) per row: 1 / sum_j exp(z_j - max z)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    m = tl.full([], float("-inf"), ACC)
    z = tl.zeros([], ACC)
    for c in range(0, C, BLOCK):
        x = tl.load(z_ptr + row * stride + c + offs, mask=c + offs < C, other=float("-inf")).to(ACC)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        sh = tl.where(m_new == float("-inf"), 0.0, m_new)
        z = z * tl.exp(m - sh) + tl.sum(tl.exp(x - sh), axis=0)
        m = m_new
    tl.store(out_ptr + row, 1.0 / z)


@triton.jit
def _row_affine(z_row, C, inv_t, eps, STD: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """(shift, alpha, n, sigma) of z -> (z - shift) * alpha: standardise over the finite logits
    (Welford per chunk, Chan's merge), then divide by T; or just divide by T."""
    if STD:
        offs = tl.arange(0, BLOCK)
        n = tl.zeros([], ACC)
        mean = tl.zeros([], ACC)
        m2 = tl.zeros([], ACC)
        for c in range(0, C, BLOCK):
            x = tl.load(z_row + c + offs, mask=c + offs < C, other=float("-inf")).to(ACC)
            take = x != float("-inf")
            nc = tl.sum(take.to(ACC), axis=0)
            mc = tl.sum(tl.where(take, x, 0.0), axis=0) / tl.maximum(nc, 1.0)
            m2c = tl.sum(tl.where(take, (x - mc) * (x - mc), 0.0), axis=0)
            nn = n + nc
            delta = mc - mean
            frac = nc / tl.maximum(nn, 1.0)
            mean = tl.where(nc == 0, mean, tl.where(n == 0, mc, mean + delta * frac))
            m2 = tl.where(nc == 0, m2, tl.where(n == 0, m2c, m2 + m2c + delta * delta * n * frac))
            n = nn
        sigma = tl.sqrt(m2 / tl.maximum(n - 1.0, 1.0))
        alpha = inv_t / (sigma + eps)
        shift = mean
    else:
        shift = tl.zeros([], ACC)
        alpha = tl.zeros([], ACC) + inv_t
        n = tl.zeros([], ACC)
        sigma = tl.zeros([], ACC)
    return shift, alpha, n, sigma


@triton.jit
def _ca_kld_kernel(
    zs_ptr, zt_ptr, gamma_ptr, loss_ptr, g_ptr, C, stride_s, stride_t, stride_g, inv_t, eps, grad_scale,
    STD: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    zs_row = zs_ptr + row * stride_s
    zt_row = zt_ptr + row * stride_t
    offs = tl.arange(0, BLOCK)
    gamma = tl.load(gamma_ptr).to(ACC)
    shift_s, alpha_s, n_s, sigma_s = _row_affine(zs_row, C, inv_t, eps, STD, BLOCK, ACC)
    shift_t, alpha_t, n_t, sigma_t = _row_affine(zt_row, C, inv_t, eps, STD, BLOCK, ACC)
    ms = tl.full([], float("-inf"), ACC)
    mt = tl.full([], float("-inf"), ACC)
    zs = tl.zeros([], ACC)
    zt = tl.zeros([], ACC)
    ws = tl.zeros([], ACC)
    wt = tl.zeros([], ACC)
    sas = tl.zeros([], ACC)
    sab = tl.zeros([], ACC)
    sat = tl.zeros([], ACC)
    # Pass 1: both online softmaxes; ws = sum e_s (a - b), wt = sum e_t (b - a), and the sums of the
    # standardisation chain rule: sas = sum e_s a, sab = sum e_s (a - b) a, sat = sum e_t a.
    for c in range(0, C, BLOCK):
        valid = c + offs < C
        a = (tl.load(zs_row + c + offs, mask=valid, other=float("-inf")).to(ACC) - shift_s) * alpha_s
        b = (tl.load(zt_row + c + offs, mask=valid, other=float("-inf")).to(ACC) - shift_t) * alpha_t
        ab = a - b
        ms_new = tl.maximum(ms, tl.max(a, axis=0))
        sh = tl.where(ms_new == float("-inf"), 0.0, ms_new)
        es = tl.exp(a - sh)
        old = tl.exp(ms - sh)
        zs = zs * old + tl.sum(es, axis=0)
        ws = _rescale(ws, old) + tl.sum(_pmul(es, ab), axis=0)
        if STD:
            sas = _rescale(sas, old) + tl.sum(_pmul(es, a), axis=0)
            sab = _rescale(sab, old) + tl.sum(_pmul(es, ab * a), axis=0)
        ms = ms_new
        mt_new = tl.maximum(mt, tl.max(b, axis=0))
        sh = tl.where(mt_new == float("-inf"), 0.0, mt_new)
        et = tl.exp(b - sh)
        old = tl.exp(mt - sh)
        zt = zt * old + tl.sum(et, axis=0)
        wt = _rescale(wt, old) + tl.sum(_pmul(et, -ab), axis=0)
        if STD:
            sat = _rescale(sat, old) + tl.sum(_pmul(et, a), axis=0)
        mt = mt_new
    lzs = tl.log(zs)
    lzt = tl.log(zt)
    cc = (ms - mt) + (lzs - lzt)
    klr = ws / zs - cc
    klf = wt / zt + cc
    tl.store(loss_ptr + row, gamma * klf + (1.0 - gamma) * klr)
    kappa = tl.zeros([], ACC)
    if STD:
        g_dot = gamma * (sas / zs - sat / zt) + (1.0 - gamma) * (sab / zs - (cc + klr) * (sas / zs))
        ok = (sigma_s > 0) & (n_s > 1)
        kappa = tl.where(ok, g_dot / (inv_t * tl.maximum(n_s - 1.0, 1.0) * tl.where(ok, sigma_s, 1.0)), 0.0)
    # Pass 2: the student's gradient.
    for c in range(0, C, BLOCK):
        valid = c + offs < C
        a = (tl.load(zs_row + c + offs, mask=valid, other=float("-inf")).to(ACC) - shift_s) * alpha_s
        b = (tl.load(zt_row + c + offs, mask=valid, other=float("-inf")).to(ACC) - shift_t) * alpha_t
        ls = (a - ms) - lzs
        lt = (b - mt) - lzt
        s = tl.exp(ls)
        t = tl.exp(lt)
        ga = gamma * (s - t) + (1.0 - gamma) * _pmul(s, ls - lt - klr)
        chain = tl.where(a == float("-inf"), 0.0, kappa * a)
        g = (alpha_s * ga - chain) * grad_scale
        tl.store(g_ptr + row * stride_g + c + offs, g.to(g_ptr.dtype.element_ty), mask=valid)


def _acc_torch(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


# Largest chunk of classes a program holds at once; the loop handles any C. Tests lower it to
# exercise the multi-chunk path with small C.
MAX_BLOCK = 4096


def _launch_cfg(C: int) -> dict:
    block = min(triton.next_power_of_2(C), MAX_BLOCK)
    return dict(BLOCK=block, num_warps=max(1, min(16, block // 256)))


@torch.library.custom_op("s2h::kl_gap_triton", mutates_args=())
def _kl_gap_triton(
    soft: torch.Tensor, hard: torch.Tensor, temperature: float, grad_scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_op_inputs("s2h::kl_gap_triton", "soft", soft, "hard", hard, temperature)
    soft, hard = soft.contiguous(), hard.contiguous()
    B, C = soft.shape
    loss = soft.new_empty(B, dtype=_acc_torch(soft.dtype))
    gs = torch.empty_like(soft)
    gh = torch.empty_like(hard)
    _kl_gap_kernel[(B,)](
        soft, hard, loss, gs, gh, C, soft.stride(0), hard.stride(0), gs.stride(0),
        1.0 / temperature, grad_scale / temperature, ACC=_acc(soft.dtype), **_launch_cfg(C),
    )
    return loss, gs, gh


@torch.library.custom_op("s2h::ca_kld_triton", mutates_args=())
def _ca_kld_triton(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, gamma: Optional[float], standardize: bool,
    eps: float, grad_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_op_inputs("s2h::ca_kld_triton", "student", student, "teacher", teacher, temperature)
    _check_gamma_eps("s2h::ca_kld_triton", gamma, eps)
    student, teacher = student.contiguous(), teacher.contiguous()
    B, C = student.shape
    acc = _acc_torch(student.dtype)
    cfg = _launch_cfg(C)
    if gamma is None:
        top1 = student.new_empty(B, dtype=acc)
        _top1_kernel[(B,)](teacher, top1, C, teacher.stride(0), ACC=_acc(student.dtype), **cfg)
        gamma_t = top1.mean()
    else:
        gamma_t = torch.full((), gamma, dtype=acc, device=student.device)
    loss = student.new_empty(B, dtype=acc)
    g = torch.empty_like(student)
    _ca_kld_kernel[(B,)](
        student, teacher, gamma_t, loss, g, C, student.stride(0), teacher.stride(0), g.stride(0),
        1.0 / temperature, eps, grad_scale, STD=bool(standardize), ACC=_acc(student.dtype), **cfg,
    )
    return loss, g, gamma_t


def _check_op_inputs(op: str, n1: str, x: torch.Tensor, n2: str, y: torch.Tensor, temperature: float) -> None:
    """The C++ kernels' checks (csrc/cpu/kl_gap.cpp), for the Triton ops called directly."""
    if x.device != y.device:
        raise ValueError(f"{op}: {n1} and {n2} are on different devices ({x.device} and {y.device})")
    if x.dim() != 2:
        raise ValueError(f"{op}: {n1} must be 2-D (rows, classes), got shape {tuple(x.shape)}")
    if x.shape != y.shape:
        raise ValueError(f"{op}: {n1} and {n2} must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.dtype != y.dtype:
        raise ValueError(f"{op}: {n1} and {n2} must have the same dtype, got {x.dtype} and {y.dtype}")
    if x.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise ValueError(f"{op}: {n1} must be float32, float64, float16 or bfloat16, got {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"{op}: {n1} has no rows (empty batch)")
    if x.shape[1] == 0:
        raise ValueError(f"{op}: {n1} has no classes")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{op}: temperature must be a finite number > 0, got {temperature}")


def _check_gamma_eps(op: str, gamma: Optional[float], eps: float) -> None:
    if gamma is not None and not (0.0 <= gamma <= 1.0):
        raise ValueError(f"{op}: gamma must lie in [0, 1], got {gamma}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{op}: eps must be a finite number >= 0, got {eps}")


# ----------------------------------------------------------------------------------------------
# Fake kernels and autograd, shared by the C++ ops (s2h::kl_gap, s2h::ca_kld) and the Triton ops.
# The ops return per-row losses and the gradients of those losses; backward scales the saved
# gradients by the per-row cotangent (no recomputation).
# ----------------------------------------------------------------------------------------------


def _fake_kl_gap(soft, hard, temperature, grad_scale=1.0):
    return soft.new_empty(soft.shape[0], dtype=_acc_torch(soft.dtype)), torch.empty_like(soft), torch.empty_like(hard)


def _fake_ca_kld(student, teacher, temperature, gamma, standardize, eps, grad_scale=1.0):
    acc = _acc_torch(student.dtype)
    return student.new_empty(student.shape[0], dtype=acc), torch.empty_like(student), student.new_empty((), dtype=acc)


def _kl_gap_setup(ctx, inputs, output):
    _, grad_soft, grad_hard = output
    ctx.save_for_backward(grad_soft, grad_hard)
    ctx.mark_non_differentiable(grad_soft, grad_hard)
    ctx.set_materialize_grads(False)


# The saved gradients are constants to autograd, so a second derivative taken through them would be
# silently incomplete: once_differentiable makes create_graph=True raise instead.
@once_differentiable
def _kl_gap_backward(ctx, grad_loss, _grad_gs, _grad_gh):
    if grad_loss is None:
        return None, None, None, None
    grad_soft, grad_hard = ctx.saved_tensors
    g = grad_loss.unsqueeze(-1).to(grad_soft.dtype)
    need_soft, need_hard = ctx.needs_input_grad[0], ctx.needs_input_grad[1]  # e.g. one side detached
    return g * grad_soft if need_soft else None, g * grad_hard if need_hard else None, None, None


def _ca_kld_setup(ctx, inputs, output):
    _, grad_student, gamma = output
    ctx.save_for_backward(grad_student)
    ctx.mark_non_differentiable(grad_student, gamma)
    ctx.set_materialize_grads(False)


@once_differentiable
def _ca_kld_backward(ctx, grad_loss, _grad_g, _grad_gamma):
    # The teacher gets no gradient (it is a constant target, like teacher_logits.detach()).
    if grad_loss is None:
        return None, None, None, None, None, None, None
    (grad_student,) = ctx.saved_tensors
    return grad_loss.unsqueeze(-1).to(grad_student.dtype) * grad_student, None, None, None, None, None, None


for _name in ("s2h::kl_gap", "s2h::kl_gap_triton"):
    torch.library.register_fake(_name)(_fake_kl_gap)
for _name in ("s2h::ca_kld", "s2h::ca_kld_triton"):
    torch.library.register_fake(_name)(_fake_ca_kld)
# The Triton ops: torch.library's generic autograd. The C++ ops: the lean one (s2h_kernels/_autograd.py),
# whose generic counterpart cost ~150 us per call and most of the speed-up at small shapes.
torch.library.register_autograd("s2h::kl_gap_triton", _kl_gap_backward, setup_context=_kl_gap_setup)
torch.library.register_autograd("s2h::ca_kld_triton", _ca_kld_backward, setup_context=_ca_kld_setup)
_kl_gap_cpp = register_lean_autograd("kl_gap", _kl_gap_setup, _kl_gap_backward)
_ca_kld_cpp = register_lean_autograd("ca_kld", _ca_kld_setup, _ca_kld_backward)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def _validate(op: str, n1: str, x, n2: str, y, temperature, reduction: str, backend: Optional[str]) -> str:
    for name, t in ((n1, x), (n2, y)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
        check_float(op, name, t)
    device = check_same_device(op, **{n1: x, n2: y})
    if x.dtype != y.dtype:
        raise ValueError(f"{op}: {n1} and {n2} must have the same dtype, got {x.dtype} and {y.dtype}")
    if x.shape != y.shape:
        raise ValueError(f"{op}: {n1} and {n2} must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.dim() == 0:
        raise ValueError(f"{op}: {n1} must have a class dimension (shape (..., C)), got a 0-d tensor")
    if x.shape[-1] == 0:
        raise ValueError(f"{op}: {n1} has no classes (shape {tuple(x.shape)})")
    if x.numel() == 0:
        raise ValueError(f"{op}: {n1} has no rows (empty batch, shape {tuple(x.shape)})")
    if isinstance(temperature, torch.Tensor) or not (math.isfinite(float(temperature)) and float(temperature) > 0):
        raise ValueError(f"{op}: temperature must be a finite Python number > 0, got {temperature!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return resolve_backend(backend, device, op)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(..., C) -> (rows, C); 2-D input as is (a reshape would add a view node to the graph)."""
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


def _reduce(op: str, loss_rows: torch.Tensor, lead_shape, classes: int, reduction: str, dtype: torch.dtype):
    if reduction == "none":
        return (loss_rows if len(lead_shape) == 1 else loss_rows.reshape(lead_shape)).to(dtype)
    if reduction == "batchmean":
        total = loss_rows.mean()
    elif reduction == "mean":
        total = loss_rows.mean() / classes
    else:
        total = loss_rows.sum()
    return total.to(dtype)


def _grad_scale(rows: int, classes: int, reduction: str) -> float:
    return {"batchmean": 1.0 / rows, "mean": 1.0 / (rows * classes)}.get(reduction, 1.0)


def _gap_op(chosen: str):
    return torch.ops.s2h.kl_gap_triton if chosen == "triton" else _kl_gap_cpp


def kl_gap(
    soft_logits: torch.Tensor,
    hard_logits: torch.Tensor,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    backend: Optional[str] = None,
) -> torch.Tensor:
    """KL(softmax(soft/T) || softmax(hard/T)) with both gradients from one fused pass.

    The soft network's distribution is the target. Backward sends ``(q - p)/T`` (d1's gradient)
    to ``hard_logits`` and ``p (log p - log q - d)/T`` (d2's gradient) to ``soft_logits``, each
    scaled by the cotangent: the sum of the paper's two detached losses
    ``F.kl_div(log_softmax(h/T), softmax(s.detach()/T))`` and
    ``F.kl_div(log_softmax(h.detach()/T), softmax(s/T))``, with one value. To route the two
    gradients to different parameters (soft side to the masks only), use :func:`kl_gap_with_grads`,
    or detach one input.

    No T² factor is applied (see the module docstring): multiply by ``T**2`` yourself for
    Hinton-style scaling.

    Args:
        soft_logits, hard_logits: float tensors of the same shape ``(..., C)`` and dtype, on one
            device. Every leading index is one distribution (row).
        temperature: T > 0.
        reduction: ``"batchmean"`` (sum / rows: the mean KL per distribution, the true KL and
            ``F.kl_div``'s batchmean for 2-D input), ``"sum"``, ``"mean"`` (sum / (rows * C), like
            ``F.kl_div``'s ``"mean"``), or ``"none"`` (one KL per row, shape ``(...)``; not
            per element as in ``F.kl_div``).
        backend: ``"cpu"`` (C++), ``"cuda"`` (CUDA C++) or ``"triton"``; default by device.

    Returns:
        The loss in the inputs' dtype (accumulated in fp32, fp64 for fp64 inputs).
    """
    chosen = _validate("kl_gap", "soft_logits", soft_logits, "hard_logits", hard_logits, temperature, reduction, backend)
    C = soft_logits.shape[-1]
    loss_rows, _, _ = _gap_op(chosen)(_rows(soft_logits), _rows(hard_logits), float(temperature), 1.0)
    return _reduce("kl_gap", loss_rows, soft_logits.shape[:-1], C, reduction, soft_logits.dtype)


def kl_gap_with_grads(
    soft_logits: torch.Tensor,
    hard_logits: torch.Tensor,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    backend: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, grad_soft, grad_hard)``: the reduced :func:`kl_gap` and its gradients, outside autograd.

    For the trainer: ``grad_hard`` (d1's gradient) goes back through the hard network, e.g.
    ``hard_logits.backward(gamma * grad_hard)``, and ``grad_soft`` (d2's gradient) only into the
    masks, e.g. ``torch.autograd.grad(soft_logits, mask_params, grad_soft)``. The reduction's
    scale (1/rows for batchmean) is folded into the kernel, so no extra pass or allocation is
    made. With ``reduction="none"`` the gradients are those of each row's own loss (that is, of
    their sum). All three are detached; the inputs' autograd graphs are not touched.
    """
    chosen = _validate(
        "kl_gap_with_grads", "soft_logits", soft_logits, "hard_logits", hard_logits, temperature, reduction, backend
    )
    C = soft_logits.shape[-1]
    rows = soft_logits.numel() // C
    with torch.no_grad():
        loss_rows, gs, gh = _gap_op(chosen)(
            _rows(soft_logits.detach()), _rows(hard_logits.detach()), float(temperature),
            _grad_scale(rows, C, reduction),
        )
        loss = _reduce("kl_gap_with_grads", loss_rows, soft_logits.shape[:-1], C, reduction, soft_logits.dtype)
    if soft_logits.dim() != 2:
        gs, gh = gs.reshape(soft_logits.shape), gh.reshape(hard_logits.shape)
    return loss, gs, gh


def ca_kld(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 4.0,
    gamma: Optional[float] = None,
    standardize: bool = True,
    reduction: str = "batchmean",
    backend: Optional[str] = None,
    eps: float = CA_KLD_EPS,
) -> torch.Tensor:
    """Confidence-aware KL: ``gamma KL(P_T || P_S) + (1 - gamma) KL(P_S || P_T)``, fused.

    Our reading of the teacher-guided one-shot paper (DESIGN §3; the formula is not published
    in full), with gamma and T as options:

    * ``standardize=True``: each row becomes ``(z - mean) / (std + eps)`` before ``/ T``; mean and
      std (with Bessel's correction, N - 1; 0 for a single class) are taken over the row's finite
      logits, and ``-inf`` logits (masked classes) stay ``-inf``. The gradient includes the chain
      rule through mean and std.
    * ``P_S = softmax(student')``, ``P_T = softmax(teacher')``; both KL directions come from the
      same pass.
    * ``gamma=None``: the teacher's mean top-1 probability over the batch, detached, from the
      softmax of its raw logits (T = 1, not standardised): how confident the teacher is. A float
      in [0, 1] fixes it.
    * No T² factor (see the module docstring).

    Gradients flow to ``student_logits`` only. ``teacher_logits`` is treated as a constant target,
    like ``teacher_logits.detach()``, even if it requires grad. A teacher gradient, if ever
    wanted, must be asked for explicitly: ``s2h_kernels.reference.ca_kld(..., detach_teacher=False)``
    differentiates the same loss with respect to both inputs (eager PyTorch).

    Args:
        student_logits, teacher_logits: ``(..., C)``, same shape, dtype and device.
        temperature: T > 0 (default 4).
        gamma: None (teacher confidence) or a float in [0, 1].
        standardize: per-row standardisation of both logits (default True).
        reduction: as in :func:`kl_gap`.
        backend: ``"cpu"``, ``"cuda"`` or ``"triton"``; default by device.
        eps: added to the std (default 1e-7).
    """
    chosen = _validate(
        "ca_kld", "student_logits", student_logits, "teacher_logits", teacher_logits, temperature, reduction, backend
    )
    _check_gamma_eps("ca_kld", gamma, eps)
    C = student_logits.shape[-1]
    op = torch.ops.s2h.ca_kld_triton if chosen == "triton" else _ca_kld_cpp
    loss_rows, _, _ = op(
        _rows(student_logits), _rows(teacher_logits.detach()), float(temperature),
        None if gamma is None else float(gamma), bool(standardize), float(eps), 1.0,
    )
    return _reduce("ca_kld", loss_rows, student_logits.shape[:-1], C, reduction, student_logits.dtype)
