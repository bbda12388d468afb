"""Shared pieces of the KL references (kl_gap, kl_gap_with_grads, ca_kld): the math dtype, the
row-wise KL with zero-probability terms exactly 0, and the reductions. Private to the package."""
from __future__ import annotations

import torch

REDUCTIONS = ("batchmean", "sum", "mean", "none")


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def reduce_rows(rows: torch.Tensor, lead_shape, classes: int, reduction: str, dtype: torch.dtype) -> torch.Tensor:
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


def kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """sum_j p_j (log p_j - log q_j) per row, with p_j = 0 terms exactly 0 (and gradient 0)."""
    p = log_p.exp()
    zero = p == 0
    diff = torch.where(zero, torch.zeros_like(log_p), log_p - log_q)
    return (p * diff).sum(-1)
