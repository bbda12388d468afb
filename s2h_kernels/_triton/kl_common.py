"""Triton helpers shared by the KL kernels (kl_gap, ca_kld); imported only with triton installed."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def rescale(acc, old):
    # acc * old, where a 0 factor drops acc (its terms are underflowed probabilities).
    return tl.where(old == 0, 0.0, acc * old)


@triton.jit
def pmul(e, f):
    # e * f with 0 * anything = 0 when e == 0 (a zero probability contributes nothing).
    return tl.where(e == 0, 0.0, e * f)


def acc_torch(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of the per-row losses: float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


# Largest chunk of classes a program holds at once; the loop handles any C. Tests lower it to
# exercise the multi-chunk path with small C.
MAX_BLOCK = 4096


def launch_cfg(C: int) -> dict:
    block = min(triton.next_power_of_2(C), MAX_BLOCK)
    return dict(BLOCK=block, num_warps=max(1, min(16, block // 256)))
