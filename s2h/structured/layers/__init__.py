"""S2H layers: drop-in ``nn.Conv2d`` / ``nn.Linear`` / norm layers that run a soft, hard or dense branch.

One file per layer family: :mod:`.conv`, :mod:`.linear`, :mod:`.norm`; :mod:`.base` holds what
they share. Each layer reads its model's :class:`~s2h.structured.masks.MaskState` (masks and the
active branch) and knows its plain module (``to_plain``), which is all export needs.
"""
from .base import S2HLayer, adopt, device_of, swap_modules
from .conv import S2HConv2d
from .linear import S2HLinear
from .norm import S2HBatchNorm, S2HBatchNorm1d, S2HBatchNorm2d, S2HLayerNorm, S2HLayerNorm2d

S2H_LAYER_TYPES = (S2HConv2d, S2HLinear, S2HBatchNorm1d, S2HBatchNorm2d, S2HLayerNorm)  # S2HLayerNorm2d included

__all__ = ["S2HLayer", "S2HConv2d", "S2HLinear", "S2HBatchNorm", "S2HBatchNorm1d", "S2HBatchNorm2d",
           "S2HLayerNorm", "S2HLayerNorm2d", "S2H_LAYER_TYPES", "adopt", "device_of", "swap_modules"]
