"""Two CUDA streams for one layer's soft and hard work (the side stream is the model's own)."""
from __future__ import annotations

import torch

from .masks import MaskState

__all__ = ["two_streams"]


def two_streams(state: MaskState, fn_a, fn_b, xa: torch.Tensor, xb: torch.Tensor):
    """Run fn_a on the current CUDA stream and fn_b on the model's side stream; join before returning."""
    cur = torch.cuda.current_stream(xa.device)
    side = state.side_stream(xa.device)
    side.wait_stream(cur)
    ya = fn_a()
    with torch.cuda.stream(side):
        yb = fn_b()
    cur.wait_stream(side)
    xb.record_stream(side)
    yb.record_stream(cur)
    return ya, yb
