"""Training around the one-shot pruning: the teacher (CE), the distilled dense student, the
fixed-mask retraining of the pruned student (docs/DESIGN.md §3).

Retraining keeps the mask fixed: after every backward pass the pruned weights' gradients are set
to zero, and after every optimizer step the pruned weights are set to zero again (momentum, weight
decay and Adam's moments cannot revive them). Optimizer state for pruned entries is cleared when
retraining starts. ``teacher=None`` retrains with CE only.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..engine.batches import module_device
from ..engine.fitting import SCHEDULERS, fit, make_optimizer
from .loss import check_alpha_temperature, check_outputs, total_loss

__all__ = ["train_cross_entropy", "distill", "retrain"]


def _mask_pairs(model: nn.Module, masks: Mapping[str, torch.Tensor] | None, op: str) -> list:
    """(parameter, pruned-entries bool tensor) per mask, checked against the model."""
    pairs = []
    if masks is None:
        return pairs
    params = dict(model.named_parameters())
    for name, m in masks.items():
        if name not in params:
            raise ValueError(f"{op}: mask {name!r} names no parameter of the model")
        p = params[name]
        if m.shape != p.shape:
            raise ValueError(f"{op}: mask {name!r} has shape {tuple(m.shape)}, weight has {tuple(p.shape)}")
        pairs.append((p, ~m.to(device=p.device, dtype=torch.bool)))
    return pairs


def _fit(model: nn.Module, loader, epochs: int, *, teacher: nn.Module | None = None, alpha: float = 0.5,
         temperature: float = 4.0, gamma: float | None = None, standardize: bool = True, kd_scale: float | None = None,
         masks: Mapping[str, torch.Tensor] | None = None, optimizer: torch.optim.Optimizer | None = None,
         optimizer_name: str = "sgd", lr: float = 0.05, momentum: float = 0.9, weight_decay: float = 5e-4,
         scheduler: str = "cosine", device=None, progress: bool = False, desc: str = "train",
         op: str = "train") -> list[dict]:
    """s2h.engine.fitting.fit with the KD loss and a fixed mask."""
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"{op}: epochs must be a non-negative int, got {epochs!r}")
    check_alpha_temperature(op, alpha, temperature)
    if scheduler not in SCHEDULERS:
        raise ValueError(f"{op}: scheduler must be 'cosine' or 'none', got {scheduler!r}")
    device = torch.device(device) if device is not None else module_device(model)
    model.to(device)
    if teacher is not None:
        teacher.to(device).eval()
    use_teacher = teacher is not None and alpha > 0
    pairs = _mask_pairs(model, masks, op)
    if optimizer is None:
        optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], optimizer_name, lr,
                                   momentum, weight_decay)

    def rezero():
        with torch.no_grad():
            for p, pruned in pairs:
                p.masked_fill_(pruned, 0.0)

    def mask_grads():
        for p, pruned in pairs:
            if p.grad is not None:
                p.grad.masked_fill_(pruned, 0.0)

    rezero()
    # Old optimizer state (momentum, Adam moments) must not push pruned weights either.
    for p, pruned in pairs:
        for v in optimizer.state.get(p, {}).values():
            if isinstance(v, torch.Tensor) and v.shape == p.shape:
                v.masked_fill_(pruned, 0.0)
    checked = []

    def loss_fn(out, x, y):
        t_out = None
        if use_teacher:
            with torch.no_grad():
                t_out = teacher(x)
        if not checked:
            check_outputs(op, out, t_out if t_out is not None else _teacher_peek(teacher, x), y)
            checked.append(True)
        return total_loss(out, y, t_out, alpha, temperature, gamma, standardize, kd_scale)

    return fit(model, loader, epochs, loss_fn, optimizer, scheduler=scheduler, device=device, progress=progress,
               desc=desc, op=op, after_backward=mask_grads if pairs else None, after_step=rezero)


def _teacher_peek(teacher, x):
    if teacher is None:
        return None
    with torch.no_grad():
        return teacher(x)


def train_cross_entropy(model: nn.Module, loader, epochs: int, **kw) -> list[dict]:
    """Plain cross-entropy training (the teacher, or a student without KD). Keywords as :func:`distill`."""
    return _fit(model, loader, epochs, op="train", desc=kw.pop("desc", "train"), **kw)


def distill(student: nn.Module, teacher: nn.Module, loader, epochs: int, alpha: float = 0.5,
            temperature: float = 4.0, gamma: float | None = None, *, standardize: bool = True,
            kd_scale: float | None = None,
            optimizer: torch.optim.Optimizer | None = None, optimizer_name: str = "sgd", lr: float = 0.05,
            momentum: float = 0.9, weight_decay: float = 5e-4, scheduler: str = "cosine", device=None,
            progress: bool = False) -> list[dict]:
    """Fine-tune the dense ``student`` with ``alpha * CA-KLD(student, teacher) + (1 - alpha) * CE``.

    The teacher stays in eval mode and gets no gradient. Returns one dict per epoch (loss, train
    top-1, seconds). Default optimiser: SGD (Nesterov momentum 0.9, weight decay 5e-4) with a cosine
    schedule over all steps; pass ``optimizer=`` to use your own.
    """
    if teacher is None:
        raise ValueError("distill: teacher is None; use train_cross_entropy() for CE-only training")
    return _fit(student, loader, epochs, teacher=teacher, alpha=alpha, temperature=temperature, gamma=gamma,
                standardize=standardize, kd_scale=kd_scale, optimizer=optimizer, optimizer_name=optimizer_name, lr=lr,
                momentum=momentum, weight_decay=weight_decay, scheduler=scheduler, device=device,
                progress=progress, desc="distill", op="distill")


def retrain(model: nn.Module, masks: Mapping[str, torch.Tensor], loader, epochs: int,
            teacher: nn.Module | None = None, alpha: float = 0.5, temperature: float = 4.0,
            gamma: float | None = None, *, standardize: bool = True, kd_scale: float | None = None,
            optimizer: torch.optim.Optimizer | None = None, optimizer_name: str = "sgd", lr: float = 0.05,
            momentum: float = 0.9, weight_decay: float = 5e-4, scheduler: str = "cosine", device=None,
            progress: bool = False) -> list[dict]:
    """Retrain a pruned model with its mask fixed; KD from ``teacher`` unless it is None (then CE only).

    Pruned weights (mask False) get zero gradient after every backward pass and are set back to 0
    after every optimizer step; matching optimizer state (momentum buffers, Adam moments) is cleared
    for them at the start. So they are exactly 0 when this returns, whatever the optimizer.
    """
    if masks is None or not len(masks):
        raise ValueError("retrain: masks is empty; prune() the model first")
    return _fit(model, loader, epochs, teacher=teacher, alpha=alpha if teacher is not None else 0.0,
                temperature=temperature, gamma=gamma, standardize=standardize, kd_scale=kd_scale, masks=masks,
                optimizer=optimizer, optimizer_name=optimizer_name, lr=lr, momentum=momentum,
                weight_decay=weight_decay, scheduler=scheduler, device=device, progress=progress,
                desc="retrain+kd" if teacher is not None else "retrain", op="retrain")
