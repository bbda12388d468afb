"""Pure-PyTorch references, one per op (one module per op), written for clarity with eager autograd.

Tests and benchmarks compare every backend against these.
"""
from .ca_kld import ca_kld
from .channel_masks import channel_masks
from .dual_linear import dual_linear
from .kl_gap import kl_gap, kl_gap_d1_d2
from .kl_gap_with_grads import kl_gap_with_grads
from .spmm import spmm
from .spmm_conv2d import spmm_conv2d

__all__ = ["ca_kld", "channel_masks", "dual_linear", "kl_gap", "kl_gap_d1_d2", "kl_gap_with_grads", "spmm", "spmm_conv2d"]
