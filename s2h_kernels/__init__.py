"""Fused kernels for S2HPruner and teacher-guided one-shot pruning.

One public op per module (s2h_kernels/<op>.py), each with a pure-PyTorch reference in
``s2h_kernels.reference``; which backends (C++ CPU, CUDA C++, Triton) each op has is listed in the
README's op table. Fake kernels and autograd are registered for every variant of an op by one
function (s2h_kernels/_registration.py). triton is optional: without it every CPU path works and
``backend="triton"`` raises an ImportError that says to install it (docs/DESIGN.md §5).
"""
import torch  # noqa: F401  first: _C links against libc10/libtorch, which torch loads

from . import _C  # noqa: F401  loads TORCH_LIBRARY(s2h, ...) and the C++ kernels
from . import reference
from .ca_kld import ca_kld
from .channel_masks import channel_masks
from .dual_linear import dual_linear
from .kl_gap import kl_gap
from .kl_gap_with_grads import kl_gap_with_grads
from .sparse_format import SparseWeight
from .spmm import spmm
from .spmm_conv2d import spmm_conv2d

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
