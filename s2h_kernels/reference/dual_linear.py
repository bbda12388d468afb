"""Pure-PyTorch paired linear: the soft and the hard branch as two plain F.linear calls."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def dual_linear(x_soft, x_hard, weight, bias=None, k_out=None, k_in=None, backend=None):
    """``(F.linear(x_soft, W, b), F.linear(x_hard, W[:k_out, :k_in], b[:k_out]))``."""
    del backend
    n, k = weight.shape
    k_out = n if k_out is None else int(k_out)
    k_in = k if k_in is None else int(k_in)
    b_h = None if bias is None else bias[:k_out]
    return F.linear(x_soft, weight, bias), F.linear(x_hard, weight[:k_out, :k_in], b_h)
