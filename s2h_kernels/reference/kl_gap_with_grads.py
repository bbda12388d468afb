"""Pure-PyTorch ``kl_gap_with_grads`` (docs/DESIGN.md §2): the reference KL gap and its gradients by
eager autograd."""
from __future__ import annotations

from typing import Optional

import torch

from .kl_gap import kl_gap


def kl_gap_with_grads(
    soft_logits: torch.Tensor,
    hard_logits: torch.Tensor,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    backend: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, d loss / d soft, d loss / d hard) by eager autograd; for "none", of the rows' sum."""
    del backend
    s = soft_logits.detach().requires_grad_(True)
    h = hard_logits.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = kl_gap(s, h, temperature, reduction)
        gs, gh = torch.autograd.grad(loss.sum(), (s, h))
    return loss.detach(), gs, gh
