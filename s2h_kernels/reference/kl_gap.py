"""Pure-PyTorch KL gap (docs/DESIGN.md §2), eager autograd. The oracle for every backend.

Same signature and conventions as ``s2h_kernels.kl_gap`` (no T² factor; reductions over rows;
fp32 math for 16-bit inputs). Terms with a zero probability are 0, written with the double-``where``
so that their gradients are 0 as well, not NaN. Also the paper's eager form, :func:`kl_gap_d1_d2`,
which the benchmarks compare against.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import _kl


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
    dt = _kl.math_dtype(soft_logits.dtype)
    log_p = F.log_softmax(soft_logits.reshape(-1, C).to(dt) / temperature, dim=-1)
    log_q = F.log_softmax(hard_logits.reshape(-1, C).to(dt) / temperature, dim=-1)
    return _kl.reduce_rows(_kl.kl_rows(log_p, log_q), soft_logits.shape[:-1], C, reduction, soft_logits.dtype)


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
