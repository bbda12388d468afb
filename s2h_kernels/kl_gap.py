"""Fused KL gap with split-detach gradients (docs/DESIGN.md §2).

Per row, ``p = softmax(s/T)`` from the soft logits (the target) and ``q = softmax(h/T)`` from the
hard logits::

    d     = KL(p || q) = sum_j p_j (log p_j - log q_j)
    dd/dh = (q - p) / T                       # d1's gradient: flows into the hard network
    dd/ds = p * (log p - log q - d) / T       # d2's gradient: may only reach the masks

One pass over the logits yields d and both gradients; nothing of size B x C is stored beyond the
two gradients (online softmax: a running maximum and rescaled sums, so any C works). The op
``s2h::kl_gap`` returns the per-row losses and their gradients; :func:`kl_gap` puts them under
autograd, :func:`s2h_kernels.kl_gap_with_grads` hands them out directly.

**Temperature convention: no T² factor.** The losses here and in ``ca_kld`` are exactly the KL
divergences, and the gradients are their exact derivatives, so the fused op agrees with
``F.kl_div(F.log_softmax(h / T), F.softmax(s / T))``. Hinton-style KD multiplies the loss by T² to
keep gradient magnitudes independent of T; that is a loss weight, and it belongs to the caller
(``T**2 * kl_gap(...)``), where it is visible next to the other loss coefficients.

**Numerics.** Everything is computed in log-softmax form with fp32 accumulation (fp64 for fp64
inputs). A term ``p_j * f_j`` is 0 when ``p_j == 0``: ``-inf`` logits (masked classes) and
probabilities that underflow give finite gradients, where eager ``F.kl_div`` with a probability
target returns NaN. NaN inputs propagate: a NaN logit makes its row's loss and gradients NaN.
A soft row that is entirely ``-inf`` is not a distribution and gives NaN. A hard row that is
``-inf`` where the soft row has mass gives ``d = +inf`` (the true KL).

Backends: C++ on the CPU (csrc/cpu/kl_gap.cpp), CUDA C++ (csrc/cuda/kl_gap.cu), and Triton
(s2h_kernels/_triton/kl_gap.py; the default for CUDA tensors), all with the math of
csrc/common/kl_gap.h.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.autograd.function import once_differentiable

from . import _kl, _triton
from ._registration import define_triton_op, register_op

__all__ = ["kl_gap"]


def _triton_kl_gap(soft, hard, temperature, grad_scale=1.0):
    _kl.check_op_inputs("s2h::kl_gap_triton", "soft", soft, "hard", hard, temperature)
    return _triton.load("kl_gap", "s2h::kl_gap_triton").kl_gap(soft, hard, temperature, grad_scale)


define_triton_op("kl_gap_triton", "(Tensor soft, Tensor hard, float temperature, float grad_scale=1.0) -> "
                 "(Tensor loss, Tensor grad_soft, Tensor grad_hard)", _triton_kl_gap)


# Fake kernel and autograd, shared by the C++ op (s2h::kl_gap) and the Triton op. The op returns
# per-row losses and their gradients; backward scales the saved gradients by the per-row cotangent
# (no recomputation).
def _fake(soft, hard, temperature, grad_scale=1.0):
    loss = soft.new_empty(soft.shape[0], dtype=_kl.acc_dtype(soft.dtype))
    return loss, torch.empty_like(soft), torch.empty_like(hard)


def _setup_context(ctx, inputs, output):
    _, grad_soft, grad_hard = output
    ctx.save_for_backward(grad_soft, grad_hard)
    ctx.mark_non_differentiable(grad_soft, grad_hard)
    ctx.set_materialize_grads(False)


# The saved gradients are constants to autograd, so a second derivative taken through them would be
# silently incomplete: once_differentiable makes create_graph=True raise instead.
@once_differentiable
def _backward(ctx, grad_loss, _grad_gs, _grad_gh):
    if grad_loss is None:
        return None, None, None, None
    grad_soft, grad_hard = ctx.saved_tensors
    g = grad_loss.unsqueeze(-1).to(grad_soft.dtype)
    need_soft, need_hard = ctx.needs_input_grad[0], ctx.needs_input_grad[1]  # e.g. one side detached
    return g * grad_soft if need_soft else None, g * grad_hard if need_hard else None, None, None


_OPS = register_op(("kl_gap", "kl_gap_triton"), fake=_fake, setup_context=_setup_context, backward=_backward)


def gap_op(backend: str) -> Callable:
    """The fused op (with autograd) for a resolved backend: ``(soft, hard, T, grad_scale) -> (loss rows,
    grad_soft, grad_hard)``. Shared with :func:`s2h_kernels.kl_gap_with_grads`."""
    return _OPS["kl_gap_triton" if backend == "triton" else "kl_gap"]


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
    chosen = _kl.validate(
        "kl_gap", "soft_logits", soft_logits, "hard_logits", hard_logits, temperature, reduction, backend
    )
    C = soft_logits.shape[-1]
    loss_rows, _, _ = gap_op(chosen)(_kl.as_rows(soft_logits), _kl.as_rows(hard_logits), float(temperature), 1.0)
    return _kl.reduce_loss("kl_gap", loss_rows, soft_logits.shape[:-1], C, reduction, soft_logits.dtype)
