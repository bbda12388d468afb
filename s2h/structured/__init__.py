"""S2HPruner: structured channel pruning with a soft and a hard network trained together (docs/DESIGN.md §2).

Read in the paper's order: :mod:`.masks` (mask state, channel specs, branches), :mod:`.layers`
(one file per layer family), :mod:`.groups` (dependency groups), :mod:`.flops` (the differentiable
FLOPs), :mod:`.attention` (ViT / Swin), :mod:`.model` and :mod:`.convert` (the converted model),
:mod:`.step_base` and :mod:`.step` (Algorithm 1, one method per phase), :mod:`.reference` (the
literal algorithm), :mod:`.export` and :mod:`.io` (the plain pruned model, files).

The functions ``convert`` and ``export`` live in the modules of the same names
(``from s2h.structured.convert import convert``; ``s2h.convert`` and ``s2h.export`` at the top).
"""
from .io import load, save
from .layers import S2H_LAYER_TYPES, S2HBatchNorm1d, S2HBatchNorm2d, S2HConv2d, S2HLayerNorm, S2HLinear
from .masks import BRANCHES, branch, current_branch
from .model import S2HModel
from .reference import S2HReference
from .step import TABLE5, TERMS, NonFiniteLossError, S2HPruner, StepState

__all__ = [
    "BRANCHES", "NonFiniteLossError", "S2HBatchNorm1d", "S2HBatchNorm2d", "S2HConv2d", "S2HLayerNorm",
    "S2HLinear", "S2HModel", "S2HPruner", "S2HReference", "S2H_LAYER_TYPES", "StepState", "TABLE5", "TERMS",
    "branch", "current_branch", "load", "save",
]
