"""Independent references for the S2H tests: plain copies, Torch-Pruning's physical pruning, FLOP counts.

Nothing here uses s2h's slicing, export or FLOPs code: a converted model is copied back into plain
``nn`` layers (full width, one branch's BatchNorm statistics), and Torch-Pruning removes the
channels ``k..C-1`` of every group with its own pruning functions.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from s2h.structured.layers import S2HBatchNorm1d, S2HBatchNorm2d, S2HConv2d, S2HLayerNorm, S2HLinear


def macs(model: nn.Module, *inputs) -> float:
    """FlopCounterMode's count divided by 2 (MACs)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*inputs)
    return counter.get_total_flops() / 2


def plain_copy(s2h_model, stats: str = "dense") -> nn.Module:
    """The wrapped network at full width with plain nn layers and ``stats``' BN running statistics."""
    net = copy.deepcopy(s2h_model.model)
    swap = {}
    for _, m in net.named_modules():
        if isinstance(m, S2HConv2d):
            p = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                          m.bias is not None, m.padding_mode)
        elif isinstance(m, S2HLinear):
            p = nn.Linear(m.in_features, m.out_features, m.bias is not None)
        elif isinstance(m, (S2HBatchNorm1d, S2HBatchNorm2d)):
            cls = nn.BatchNorm2d if isinstance(m, S2HBatchNorm2d) else nn.BatchNorm1d
            p = cls(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
        elif isinstance(m, S2HLayerNorm):
            p = nn.LayerNorm(m.normalized_shape, m.eps, m.elementwise_affine, m.bias is not None)
        else:
            continue
        with torch.no_grad():
            for name, t in p.named_parameters():
                t.copy_(getattr(m, name))
            for name, t in p.named_buffers():
                src = getattr(m, name if stats == "dense" else f"{name}_{stats}")
                t.copy_(src)
        p.train(m.training)
        swap[m] = p
    for parent in list(net.modules()):
        for n, c in list(parent._modules.items()):
            if c in swap:
                parent._modules[n] = swap[c]
    return net


def tp_prune(net: nn.Module, example_inputs, keep: dict[str, int], channels: dict[str, int]) -> nn.Module:
    """Remove channels ``keep[g]..C-1`` of every group (by its root layer's name) with Torch-Pruning."""
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    training = net.training
    dg = tp.DependencyGraph().build_dependency(net, example_inputs=inputs, forward_fn=lambda m, x: m(*x),
                                              verbose=False)
    for name, k in keep.items():
        c = channels[name]
        if k == c:
            continue
        root = net.get_submodule(name)
        group = dg.get_pruning_group(root, dg.get_pruner_of_module(root).prune_out_channels, list(range(k, c)))
        group.prune()
    net.train(training)
    return net


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affines (fresh models have mean 0, var 1, γ 1, β 0 everywhere,
    which would hide a permutation or slice error in them)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
                if m.affine:
                    m.weight.copy_(0.5 + torch.rand(n, generator=g))
                    m.bias.copy_(0.1 * torch.randn(n, generator=g))
    return model


def random_u(model, seed: int = 0, scale: float = 2.0) -> None:
    """Random mask logits: a spread of keep counts over the groups."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.u.copy_(scale * torch.randn(model.u.shape, generator=g))


def peaked_u(model, fractions: dict[str, float] | float, big: float = 40.0) -> dict[str, int]:
    """u with all mass on one bucket per group: w is a 0/1 prefix, soft == masked hard. Returns k."""
    keep = {}
    with torch.no_grad():
        model.u.fill_(-big)
        offs = model.group_offsets.tolist()
        for gi, g in enumerate(model.groups):
            f = fractions if isinstance(fractions, float) else fractions[g.name]
            nb = g.buckets
            j = max(1, min(nb, round(f * nb)))
            model.u[offs[gi] + j - 1] = big
            keep[g.name] = j * g.divisor
    return keep


class CatNet(nn.Module):
    """Two branches concatenated; a BN over the concat; a conv consuming it; a flatten into a linear."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.bna = nn.BatchNorm2d(6)
        self.b = nn.Conv2d(3, 5, 1)
        self.bnb = nn.BatchNorm2d(5)
        self.bn_cat = nn.BatchNorm2d(11)
        self.c = nn.Conv2d(11, 7, 3, padding=1)
        self.fc = nn.Linear(7 * 4 * 4, 3)

    def forward(self, x):
        y = torch.cat([F.relu(self.bna(self.a(x))), F.relu(self.bnb(self.b(x)))], 1)
        y = F.relu(self.c(F.relu(self.bn_cat(y))))
        return self.fc(F.adaptive_avg_pool2d(y, 4).flatten(1))
