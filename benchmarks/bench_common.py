"""Helpers shared by the layer and ViT benchmarks."""
from __future__ import annotations


def widths_at(model, target: float = 0.15, big: float = 40.0) -> float:
    """Peaked u (0/1 prefix masks), one keep fraction for every group, bisected to ``target`` hard FLOPs.

    Returns the hard FLOPs fraction reached."""
    def set_fraction(f):
        import torch

        with torch.no_grad():
            model.u.fill_(-big)
            offs = model.group_offsets.tolist()
            for gi, g in enumerate(model.groups):
                j = max(1, min(g.buckets, round(f * g.buckets)))
                model.u[offs[gi] + j - 1] = big
        return model.hard_flops() / model.dense_flops()

    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if set_fraction(mid) < target else (lo, mid)
    return set_fraction(hi)
