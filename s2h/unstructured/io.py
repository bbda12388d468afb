"""Pruned models on disk (docs/DESIGN.md §3).

Saved form: ``model.pt`` (a plain ``state_dict`` whose pruned weights are 0: the model keeps
ordinary ``nn.Conv2d``/``nn.Linear`` layers, which ``s2h.sparse.sparsify`` converts), ``masks.pt``
(``{param_name: bool tensor}``, True = kept) and ``model.json`` (architecture spec and sparsity),
all loadable with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ..models import build_model
from .pruning import apply_masks, sparsity_report

__all__ = ["FORMAT", "save_pruned", "load_pruned"]

FORMAT = "s2h-pruned/1"


def save_pruned(directory, model: nn.Module, masks: Mapping[str, torch.Tensor], spec: dict | None = None,
                extra: dict | None = None) -> Path:
    """Write ``model.pt`` (state_dict), ``masks.pt`` ({name: bool}) and ``model.json`` into ``directory``.

    ``spec`` is what :func:`s2h.models.build_model` needs to rebuild the model (``arch``,
    ``num_classes``, ``in_channels``, ``image_size``); without it :func:`load_pruned` needs a model.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    apply_masks(model, masks)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, d / "model.pt")
    torch.save({k: m.detach().cpu().bool() for k, m in masks.items()}, d / "masks.pt")
    rep = sparsity_report(model, masks)
    meta = {"format": FORMAT, "spec": spec, "sparsity": rep["sparsity"], "pruned": rep["pruned"],
            "prunable": rep["numel"], "layers": {k: v["sparsity"] for k, v in rep["layers"].items()}}
    if extra:
        meta.update(extra)
    (d / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    return d


def load_pruned(directory, model: nn.Module | None = None, map_location="cpu") -> tuple[nn.Module, "OrderedDict[str, torch.Tensor]"]:
    """Load what :func:`save_pruned` wrote: ``(model, masks)``, masks re-applied.

    With ``model=None`` the model is rebuilt from ``model.json``'s spec. Only tensors are
    unpickled (``weights_only=True``). A saved weight that is non-zero where its mask is False
    means the files do not belong together: ValueError.
    """
    d = Path(directory)
    for f in ("model.pt", "masks.pt"):
        if not (d / f).is_file():
            raise FileNotFoundError(f"load_pruned: no {d / f} (expected model.pt, masks.pt, model.json)")
    if model is None:
        meta_path = d / "model.json"
        spec = json.loads(meta_path.read_text()).get("spec") if meta_path.is_file() else None
        if not spec:
            raise ValueError(f"load_pruned: {d} has no model spec in model.json; pass model=")
        model = build_model(spec["arch"], spec["num_classes"], spec.get("in_channels", 3), spec.get("image_size"))
    state = torch.load(d / "model.pt", map_location=map_location, weights_only=True)
    masks = torch.load(d / "masks.pt", map_location=map_location, weights_only=True)
    model.load_state_dict(state)
    params = dict(model.named_parameters())
    for name, m in masks.items():
        if name not in params:
            raise ValueError(f"load_pruned: mask {name!r} names no parameter of the model")
        if bool((params[name].detach()[~m.to(params[name].device)] != 0).any()):
            raise ValueError(f"load_pruned: {name} has non-zero weights where its mask is False")
    apply_masks(model, masks)
    return model, OrderedDict(masks)
