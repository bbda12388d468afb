"""Adapters for models whose output is not one tensor of logits."""
from __future__ import annotations

from typing import Union

import torch
from torch import nn

__all__ = ["SelectOutput"]


class SelectOutput(nn.Module):
    """``model(x)[key]``: the logits of a model returning a tuple (``key=0``) or a dict (``key="logits"``).

    ``s2h.convert`` and the S2H trainer need a model returning one tensor; convert
    ``SelectOutput(model, key)`` instead. ``.model`` is the wrapped model.
    """

    def __init__(self, model: nn.Module, key: Union[int, str] = 0):
        super().__init__()
        self.model = model
        self.key = key

    def forward(self, *args, **kwargs) -> torch.Tensor:
        out = self.model(*args, **kwargs)
        if hasattr(out, "logits") and isinstance(self.key, str) and not isinstance(out, dict):
            return getattr(out, self.key)
        return out[self.key]

    def extra_repr(self) -> str:
        return f"key={self.key!r}"
