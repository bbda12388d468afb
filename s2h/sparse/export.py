"""Leaving the sparse kernels: :func:`densify` (the dense masked model, for ONNX and any dense
runtime) and the input-dtype check that ``sparsify`` installs on the models it returns.

A sparsified model exports with ``torch.export`` (the sparse kernels are custom ops with fake
kernels) but not to ONNX: ONNX has no operator for them.  ``torch.onnx.export`` on a sparse layer
raises :data:`~s2h.sparse.modules.ONNX_MESSAGE`, which points here.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .calibration import AutoSparse
from .modules import FastMaxPool2d, SparseConv2d, SparseLinear

__all__ = ["densify", "check_input_dtype"]


def _dense_layer(mod: nn.Module) -> nn.Module:
    w = mod.sparse_weight.to_dense()
    bias = mod.bias
    if isinstance(mod, SparseLinear):
        dense = nn.Linear(mod.in_features, mod.out_features, bias=bias is not None, dtype=w.dtype, device=w.device)
        dense.weight.data.copy_(w)
    else:
        dense = nn.Conv2d(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                          mod.groups, bias=bias is not None, dtype=w.dtype, device=w.device)
        dense.weight.data.copy_(w.reshape(dense.weight.shape))
    if bias is not None:
        dense.bias.data.copy_(bias)
    for p in dense.parameters():
        p.requires_grad_(False)
    return nn.Sequential(dense, nn.ReLU()) if mod.relu else dense


def densify(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The model with every sparse layer back as a dense ``nn.Conv2d`` / ``nn.Linear`` (zeros kept).

    Same outputs as ``model`` (a fused ReLU becomes ``nn.Sequential(layer, nn.ReLU())``;
    :class:`FastMaxPool2d` becomes ``nn.MaxPool2d``; an :class:`AutoSparse` its dense layer).  What
    to export to ONNX, or to hand to any dense or sparsity-aware engine that reads dense weights.
    """
    if not inplace:
        model = copy.deepcopy(model)
    for name, mod in list(model.named_modules()):
        if not name:
            continue
        if isinstance(mod, (SparseConv2d, SparseLinear)):
            new: nn.Module = _dense_layer(mod)
        elif isinstance(mod, AutoSparse):
            new = mod.dense
        elif isinstance(mod, FastMaxPool2d):
            new = nn.MaxPool2d(mod.kernel_size, mod.stride, mod.padding, mod.dilation, ceil_mode=mod.ceil_mode)
        else:
            continue
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
    for key, hook in list(model._forward_pre_hooks.items()):
        if hook is check_input_dtype:
            del model._forward_pre_hooks[key]
    return model


def _model_dtype(module: nn.Module):
    for t in module.parameters():
        if t.is_floating_point():
            return t.dtype
    for t in module.buffers():
        if t.is_floating_point():
            return t.dtype
    return None


_HALF = (torch.bfloat16, torch.float16)


def check_input_dtype(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook: a bfloat16 / float16 input to a float32 model (or the reverse) is refused
    with a message that says what to do, instead of torch's 'Input type ... and bias type ...
    should be the same' from deep inside the model.  Costs one parameter lookup per call."""
    x = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if x is None or not x.is_floating_point():
        return
    want = _model_dtype(module)
    if want is None or want is x.dtype or (x.dtype not in _HALF and want not in _HALF):
        return
    raise ValueError(f"sparsified model: input dtype is {x.dtype} but the model's weights are {want}; "
                     f"convert the model to the input's dtype first (model.to({x.dtype}); sparse layers then "
                     f"compute in float32 and return {x.dtype}), or feed {want} input")
