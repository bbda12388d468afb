"""Weight importance: ``|theta * dL_total/dtheta|`` (teacher-guided), CE-only, or magnitude (docs/DESIGN.md §3).

Importance. ``I = |theta * dL_total/dtheta|`` for the weight of every prunable layer
(``nn.Conv1d/2d/3d`` and ``nn.Linear``; biases and norm layers are never pruned), computed with the
model in eval mode (BatchNorm uses its running statistics and is not updated) and accumulated over
``batches`` batches: by default the per-batch scores are averaged (``accumulate="abs"``, no
cancellation between batches); ``accumulate="grad"`` averages the gradients first and takes
``|theta * mean_grad|`` once. ``grad-ce`` importance is the same with ``alpha=0``; ``magnitude`` is
``|theta|``.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..engine.batches import iterate_batches, module_device, progress_bar
from .loss import check_alpha_temperature, check_outputs, total_loss
from .pruning import DEFAULT_EXCLUDE, prunable_weights

__all__ = ["IMPORTANCE_METHODS", "importance", "magnitude_importance", "compute_importance"]

IMPORTANCE_METHODS = ("magnitude", "grad-ce", "grad-kd")


def magnitude_importance(model: nn.Module, exclude: Iterable[str] | None = DEFAULT_EXCLUDE) -> dict[str, torch.Tensor]:
    """``|theta|`` for every prunable weight."""
    return {n: p.detach().abs().clone() for n, p in prunable_weights(model, exclude).items()}


def importance(student: nn.Module, teacher: nn.Module | None, loader, alpha: float = 0.5,
               temperature: float = 4.0, batches: int = 16, gamma: float | None = None, *,
               standardize: bool = True, kd_scale: float | None = None,
               exclude: Iterable[str] | None = DEFAULT_EXCLUDE,
               accumulate: str = "abs", device=None, progress: bool = False) -> dict[str, torch.Tensor]:
    """``|theta * dL_total/dtheta|`` per prunable weight over the first ``batches`` batches.

    ``L_total = alpha * CA-KLD + (1 - alpha) * CE``; ``teacher=None`` with ``alpha=0`` gives the
    CE-only (``grad-ce``) importance. ``accumulate="abs"`` averages the per-batch scores,
    ``"grad"`` averages the gradients and scores once. The model is scored in eval mode and left
    unchanged (its ``.grad`` fields are not touched). Fewer batches are used if the loader is shorter.
    """
    check_alpha_temperature("importance", alpha, temperature)
    if teacher is None and alpha > 0:
        raise ValueError("importance: alpha > 0 needs a teacher (pass alpha=0 for CE-only importance)")
    if not isinstance(batches, int) or batches < 1:
        raise ValueError(f"importance: batches must be a positive int, got {batches!r}")
    if accumulate not in ("abs", "grad"):
        raise ValueError(f"importance: accumulate must be 'abs' or 'grad', got {accumulate!r}")
    device = torch.device(device) if device is not None else module_device(student)
    student.to(device)
    if teacher is not None:
        teacher.to(device).eval()
    weights = prunable_weights(student, exclude)
    if not weights:
        raise ValueError("importance: the model has no prunable weights (nn.Conv*d / nn.Linear) left after exclude")
    names, params = list(weights), list(weights.values())
    acc = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    was_training = student.training
    student.eval()
    used = 0
    bar = progress_bar(batches, "importance", progress)
    try:
        for x, y in iterate_batches(loader, "importance"):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.enable_grad():
                out = student(x)
                t_out = None
                if teacher is not None:
                    with torch.no_grad():
                        t_out = teacher(x)
                if used == 0:
                    check_outputs("importance", out, t_out, y)
                loss = total_loss(out, y, t_out if alpha > 0 else None, alpha, temperature, gamma, standardize,
                                  kd_scale)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            for a, p, g in zip(acc, params, grads):
                if g is None:
                    continue
                if accumulate == "abs":
                    a.add_((p.detach() * g).abs().float())
                else:
                    a.add_(g.float())
            used += 1
            bar.update(1)
            if used >= batches:
                break
    finally:
        bar.close()
        student.train(was_training)
    if accumulate == "grad":
        return {n: (p.detach().float() * a / used).abs() for n, p, a in zip(names, params, acc)}
    return {n: a / used for n, a in zip(names, acc)}


def compute_importance(method: str, student: nn.Module, teacher: nn.Module | None, loader, *, alpha: float = 0.5,
                       temperature: float = 4.0, batches: int = 16, **kw) -> dict[str, torch.Tensor]:
    """Scores by name: ``magnitude`` (|theta|), ``grad-ce`` (alpha=0) or ``grad-kd`` (teacher-guided)."""
    exclude = kw.get("exclude", DEFAULT_EXCLUDE)
    if method == "magnitude":
        return magnitude_importance(student, exclude)
    if method == "grad-ce":
        return importance(student, None, loader, 0.0, temperature, batches, **kw)
    if method == "grad-kd":
        if teacher is None:
            raise ValueError("compute_importance: grad-kd needs a teacher")
        return importance(student, teacher, loader, alpha, temperature, batches, **kw)
    raise ValueError(f"compute_importance: unknown method {method!r}; choose one of {IMPORTANCE_METHODS}")
