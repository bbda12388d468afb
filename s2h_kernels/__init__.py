"""Fused kernels for S2HPruner and teacher-guided one-shot pruning.

Each op has a C++ CPU kernel, a CUDA C++ kernel and a Triton kernel, a pure-PyTorch reference in
``s2h_kernels.reference``, and a fake kernel and autograd registered with ``torch.library``.
"""
import torch  # noqa: F401  first: _C links against libc10/libtorch, which torch loads

from . import _C  # noqa: F401  loads TORCH_LIBRARY(s2h, ...) and the C++ kernels
from . import reference
from .channel_masks import channel_masks
from .dual_linear import dual_linear
from .kl_gap import ca_kld, kl_gap, kl_gap_with_grads
from .spmm import SparseWeight, spmm, spmm_conv2d

__all__ = [
    "SparseWeight",
    "ca_kld",
    "channel_masks",
    "dual_linear",
    "kl_gap",
    "kl_gap_with_grads",
    "reference",
    "spmm",
    "spmm_conv2d",
]
