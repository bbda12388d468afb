"""The KL gap and both of its gradients outside autograd, for the S2HPruner step (docs/DESIGN.md §2).

The same fused op as :func:`s2h_kernels.kl_gap` (``s2h::kl_gap`` / ``s2h::kl_gap_triton``, math in
s2h_kernels/kl_gap.py), with the reduction's scale folded into the kernel and nothing recorded for
autograd.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _kl
from .kl_gap import gap_op

__all__ = ["kl_gap_with_grads"]


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
    chosen = _kl.validate(
        "kl_gap_with_grads", "soft_logits", soft_logits, "hard_logits", hard_logits, temperature, reduction, backend
    )
    C = soft_logits.shape[-1]
    rows = soft_logits.numel() // C
    with torch.no_grad():
        loss_rows, gs, gh = gap_op(chosen)(
            _kl.as_rows(soft_logits.detach()), _kl.as_rows(hard_logits.detach()), float(temperature),
            _kl.grad_scale(rows, C, reduction),
        )
        loss = _kl.reduce_loss(
            "kl_gap_with_grads", loss_rows, soft_logits.shape[:-1], C, reduction, soft_logits.dtype
        )
    if soft_logits.dim() != 2:
        gs, gh = gs.reshape(soft_logits.shape), gh.reshape(hard_logits.shape)
    return loss, gs, gh
