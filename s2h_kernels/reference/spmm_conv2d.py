"""Pure-PyTorch reference for s2h_kernels.spmm_conv2d: densify W and use F.conv2d.

Same signature as the fused op (without ``backend``); eager autograd flows through x and bias.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def spmm_conv2d(sparse_weight, x: torch.Tensor, kernel_size, bias: Optional[torch.Tensor] = None, stride=1,
                padding=0, dilation=1, groups: int = 1, relu: bool = False) -> torch.Tensor:
    """``act(F.conv2d(x, W) + bias)`` with W given as its (M, C/groups*kh*kw) packing."""
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    m, k = sparse_weight.shape
    w = sparse_weight.to_dense().to(x.dtype).reshape(m, k // (kh * kw), kh, kw)
    y = F.conv2d(x, w, bias, stride, padding, dilation, groups)
    return torch.relu(y) if relu else y
