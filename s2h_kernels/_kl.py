"""Python helpers shared by the KL ops (kl_gap, kl_gap_with_grads, ca_kld): input checks, row
layout and reductions. Private to the package; the names are public within it.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ._backend import check_float, check_same_device, resolve_backend

REDUCTIONS = ("batchmean", "sum", "mean", "none")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the per-row losses: float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_op_inputs(op: str, n1: str, x: torch.Tensor, n2: str, y: torch.Tensor, temperature: float) -> None:
    """The C++ kernels' checks (csrc/common/kl_gap_checks.h), for the Triton ops called directly."""
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


def check_gamma_eps(op: str, gamma: Optional[float], eps: float) -> None:
    if gamma is not None and not (0.0 <= gamma <= 1.0):
        raise ValueError(f"{op}: gamma must lie in [0, 1], got {gamma}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{op}: eps must be a finite number >= 0, got {eps}")


def validate(op: str, n1: str, x, n2: str, y, temperature, reduction: str, backend: Optional[str]) -> str:
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


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """(..., C) -> (rows, C); 2-D input as is (a reshape would add a view node to the graph)."""
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


def reduce_loss(op: str, loss_rows: torch.Tensor, lead_shape, classes: int, reduction: str, dtype: torch.dtype):
    if reduction == "none":
        return (loss_rows if len(lead_shape) == 1 else loss_rows.reshape(lead_shape)).to(dtype)
    if reduction == "batchmean":
        total = loss_rows.mean()
    elif reduction == "mean":
        total = loss_rows.mean() / classes
    else:
        total = loss_rows.sum()
    return total.to(dtype)


def grad_scale(rows: int, classes: int, reduction: str) -> float:
    return {"batchmean": 1.0 / rows, "mean": 1.0 / (rows * classes)}.get(reduction, 1.0)
