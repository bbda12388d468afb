"""The supervised fit loop (optimizer, per-step cosine schedule, progress, per-epoch history)."""
from __future__ import annotations

import math
import time
from typing import Callable

import torch
from torch import nn

from .batches import iterate_batches, progress_bar

__all__ = ["fit", "make_optimizer", "SCHEDULERS"]

SCHEDULERS = ("cosine", "none")


def make_optimizer(params, name: str, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    """SGD (Nesterov when momentum > 0) or AdamW."""
    name = name.lower()
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"train: unknown optimizer {name!r}; choose 'sgd' or 'adamw'")


def _cosine(optimizer, total: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))


def fit(model: nn.Module, loader, epochs: int, loss_fn: Callable, optimizer: torch.optim.Optimizer, *,
        scheduler: str = "cosine", device: torch.device, progress: bool = False, desc: str = "train",
        op: str = "train", after_backward: Callable[[], None] | None = None,
        after_step: Callable[[], None] | None = None) -> list[dict]:
    """Train ``model`` for ``epochs`` epochs: per batch ``loss_fn(out, x, y)``, backward,
    ``after_backward()``, optimizer step, ``after_step()``, scheduler step.

    ``scheduler="cosine"``: the learning rate follows a cosine from its value to 0 over all steps
    (when the loader has a length). Returns one dict per epoch: ``loss``, ``train_top1``, ``seconds``.
    The model's train/eval mode is restored.
    """
    if scheduler not in SCHEDULERS:
        raise ValueError(f"{op}: scheduler must be 'cosine' or 'none', got {scheduler!r}")
    if epochs == 0:
        return []
    try:
        steps_per_epoch = len(loader)
    except TypeError:
        steps_per_epoch = None
    sched = _cosine(optimizer, epochs * steps_per_epoch) if scheduler == "cosine" and steps_per_epoch else None
    history = []
    was_training = model.training
    model.train()
    bar = progress_bar(epochs * steps_per_epoch if steps_per_epoch else None, desc, progress)
    try:
        for epoch in range(epochs):
            t0, seen, step = time.perf_counter(), 0, 0
            loss_sum = torch.zeros((), device=device, dtype=torch.float64)  # on device: no sync per step
            correct = torch.zeros((), device=device, dtype=torch.long)
            for x, y in iterate_batches(loader, op):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                out = model(x)
                loss = loss_fn(out, x, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if after_backward is not None:
                    after_backward()
                optimizer.step()
                if after_step is not None:
                    after_step()
                if sched is not None:
                    sched.step()
                n = y.shape[0]
                loss_sum += loss.detach().double() * n
                correct += (out.detach().argmax(-1) == y).sum()
                seen, step = seen + n, step + 1
                bar.update(1)
                if progress and (step % 10 == 0 or step == steps_per_epoch):
                    bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss_sum) / seen:.4f}",
                                    acc=f"{100 * int(correct) / seen:.1f}")
            history.append({"epoch": epoch + 1, "loss": float(loss_sum) / max(seen, 1),
                            "train_top1": 100 * int(correct) / max(seen, 1), "seconds": time.perf_counter() - t0})
    finally:
        bar.close()
        model.train(was_training)
    return history
