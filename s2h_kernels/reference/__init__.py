"""Pure-PyTorch references, one per op, written for clarity with eager autograd.

Tests and benchmarks compare every backend against these.
"""
from .channel_masks import channel_masks

__all__ = ["channel_masks"]
