"""Which weights are prunable, and one-shot pruning to an exact sparsity (docs/DESIGN.md §3).

Pruning. ``round(sparsity * n_prunable)`` weights are removed, exactly: the lowest scores under one
global threshold (``scope="global"``), or per layer (``scope="layer"``: each layer loses
``floor`` or ``ceil`` of ``sparsity * n_layer``, the ceilings going to the largest remainders so
the total is still exact). Ties are broken by position (layer order, then flat index within the
weight; the earlier one is pruned first), so the same scores always give the same mask. The first
conv and the classifier (the last ``nn.Linear``) are excluded by default.
"""
from __future__ import annotations

import fnmatch
import math
from collections import OrderedDict
from typing import Iterable, Mapping

import torch
from torch import nn

__all__ = ["DEFAULT_EXCLUDE", "PRUNABLE_TYPES", "prunable_weights", "prune", "apply_masks", "sparsity_report",
           "check_sparsity"]

DEFAULT_EXCLUDE = ("first conv", "classifier")
PRUNABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _resolve_excluded(model: nn.Module, exclude: Iterable[str] | None) -> set[str]:
    """Module names excluded from pruning.

    ``"first conv"``: the first conv module in registration order; ``"classifier"``: the last
    ``nn.Linear`` (the last conv when the model has no linear layer). Other entries are module or
    parameter names, fnmatch patterns allowed (``"layer4.*"``); one that matches nothing is an error.
    """
    mods = [(n, m) for n, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)]
    out: set[str] = set()
    for pat in exclude or ():
        key = pat.strip()
        if not key:
            continue
        low = key.lower().replace("_", " ").replace("-", " ")
        if low == "first conv":
            convs = [n for n, m in mods if not isinstance(m, nn.Linear)]
            out.update(convs[:1])
        elif low == "classifier":
            lins = [n for n, m in mods if isinstance(m, nn.Linear)] or [n for n, _ in mods]
            out.update(lins[-1:])
        else:
            hit = [n for n, _ in mods if fnmatch.fnmatchcase(n, key) or fnmatch.fnmatchcase(n + ".weight", key)]
            if not hit:
                raise ValueError(f"prune: exclude entry {key!r} matches no prunable layer; prunable layers are "
                                 f"{[n for n, _ in mods]}")
            out.update(hit)
    return out


def prunable_weights(model: nn.Module, exclude: Iterable[str] | None = DEFAULT_EXCLUDE) -> "OrderedDict[str, nn.Parameter]":
    """``{"<module>.weight": weight}`` of every prunable layer not excluded, in module order."""
    excluded = _resolve_excluded(model, exclude)
    out: OrderedDict[str, nn.Parameter] = OrderedDict()
    for name, m in model.named_modules():
        if isinstance(m, PRUNABLE_TYPES) and name not in excluded and isinstance(m.weight, nn.Parameter):
            out[f"{name}.weight" if name else "weight"] = m.weight
    return out


def check_sparsity(op: str, sparsity) -> float:
    try:
        s = float(sparsity)
    except (TypeError, ValueError):
        raise ValueError(f"{op}: sparsity must be a number in [0, 1), got {sparsity!r}") from None
    if not (math.isfinite(s) and 0.0 <= s < 1.0):
        raise ValueError(f"{op}: sparsity must be in [0, 1) (the fraction of weights removed), got {sparsity!r}")
    return s


def _layer_counts(sizes: list[int], sparsity: float, total_k: int) -> list[int]:
    """Per-layer removals: floor(s*n_l) plus one for the largest remainders until the sum is total_k."""
    exact = [sparsity * n for n in sizes]
    ks = [min(int(math.floor(e)), n) for e, n in zip(exact, sizes)]
    rest = total_k - sum(ks)
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - ks[i]), i))
    for i in order:
        if rest <= 0:
            break
        if ks[i] < sizes[i]:
            ks[i] += 1
            rest -= 1
    return ks


def _lowest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool keep-mask (flat) removing the k lowest scores; ties go to the lower index."""
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        order = torch.sort(scores, stable=True).indices
        keep[order[:k]] = False
    return keep


def _reserve(flat: list[torch.Tensor], min_density: float, keep: int) -> list[torch.Tensor]:
    """Scores with each layer's top ``ceil(min_density * n_layer)`` raised to +inf (never pruned)."""
    if not (0.0 <= float(min_density) <= 1.0):
        raise ValueError(f"prune: min_density must be in [0, 1], got {min_density!r}")
    if min_density == 0:
        return flat
    counts = [min(t.numel(), math.ceil(min_density * t.numel())) for t in flat]
    if sum(counts) > keep:
        raise ValueError(f"prune: min_density={min_density} keeps {sum(counts)} weights but the sparsity "
                         f"keeps only {keep}; lower min_density or the sparsity")
    out = []
    for t, c in zip(flat, counts):
        t = t.clone()
        t[torch.sort(-t, stable=True).indices[:c]] = float("inf")
        out.append(t)
    return out


def prune(model: nn.Module, scores: Mapping[str, torch.Tensor], sparsity: float,
          exclude: Iterable[str] | None = DEFAULT_EXCLUDE, scope: str = "global",
          apply: bool = True, min_density: float = 0.0) -> "OrderedDict[str, torch.Tensor]":
    """Keep the highest-scoring weights; return ``{param_name: bool mask}`` (True = kept).

    Exactly ``round(sparsity * n_prunable)`` weights are removed (``n_prunable`` counts the weights
    of the prunable, non-excluded layers). ``scope="global"`` ranks all of them together (one
    threshold); ``scope="layer"`` prunes each layer to (nearly) the same sparsity. Ties are broken
    by position: layer order, then flat index. ``apply=True`` zeroes the pruned weights in place.
    Scores for excluded layers are ignored; a missing or misshapen score is an error.

    ``min_density`` (global scope): every layer keeps at least ``ceil(min_density * n_layer)`` of its
    highest-scoring weights, the rest still go by the one global threshold and the total is still
    exact. One global threshold can empty a layer at high sparsity (the network is then cut in
    two and no retraining can recover); ``min_density=0`` (the default) is the plain threshold.
    """
    s = check_sparsity("prune", sparsity)
    if scope not in ("global", "layer"):
        raise ValueError(f"prune: scope must be 'global' or 'layer', got {scope!r}")
    weights = prunable_weights(model, exclude)
    if not weights:
        raise ValueError("prune: the model has no prunable weights (nn.Conv*d / nn.Linear) left after exclude")
    flat = []
    for name, p in weights.items():
        if name not in scores:
            raise ValueError(f"prune: scores has no entry for prunable weight {name!r}")
        sc = scores[name]
        if tuple(sc.shape) != tuple(p.shape):
            raise ValueError(f"prune: scores[{name!r}] has shape {tuple(sc.shape)}, the weight has {tuple(p.shape)}")
        sc = sc.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
        if torch.isnan(sc).any():
            raise ValueError(f"prune: scores[{name!r}] contains NaN")
        flat.append(sc)
    sizes = [t.numel() for t in flat]
    n = sum(sizes)
    k = int(round(s * n))
    if scope == "global":
        keep_flat = _lowest_k(torch.cat(_reserve(flat, min_density, n - k)), k).split(sizes)
    else:
        keep_flat = [_lowest_k(t, kl) for t, kl in zip(flat, _layer_counts(sizes, s, k))]
    masks: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (name, p), kf in zip(weights.items(), keep_flat):
        masks[name] = kf.reshape(p.shape).to(p.device)
    if apply:
        apply_masks(model, masks)
    return masks


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """Zero the weights whose mask is False (in place; +0.0, not -0.0). Returns the model."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, m in masks.items():
            if name not in params:
                raise ValueError(f"apply_masks: mask {name!r} names no parameter of the model")
            p = params[name]
            if tuple(m.shape) != tuple(p.shape):
                raise ValueError(f"apply_masks: mask {name!r} has shape {tuple(m.shape)}, weight has {tuple(p.shape)}")
            p.masked_fill_(~m.to(device=p.device, dtype=torch.bool), 0.0)
    return model


def sparsity_report(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict:
    """Counts over the masked weights: pruned by mask, zero in the model, per layer and overall."""
    params = dict(model.named_parameters())
    layers, total, pruned, zeros = {}, 0, 0, 0
    for name, m in masks.items():
        p = params[name].detach()
        n, k, z = m.numel(), int((~m).sum()), int((p == 0).sum())
        layers[name] = {"numel": n, "pruned": k, "sparsity": k / n, "zeros": z}
        total, pruned, zeros = total + n, pruned + k, zeros + z
    return {"numel": total, "pruned": pruned, "sparsity": pruned / total if total else 0.0, "zeros": zeros,
            "layers": layers}
