"""The teacher-guided loss: ``alpha * T² * CA-KLD(student, teacher) + (1 - alpha) * CE`` (docs/DESIGN.md §3).

Loss. ``L_total = alpha * T² * CA-KLD(student, teacher) + (1 - alpha) * CE(student, y)``. CA-KLD
is the fused ``s2h_kernels.ca_kld``: per-row standardised logits, divided by ``temperature`` T,
``gamma * KL(P_T || P_S) + (1 - gamma) * KL(P_S || P_T)`` with ``gamma`` the teacher's mean top-1
probability (softmax of its raw logits) when not given. This is our reading of the paper, whose
exact formula is unpublished; ``gamma``, ``temperature`` and ``standardize`` are options. The T²
factor (``kd_scale``, Hinton's convention) keeps the KD gradients from shrinking like 1/T²;
``kd_scale=1`` gives the bare ``alpha * CA-KLD + (1 - alpha) * CE``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import s2h_kernels

__all__ = ["ca_kld", "total_loss", "check_alpha_temperature", "check_outputs"]


def ca_kld(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0,
           gamma: float | None = None, standardize: bool = True, reduction: str = "batchmean") -> torch.Tensor:
    """Confidence-aware KL distillation loss: the fused ``s2h_kernels.ca_kld`` (no T² factor inside).

    Gradient reaches the student only; the backend follows the device (C++ on CPU, Triton on CUDA).
    """
    return s2h_kernels.ca_kld(student_logits, teacher_logits, temperature=temperature, gamma=gamma,
                              standardize=standardize, reduction=reduction)


def total_loss(student_logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None = None,
               alpha: float = 0.5, temperature: float = 4.0, gamma: float | None = None,
               standardize: bool = True, kd_scale: float | None = None) -> torch.Tensor:
    """``alpha * kd_scale * CA-KLD + (1 - alpha) * CE``; plain CE when there is no teacher or ``alpha == 0``.

    ``kd_scale=None`` is ``temperature ** 2`` (Hinton's convention: the KL's gradients shrink like
    1/T², the factor keeps the two terms balanced whatever T is); the fused op itself has no T².
    """
    ce = F.cross_entropy(student_logits, targets)
    if teacher_logits is None or alpha == 0:
        return ce
    scale = temperature ** 2 if kd_scale is None else kd_scale
    kd = scale * ca_kld(student_logits, teacher_logits, temperature=temperature, gamma=gamma, standardize=standardize)
    if alpha == 1:
        return kd
    return alpha * kd + (1 - alpha) * ce


def check_alpha_temperature(op: str, alpha: float, temperature: float) -> None:
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"{op}: alpha must be in [0, 1], got {alpha!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{op}: temperature must be a positive number, got {temperature!r}")


def check_outputs(op: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                   targets: torch.Tensor) -> None:
    c = student_logits.shape[-1]
    if teacher_logits is not None and teacher_logits.shape[-1] != c:
        raise ValueError(f"{op}: the teacher has {teacher_logits.shape[-1]} classes but the student has {c}; "
                         "they must predict the same classes")
    if targets.numel() and (int(targets.max()) >= c or int(targets.min()) < 0):
        raise ValueError(f"{op}: labels range over [{int(targets.min())}, {int(targets.max())}] but the model "
                         f"has {c} outputs")
