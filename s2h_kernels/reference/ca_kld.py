"""Pure-PyTorch CA-KLD (docs/DESIGN.md §3), eager autograd. The oracle for every backend of
``s2h_kernels.ca_kld`` (same signature and conventions)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import _kl

# The default epsilon of the standardisation; the fused op takes its default from here.
CA_KLD_EPS = 1e-7


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
    t = teacher_logits.detach().reshape(-1, C).to(_kl.math_dtype(teacher_logits.dtype))
    return F.softmax(t, dim=-1).amax(-1).mean()


def ca_kld(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 4.0,
    gamma: Optional[float] = None,
    standardize: bool = True,
    reduction: str = "batchmean",
    backend: Optional[str] = None,
    eps: float = CA_KLD_EPS,
    detach_teacher: bool = True,
) -> torch.Tensor:
    """gamma KL(P_T || P_S) + (1 - gamma) KL(P_S || P_T); see ``s2h_kernels.ca_kld``.

    ``detach_teacher=False`` differentiates with respect to the teacher as well (the fused op never
    does); gamma stays detached either way.
    """
    del backend
    C = student_logits.shape[-1]
    dt = _kl.math_dtype(student_logits.dtype)
    zs = student_logits.reshape(-1, C).to(dt)
    zt = teacher_logits.reshape(-1, C).to(dt)
    if detach_teacher:
        zt = zt.detach()
    g = teacher_confidence(teacher_logits) if gamma is None else torch.tensor(float(gamma), dtype=dt)
    if standardize:
        zs, zt = standardize_rows(zs, eps), standardize_rows(zt, eps)
    log_s = F.log_softmax(zs / temperature, dim=-1)
    log_t = F.log_softmax(zt / temperature, dim=-1)
    rows = g * _kl.kl_rows(log_t, log_s) + (1 - g) * _kl.kl_rows(log_s, log_t)
    return _kl.reduce_rows(rows, student_logits.shape[:-1], C, reduction, student_logits.dtype)
