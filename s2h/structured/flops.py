"""Analytic FLOPs of a converted model, differentiable in the expected widths (docs/DESIGN.md §2).

Convention: **MACs** (multiply-accumulates) of the conv and linear layers for **one sample** at
the spatial size of the ``example_inputs`` given to :func:`s2h.convert` — what
``torch.utils.flop_counter.FlopCounterMode`` reports for a batch of one, divided by 2. Norms,
activations, pooling and bias additions are not counted (FlopCounterMode does not count them
either).

Per layer ``l`` with input width ``a_l`` and output width ``b_l`` (channels, or features for a
linear): ``F_l = coef_l · a_l · b_l`` where ``coef_l = kh·kw·H_out·W_out`` for a conv (divided by
the groups of a grouped conv: each output channel reads ``a_l / groups`` inputs; a depthwise conv
has ``a_l = 1``)
and the number of tokens per sample for a linear. Widths are affine in the group widths:
``a = A_in @ widths + c_in`` (``A`` counts how many entries of the dimension each group channel
fills: 1, or ``H·W`` behind a flatten), so ``F = Σ coef · a · b`` is bilinear in adjacent groups'
widths. With ``widths = E`` (expected widths) it is the soft FLOPs, differentiable in ``u``; with
the keep counts the hard FLOPs; with the full channel counts the dense FLOPs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .layers import S2HConv2d, S2HLinear
from .masks import ChannelSpec

__all__ = ["LayerCost", "FlopsTable", "record_layer_costs", "flops_of"]


@dataclass
class LayerCost:
    name: str
    coef: float  # MACs per (input entry x output entry), summed over calls, per sample
    in_spec: ChannelSpec | None
    out_spec: ChannelSpec | None
    in_size: int  # full input width (1 for depthwise: folded into coef)
    out_size: int


def record_layer_costs(model: nn.Module, run, batch: int) -> list[LayerCost]:
    """Run ``run()`` (a dense forward) and record each S2H conv/linear's cost per sample."""
    coefs: dict[nn.Module, float] = {}

    def hook(mod, inp, out):
        if isinstance(mod, S2HConv2d):
            kh, kw = mod.kernel_size
            c = kh * kw * out.shape[-2] * out.shape[-1] * out.shape[0] / batch
            if mod.groups > 1 and not mod.depthwise:
                c /= mod.groups  # out_channels x (in_channels / groups) per position
        else:
            c = out.numel() // (out.shape[-1] * batch)
        coefs[mod] = coefs.get(mod, 0.0) + float(c)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (S2HConv2d, S2HLinear))]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    costs = []
    for name, mod in model.named_modules():
        if mod not in coefs:
            continue
        if isinstance(mod, S2HConv2d):
            in_size = 1 if mod.depthwise else mod.in_channels
            in_spec = None if mod.depthwise else mod.in_spec
            costs.append(LayerCost(name, coefs[mod], in_spec, mod.out_spec, in_size, mod.out_channels))
        else:
            costs.append(LayerCost(name, coefs[mod], mod.in_spec, mod.out_spec, mod.in_features, mod.out_features))
    return costs


class FlopsTable:
    """``coef``, ``A_in``, ``c_in``, ``A_out``, ``c_out`` as float64 tensors (see module doc)."""

    def __init__(self, costs: Sequence[LayerCost], n_groups: int):
        n = len(costs)
        self.names = [c.name for c in costs]
        self.coef = torch.tensor([c.coef for c in costs], dtype=torch.float64)
        self.a_in = torch.zeros(n, n_groups, dtype=torch.float64)
        self.a_out = torch.zeros(n, n_groups, dtype=torch.float64)
        self.c_in = torch.zeros(n, dtype=torch.float64)
        self.c_out = torch.zeros(n, dtype=torch.float64)
        for i, c in enumerate(costs):
            for spec, size, a, cvec in ((c.in_spec, c.in_size, self.a_in, self.c_in),
                                        (c.out_spec, c.out_size, self.a_out, self.c_out)):
                fixed = size
                if spec is not None:
                    for s in spec.segments:
                        a[i, s.group] += s.repeat
                        fixed -= s.channels * s.repeat
                cvec[i] = fixed

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"coef": self.coef, "a_in": self.a_in, "c_in": self.c_in, "a_out": self.a_out, "c_out": self.c_out}


def flops_of(widths: torch.Tensor, coef, a_in, c_in, a_out, c_out) -> torch.Tensor:
    """``Σ_l coef_l · (A_in @ widths + c_in)_l · (A_out @ widths + c_out)_l`` in float64."""
    widths = widths.to(torch.float64)
    return (coef * (a_in @ widths + c_in) * (a_out @ widths + c_out)).sum()
