"""Save and load S2H and exported models.

Files hold tensors and plain Python values only (``torch.load(weights_only=True)`` reads them):
the state dict, the conversion settings (example input shapes, target, divisor, ...) and, for an
exported model, the kept width per group. Loading rebuilds the structure from the original
architecture and those widths; no module is pickled. The architecture comes from
``model_factory()``, or, for a file saved with ``spec=`` (what ``python -m s2h prune`` writes), from
``s2h.models.build_model(**spec)``::

    small = s2h.load("runs/r56/pruned.pt")                 # the exported network (plain layers)
    s2hm = s2h.load("runs/r56/s2h_model.pt")               # the S2HModel: masks, both branches
    small = s2h.load("pruned.pt", lambda: torchvision.models.resnet18(num_classes=10))  # your own
"""
from __future__ import annotations

import os
import warnings
from typing import Callable

import torch
from torch import nn

from .convert import convert
from .model import S2HModel

__all__ = ["save", "load", "FORMAT_VERSION"]

FORMAT_VERSION = 1


def save(model: nn.Module, path: str | os.PathLike, spec: dict | None = None) -> None:
    """Save an S2HModel (weights, u, per-branch BN statistics) or a model returned by ``export``.

    ``spec``: the keyword arguments of :func:`s2h.models.build_model` that build the unconverted
    architecture (``name``, ``num_classes``, ``in_channels``, ``image_size``, ``widths``), so that
    :func:`load` needs no factory."""
    if isinstance(model, S2HModel):
        payload = {"format": "s2h", "version": FORMAT_VERSION, "config": model.config,
                   "state_dict": model.state_dict()}
    elif hasattr(model, "s2h_widths") and hasattr(model, "s2h_config"):
        payload = {"format": "s2h-exported", "version": FORMAT_VERSION, "config": model.s2h_config,
                   "widths": dict(model.s2h_widths), "state_dict": model.state_dict()}
    else:
        raise ValueError(f"s2h.save: expected an S2HModel or a model from S2HModel.export(), "
                         f"got {type(model).__name__}")
    if spec is not None:
        if not isinstance(spec, dict) or "name" not in spec:
            raise ValueError("s2h.save: spec must be a dict of s2h.models.build_model arguments with 'name'")
        payload["spec"] = dict(spec)
    torch.save(payload, path)


def load(path: str | os.PathLike, model_factory: Callable[[], nn.Module] | None = None,
         map_location="cpu") -> nn.Module:
    """Load what :func:`save` wrote. ``model_factory()`` builds the original (unconverted)
    architecture; without one, the file's ``spec`` does (files written by the command line).

    Returns an S2HModel, or the exported plain model with the saved widths per group.
    """
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") not in ("s2h", "s2h-exported"):
        raise ValueError(f"s2h.load: {os.fspath(path)!r} is not a file written by s2h.save")
    if payload.get("version") != FORMAT_VERSION:
        raise ValueError(f"s2h.load: unsupported format version {payload.get('version')!r}")
    cfg = payload["config"]
    if model_factory is None:
        spec = payload.get("spec")
        if spec is None:
            raise ValueError(f"s2h.load: {os.fspath(path)!r} records no architecture (saved without spec=); pass "
                             "model_factory, a function that builds the unconverted model")
        from ..models import build_model

        def model_factory():
            return build_model(**spec)
    base = model_factory()
    if not isinstance(base, nn.Module):
        raise TypeError(f"s2h.load: model_factory() must return an nn.Module, got {type(base).__name__}")
    dev = next((p.device for p in base.parameters()), torch.device("cpu"))
    inputs = tuple(torch.zeros(shape, dtype=getattr(torch, dt), device=dev) for shape, dt in cfg["example_inputs"])
    with warnings.catch_warnings():  # reloading: what convert says about the target was said at training time
        warnings.filterwarnings("ignore", message=r"s2h\.convert: target_flops", category=UserWarning)
        m = convert(base, inputs, target_flops=cfg["target_flops"], ignored_layers=cfg["ignored_layers"] or None,
                    divisor=cfg["divisor"], temperature=cfg["temperature"], hard_width=cfg["hard_width"],
                    reorder=False, inplace=True)
    found = [[g.name, g.channels] for g in m.groups]
    if found != [list(x) for x in cfg["groups"]]:
        raise ValueError("s2h.load: model_factory() builds an architecture whose dependency groups differ from "
                         f"the saved model's ({len(found)} vs {len(cfg['groups'])} groups)")
    if payload["format"] == "s2h":
        m.load_state_dict(payload["state_dict"])
        return m
    net = m.export(widths=payload["widths"])
    net.load_state_dict(payload["state_dict"])
    return net
