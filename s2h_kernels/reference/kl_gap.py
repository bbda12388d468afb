"""Pure-PyTorch KL gap and CA-KLD (DESIGN §2, §3), eager autograd. The oracle for every backend.

Same signatures and conventions as ``s2h_kernels.kl_gap`` / ``kl_gap_with_grads`` / ``ca_kld``
(no T² factor; reductions over rows; fp32 math for 16-bit inputs). Terms with a zero probability
are 0, written with the double-``where`` so that their gradients are 0 as well, not NaN.
Also the paper's eager form, :func:`kl_gap_d1_d2`, which the benchmarks compare against.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

REDUCTIONS = ("batchmean", "sum", "mean", "none")


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _reduce(rows: torch.Tensor, lead_shape, classes: int, reduction: str, dtype: torch.dtype) -> torch.Tensor:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if reduction == "none":
        return rows.reshape(lead_shape).to(dtype)
    total = rows.sum()
    if reduction == "batchmean":
        total = total / rows.shape[0]
    elif reduction == "mean":
        total = total / (rows.shape[0] * classes)
    return total.to(dtype)


def _kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """sum_j p_j (log p_j - log q_j) per row, with p_j = 0 terms exactly 0 (and gradient 0)."""
    p = log_p.exp()
    zero = p == 0
    diff = torch.where(zero, torch.zeros_like(log_p), log_p - log_q)
    return (p * diff).sum(-1)


def kl_gap(
    soft_logits: torch.Tensor,
    hard_logits: torch.Tensor,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    backend: Optional[str] = None,
) -> torch.Tensor:
    """KL(softmax(soft/T) || softmax(hard/T)), differentiable in both inputs (no detach)."""
    del backend
    C = soft_logits.shape[-1]
    dt = _math_dtype(soft_logits.dtype)
    log_p = F.log_softmax(soft_logits.reshape(-1, C).to(dt) / temperature, dim=-1)
    log_q = F.log_softmax(hard_logits.reshape(-1, C).to(dt) / temperature, dim=-1)
    return _reduce(_kl_rows(log_p, log_q), soft_logits.shape[:-1], C, reduction, soft_logits.dtype)


def kl_gap_with_grads(
    soft_logits: torch.Tensor,
    hard_logits: torch.Tensor,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    backend: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, d loss / d soft, d loss / d hard) by eager autograd; for "none", of the rows' sum."""
    del backend
    s = soft_logits.detach().requires_grad_(True)
    h = hard_logits.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = kl_gap(s, h, temperature, reduction)
        gs, gh = torch.autograd.grad(loss.sum(), (s, h))
    return loss.detach(), gs, gh


def kl_gap_d1_d2(
    soft_logits: torch.Tensor, hard_logits: torch.Tensor, temperature: float = 1.0, reduction: str = "batchmean"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's eager split-detach pair (S2HPruner, Algorithm 1):

    ``d1 = F.kl_div(log_softmax(h/T), softmax(s.detach()/T))`` (gradient to the hard side only),
    ``d2 = F.kl_div(log_softmax(h.detach()/T), softmax(s/T))`` (gradient to the soft side only).
    ``F.kl_div`` with a probability target gives NaN gradients once a softmax underflows to 0.
    """
    T = temperature
    d1 = F.kl_div(F.log_softmax(hard_logits / T, -1), F.softmax(soft_logits.detach() / T, -1), reduction=reduction)
    d2 = F.kl_div(F.log_softmax(hard_logits.detach() / T, -1), F.softmax(soft_logits / T, -1), reduction=reduction)
    return d1, d2


def standardize_rows(z: torch.Tensor, eps: float) -> torch.Tensor:
    """(z - mean) / (std + eps) per row over the finite logits; -inf stays -inf.

    std has Bessel's correction (0 for a single finite logit). Written so that a constant row
    (std = 0) has the gradient of the limit (1/eps times the centring), not NaN.
    """
    finite = z != float("-inf")
    n = finite.sum(-1, keepdim=True).to(z.dtype)
    zf = torch.where(finite, z, torch.zeros_like(z))
    mean = zf.sum(-1, keepdim=True) / n.clamp(min=1)
    cen = torch.where(finite, z - mean, torch.zeros_like(z))
    var = (cen * cen).sum(-1, keepdim=True) / (n - 1).clamp(min=1)
    pos = var > 0
    std = torch.where(pos, torch.where(pos, var, torch.ones_like(var)).sqrt(), torch.zeros_like(var))
    y = cen / (std + eps)
    return torch.where(finite, y, z)


def teacher_confidence(teacher_logits: torch.Tensor) -> torch.Tensor:
    """Default CA-KLD gamma: the mean top-1 probability of softmax(teacher) (raw logits, T = 1)."""
    C = teacher_logits.shape[-1]
    t = teacher_logits.detach().reshape(-1, C).to(_math_dtype(teacher_logits.dtype))
    return F.softmax(t, dim=-1).amax(-1).mean()


def ca_kld(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 4.0,
    gamma: Optional[float] = None,
    standardize: bool = True,
    reduction: str = "batchmean",
    backend: Optional[str] = None,
    eps: float = 1e-7,
    detach_teacher: bool = True,
) -> torch.Tensor:
    """gamma KL(P_T || P_S) + (1 - gamma) KL(P_S || P_T); see ``s2h_kernels.ca_kld``.

    ``detach_teacher=False`` differentiates with respect to the teacher as well (the fused op never
    does); gamma stays detached either way.
    """
    del backend
    C = student_logits.shape[-1]
    dt = _math_dtype(student_logits.dtype)
    zs = student_logits.reshape(-1, C).to(dt)
    zt = teacher_logits.reshape(-1, C).to(dt)
    if detach_teacher:
        zt = zt.detach()
    g = teacher_confidence(teacher_logits) if gamma is None else torch.tensor(float(gamma), dtype=dt)
    if standardize:
        zs, zt = standardize_rows(zs, eps), standardize_rows(zt, eps)
    log_s = F.log_softmax(zs / temperature, dim=-1)
    log_t = F.log_softmax(zt / temperature, dim=-1)
    rows = g * _kl_rows(log_t, log_s) + (1 - g) * _kl_rows(log_s, log_t)
    return _reduce(rows, student_logits.shape[:-1], C, reduction, student_logits.dtype)
