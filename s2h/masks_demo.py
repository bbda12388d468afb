"""Interim main job: the channel-mask op on a real torchvision model's dependency groups.

``python -m s2h demo`` runs the full S2H job (s2h/demo.py) when it is installed; this module is
its stand-in: it converts torchvision's ResNet-18, computes every group's soft mask, expected
width and hard keep count in one ``s2h_kernels.channel_masks`` call, and prints them.
"""
from __future__ import annotations

import argparse
import time

import torch
import torchvision

import s2h
import s2h_kernels


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0)


def main(args) -> None:
    torch.manual_seed(args.seed)
    model = torchvision.models.resnet18(num_classes=10)
    pruned = s2h.convert(model, torch.randn(1, 3, 64, 64), target_flops=0.15)
    u = pruned.u.detach() + torch.randn_like(pruned.u)  # some spread, as after training
    start = time.perf_counter()
    w, expected, keep = s2h_kernels.channel_masks(u, pruned.group_offsets, args.temperature)
    ms = (time.perf_counter() - start) * 1e3
    print(f"resnet18: {len(pruned.groups)} dependency groups, {w.numel()} channels, masks in one call ({ms:.2f} ms)")
    print(f"{'group':<28}{'channels':>9}{'E':>9}{'keep':>6}  w[0], w[-1]")
    offsets = pruned.group_offsets.tolist()
    start_ch = 0
    for g, info in enumerate(pruned.groups):
        ch = (offsets[g + 1] - offsets[g]) * info.divisor
        wg = w[start_ch : start_ch + ch]
        print(f"{info.name:<28}{ch:>9}{expected[g].item():>9.2f}{keep[g].item():>6}  {wg[0]:.3f}, {wg[-1]:.3f}")
        start_ch += ch
