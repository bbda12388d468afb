"""Pure-PyTorch reference for s2h_kernels.spmm: densify W and use a dense matmul.

Same signature as the fused op (without ``backend``); eager autograd flows through x and bias.
"""
from __future__ import annotations

from typing import Optional

import torch


def spmm(sparse_weight, x: torch.Tensor, bias: Optional[torch.Tensor] = None, relu: bool = False) -> torch.Tensor:
    """``act(W @ x + bias)``; x is (K, N) or (K,)."""
    w = sparse_weight.to_dense().to(x.dtype)
    y = w @ x
    if bias is not None:
        y = y + (bias[:, None] if x.dim() == 2 else bias)
    return torch.relu(y) if relu else y
