"""CA-KLD, the confidence-aware KL of teacher-guided one-shot pruning (docs/DESIGN.md §3).

Per row, optionally standardised ``z -> (z - mean) / (std + eps)``, then divided by T; ``P_S``
student, ``P_T`` teacher::

    loss = gamma * KL(P_T || P_S) + (1 - gamma) * KL(P_S || P_T)

both directions in the same pass. ``gamma=None`` is the teacher's mean top-1 probability over the
batch, detached (softmax of the raw teacher logits, T = 1: how sure the teacher is). Conventions
(no T² factor, log-softmax numerics, zero-probability terms) as in s2h_kernels/kl_gap.py; a NaN
teacher row with ``gamma=None`` makes gamma, hence every row, NaN.

Backends: C++ on the CPU (csrc/cpu/kl_gap.cpp), CUDA C++ (csrc/cuda/kl_gap.cu), and Triton
(s2h_kernels/_triton/ca_kld.py; the default for CUDA tensors), all with the math of
csrc/common/kl_gap.h.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from . import _kl, _triton
from ._registration import define_triton_op, register_op
from .reference.ca_kld import CA_KLD_EPS

__all__ = ["ca_kld"]


def _triton_ca_kld(student, teacher, temperature, gamma, standardize, eps, grad_scale=1.0):
    _kl.check_op_inputs("s2h::ca_kld_triton", "student", student, "teacher", teacher, temperature)
    _kl.check_gamma_eps("s2h::ca_kld_triton", gamma, eps)
    return _triton.load("ca_kld", "s2h::ca_kld_triton").ca_kld(student, teacher, temperature, gamma, standardize,
                                                                eps, grad_scale)


define_triton_op("ca_kld_triton", "(Tensor student, Tensor teacher, float temperature, float? gamma, bool standardize, "
                 "float eps, float grad_scale=1.0) -> (Tensor loss, Tensor grad_student, Tensor gamma)", _triton_ca_kld)


# Fake kernel and autograd, shared by the C++ op (s2h::ca_kld) and the Triton op: per-row losses
# and the student's gradient of them; backward scales the saved gradient by the per-row cotangent.
def _fake(student, teacher, temperature, gamma, standardize, eps, grad_scale=1.0):
    acc = _kl.acc_dtype(student.dtype)
    return student.new_empty(student.shape[0], dtype=acc), torch.empty_like(student), student.new_empty((), dtype=acc)


def _setup_context(ctx, inputs, output):
    _, grad_student, gamma = output
    ctx.save_for_backward(grad_student)
    ctx.mark_non_differentiable(grad_student, gamma)
    ctx.set_materialize_grads(False)


@once_differentiable  # the saved gradient is a constant to autograd (see s2h_kernels/kl_gap.py)
def _backward(ctx, grad_loss, _grad_g, _grad_gamma):
    # The teacher gets no gradient (it is a constant target, like teacher_logits.detach()).
    if grad_loss is None:
        return None, None, None, None, None, None, None
    (grad_student,) = ctx.saved_tensors
    return grad_loss.unsqueeze(-1).to(grad_student.dtype) * grad_student, None, None, None, None, None, None


_OPS = register_op(("ca_kld", "ca_kld_triton"), fake=_fake, setup_context=_setup_context, backward=_backward)


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

    Our reading of the teacher-guided one-shot paper (docs/DESIGN.md §3; the formula is not published
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
    * No T² factor (see s2h_kernels/kl_gap.py).

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
    chosen = _kl.validate(
        "ca_kld", "student_logits", student_logits, "teacher_logits", teacher_logits, temperature, reduction, backend
    )
    _kl.check_gamma_eps("ca_kld", gamma, eps)
    C = student_logits.shape[-1]
    op = _OPS["ca_kld_triton" if chosen == "triton" else "ca_kld"]
    loss_rows, _, _ = op(
        _kl.as_rows(student_logits), _kl.as_rows(teacher_logits.detach()), float(temperature),
        None if gamma is None else float(gamma), bool(standardize), float(eps), 1.0,
    )
    return _kl.reduce_loss("ca_kld", loss_rows, student_logits.shape[:-1], C, reduction, student_logits.dtype)
