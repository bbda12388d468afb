"""Pure-PyTorch channel masks, one group at a time (docs/DESIGN.md §2). The oracle for every backend."""
from __future__ import annotations

import math
from typing import Sequence

import torch

# Hard-width ties: a bucket whose keep probability is within this relative distance of the
# threshold counts as kept, so backends that sum in different orders agree on exact ties
# (flat u with an odd bucket count puts one bucket exactly on mean(w)). The one definition: the
# public op and the Triton kernel import it; C++ has kMaskTieRtol in csrc/common/channel_masks.h,
# which tests/kernels/test_channel_masks.py checks equal to this value.
TIE_RTOL = 1e-5
HARD_WIDTHS = ("threshold", "expected")


def channel_masks(
    u: torch.Tensor,
    offsets: torch.Tensor | Sequence[int],
    temperature: float = 1.0,
    divisors: torch.Tensor | Sequence[int] | None = None,
    hard_width: str = "threshold",
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Soft masks ``w`` (per channel), expected widths ``E`` and hard keep counts ``k`` per group.

    ``u`` packs every group's logits over buckets; group g owns ``u[offsets[g]:offsets[g+1]]``
    and has ``divisors[g]`` channels per bucket. Per group: ``p = softmax(u / T)``,
    ``w_j = sum_{k>=j} p_k`` (reverse cumsum), each bucket repeated ``d`` times;
    ``E = d * sum_j w_j``; ``k`` is ``d * #{j : w_j >= mean(w)}`` ("threshold") or
    ``d * ceil(E / d)`` ("expected"), at least ``d`` and at most the group's channels.
    ``backend`` is accepted (and ignored) so the signature matches ``s2h_kernels.channel_masks``.
    """
    del backend
    if hard_width not in HARD_WIDTHS:
        raise ValueError(f"hard_width must be one of {HARD_WIDTHS}, got {hard_width!r}")
    offsets = [int(o) for o in offsets]
    n_groups = len(offsets) - 1
    divisors = [1] * n_groups if divisors is None else [int(d) for d in divisors]
    ws, es, ks = [], [], []
    for g in range(n_groups):
        # fp32 math for half inputs, as the kernels do; fp64 stays fp64.
        ug = u[offsets[g] : offsets[g + 1]].to(torch.promote_types(u.dtype, torch.float32))
        d = divisors[g]
        p = torch.softmax(ug / temperature, dim=0)
        w = torch.flip(torch.cumsum(torch.flip(p, [0]), 0), [0])
        e = d * w.sum()
        n = w.numel()
        with torch.no_grad():
            if hard_width == "threshold":
                t = w.mean()
                kb = int((w >= t * (1 - TIE_RTOL)).sum())
            else:
                s = float(w.sum())
                kb = math.ceil(s - TIE_RTOL) if math.isfinite(s) else 1
            kb = min(max(kb, 1), n)
        ws.append(w.repeat_interleave(d))
        es.append(e)
        ks.append(kb * d)
    w = torch.cat(ws).to(u.dtype)
    expected = torch.stack(es).to(u.dtype)
    keep = torch.tensor(ks, dtype=torch.int64, device=u.device)
    return w, expected, keep
