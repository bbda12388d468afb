"""Teacher-guided one-shot unstructured pruning (DESIGN.md §3, papers/teacher-guided-oneshot-pruning).

The pipeline, in five calls::

    from s2h import oneshot
    oneshot.distill(student, teacher, train_loader, epochs=10, alpha=0.5, temperature=4.0)
    scores = oneshot.importance(student, teacher, train_loader, alpha=0.5, temperature=4.0, batches=16)
    masks = oneshot.prune(student, scores, sparsity=0.9)           # zeroes the pruned weights
    oneshot.retrain(student, masks, train_loader, epochs=5, teacher=teacher, alpha=0.5)
    oneshot.save_pruned("runs/x/s0.9", student, masks, spec={...})  # state_dict + masks, no pickled modules

Loss. ``L_total = alpha * T² * CA-KLD(student, teacher) + (1 - alpha) * CE(student, y)``. CA-KLD
is the fused ``s2h_kernels.ca_kld``: per-row standardised logits, divided by ``temperature`` T,
``gamma * KL(P_T || P_S) + (1 - gamma) * KL(P_S || P_T)`` with ``gamma`` the teacher's mean top-1
probability (softmax of its raw logits) when not given. This is our reading of the paper, whose
exact formula is unpublished; ``gamma``, ``temperature`` and ``standardize`` are options. The T²
factor (``kd_scale``, Hinton's convention) keeps the KD gradients from shrinking like 1/T²;
``kd_scale=1`` gives the bare ``alpha * CA-KLD + (1 - alpha) * CE``.

Importance. ``I = |theta * dL_total/dtheta|`` for the weight of every prunable layer
(``nn.Conv1d/2d/3d`` and ``nn.Linear``; biases and norm layers are never pruned), computed with the
model in eval mode (BatchNorm uses its running statistics and is not updated) and accumulated over
``batches`` batches: by default the per-batch scores are averaged (``accumulate="abs"``, no
cancellation between batches); ``accumulate="grad"`` averages the gradients first and takes
``|theta * mean_grad|`` once. ``grad-ce`` importance is the same with ``alpha=0``; ``magnitude`` is
``|theta|``.

Pruning. ``round(sparsity * n_prunable)`` weights are removed, exactly: the lowest scores under one
global threshold (``scope="global"``), or per layer (``scope="layer"``: each layer loses
``floor`` or ``ceil`` of ``sparsity * n_layer``, the ceilings going to the largest remainders so
the total is still exact). Ties are broken by position (layer order, then flat index within the
weight; the earlier one is pruned first), so the same scores always give the same mask. The first
conv and the classifier (the last ``nn.Linear``) are excluded by default.

Retraining. The mask is fixed: after every backward pass the pruned weights' gradients are set
to zero, and after every optimizer step the pruned weights are set to zero again (momentum, weight
decay and Adam's moments cannot revive them). Optimizer state for pruned entries is cleared when
retraining starts. ``teacher=None`` retrains with CE only.

Saved form: ``model.pt`` (a plain ``state_dict`` whose pruned weights are 0: the model keeps
ordinary ``nn.Conv2d``/``nn.Linear`` layers, which ``s2h.sparse.sparsify`` converts), ``masks.pt``
(``{param_name: bool tensor}``, True = kept) and ``model.json`` (architecture spec and sparsity),
all loadable with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import argparse
import copy
import fnmatch
import json
import math
import random
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

import s2h_kernels

__all__ = [
    "DEFAULT_EXCLUDE", "IMPORTANCE_METHODS", "PRUNABLE_TYPES",
    "ca_kld", "total_loss", "prunable_weights", "distill", "train", "importance", "magnitude_importance",
    "compute_importance", "prune", "apply_masks", "retrain", "evaluate", "recalibrate_bn", "sparsity_report",
    "save_pruned", "load_pruned", "add_arguments", "main",
]

DEFAULT_EXCLUDE = ("first conv", "classifier")
IMPORTANCE_METHODS = ("magnitude", "grad-ce", "grad-kd")
PRUNABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
FORMAT = "s2h-pruned/1"


# ============================================================================================
# loss


def ca_kld(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0,
           gamma: float | None = None, standardize: bool = True, reduction: str = "batchmean") -> torch.Tensor:
    """Confidence-aware KL distillation loss: the fused ``s2h_kernels.ca_kld`` (no T² factor inside).

    Gradient reaches the student only; the backend follows the device (C++ on CPU, Triton on CUDA).
    """
    return s2h_kernels.ca_kld(student_logits, teacher_logits, temperature=temperature, gamma=gamma,
                              standardize=standardize, reduction=reduction)


def total_loss(student_logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None = None,
               alpha: float = 0.5, temperature: float = 4.0, gamma: float | None = None,
               standardize: bool = True, kd_scale: float | None = None) -> torch.Tensor:
    """``alpha * kd_scale * CA-KLD + (1 - alpha) * CE``; plain CE when there is no teacher or ``alpha == 0``.

    ``kd_scale=None`` is ``temperature ** 2`` (Hinton's convention: the KL's gradients shrink like
    1/T², the factor keeps the two terms balanced whatever T is); the fused op itself has no T².
    """
    ce = F.cross_entropy(student_logits, targets)
    if teacher_logits is None or alpha == 0:
        return ce
    scale = temperature ** 2 if kd_scale is None else kd_scale
    kd = scale * ca_kld(student_logits, teacher_logits, temperature=temperature, gamma=gamma, standardize=standardize)
    if alpha == 1:
        return kd
    return alpha * kd + (1 - alpha) * ce


def _check_alpha_temperature(op: str, alpha: float, temperature: float) -> None:
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"{op}: alpha must be in [0, 1], got {alpha!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{op}: temperature must be a positive number, got {temperature!r}")


# ============================================================================================
# which weights are prunable


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


# ============================================================================================
# training


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _batches(loader, op: str):
    """Yield (x, y) from ``loader``; a clear error when it yields nothing."""
    try:
        n = len(loader)
    except TypeError:
        n = None
    if n == 0:
        raise ValueError(f"{op}: the loader is empty (0 batches); check the dataset and batch size")
    seen = False
    for batch in loader:
        seen = True
        if isinstance(batch, Mapping):
            yield batch["input"], batch["target"]
        else:
            yield batch[0], batch[1]
    if not seen:
        raise ValueError(f"{op}: the loader yielded no batches; check the dataset and batch size")


def _check_outputs(op: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                   targets: torch.Tensor) -> None:
    c = student_logits.shape[-1]
    if teacher_logits is not None and teacher_logits.shape[-1] != c:
        raise ValueError(f"{op}: the teacher has {teacher_logits.shape[-1]} classes but the student has {c}; "
                         "they must predict the same classes")
    if targets.numel() and (int(targets.max()) >= c or int(targets.min()) < 0):
        raise ValueError(f"{op}: labels range over [{int(targets.min())}, {int(targets.max())}] but the model "
                         f"has {c} outputs")


def _make_optimizer(params, name: str, lr: float, momentum: float, weight_decay: float):
    name = name.lower()
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"train: unknown optimizer {name!r}; choose 'sgd' or 'adamw'")


def _tqdm(total: int | None, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not progress, leave=False, dynamic_ncols=True, file=sys.stderr)


def _fit(model: nn.Module, loader, epochs: int, *, teacher: nn.Module | None = None, alpha: float = 0.5,
         temperature: float = 4.0, gamma: float | None = None, standardize: bool = True, kd_scale: float | None = None,
         masks: Mapping[str, torch.Tensor] | None = None, optimizer: torch.optim.Optimizer | None = None,
         optimizer_name: str = "sgd", lr: float = 0.05, momentum: float = 0.9, weight_decay: float = 5e-4,
         scheduler: str = "cosine", device=None, progress: bool = False, desc: str = "train",
         op: str = "train") -> list[dict]:
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"{op}: epochs must be a non-negative int, got {epochs!r}")
    _check_alpha_temperature(op, alpha, temperature)
    if scheduler not in ("cosine", "none"):
        raise ValueError(f"{op}: scheduler must be 'cosine' or 'none', got {scheduler!r}")
    device = torch.device(device) if device is not None else _device_of(model)
    model.to(device)
    if teacher is not None:
        teacher.to(device).eval()
    use_teacher = teacher is not None and alpha > 0

    pairs = []
    if masks is not None:
        params = dict(model.named_parameters())
        for name, m in masks.items():
            if name not in params:
                raise ValueError(f"{op}: mask {name!r} names no parameter of the model")
            p = params[name]
            if m.shape != p.shape:
                raise ValueError(f"{op}: mask {name!r} has shape {tuple(m.shape)}, weight has {tuple(p.shape)}")
            pairs.append((p, ~m.to(device=p.device, dtype=torch.bool)))
    if optimizer is None:
        optimizer = _make_optimizer([p for p in model.parameters() if p.requires_grad], optimizer_name, lr,
                                    momentum, weight_decay)

    def rezero():
        with torch.no_grad():
            for p, pruned in pairs:
                p.masked_fill_(pruned, 0.0)

    rezero()
    # Old optimizer state (momentum, Adam moments) must not push pruned weights either.
    for p, pruned in pairs:
        for v in optimizer.state.get(p, {}).values():
            if isinstance(v, torch.Tensor) and v.shape == p.shape:
                v.masked_fill_(pruned, 0.0)
    if epochs == 0:
        return []
    try:
        steps_per_epoch = len(loader)
    except TypeError:
        steps_per_epoch = None
    sched = None
    if scheduler == "cosine" and steps_per_epoch:
        total = epochs * steps_per_epoch
        sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))

    history = []
    was_training = model.training
    model.train()
    bar = _tqdm(epochs * steps_per_epoch if steps_per_epoch else None, desc, progress)
    checked = False
    try:
        for epoch in range(epochs):
            t0, seen, step = time.perf_counter(), 0, 0
            loss_sum = torch.zeros((), device=device, dtype=torch.float64)  # on device: no sync per step
            correct = torch.zeros((), device=device, dtype=torch.long)
            for x, y in _batches(loader, op):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                out = model(x)
                t_out = None
                if use_teacher:
                    with torch.no_grad():
                        t_out = teacher(x)
                if not checked:
                    _check_outputs(op, out, t_out if t_out is not None else _teacher_peek(teacher, x), y)
                    checked = True
                loss = total_loss(out, y, t_out, alpha, temperature, gamma, standardize, kd_scale)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                for p, pruned in pairs:
                    if p.grad is not None:
                        p.grad.masked_fill_(pruned, 0.0)
                optimizer.step()
                rezero()
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


def _teacher_peek(teacher, x):
    if teacher is None:
        return None
    with torch.no_grad():
        return teacher(x)


def train(model: nn.Module, loader, epochs: int, **kw) -> list[dict]:
    """Plain cross-entropy training (used for the teacher). Keywords as :func:`distill`."""
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
        raise ValueError("distill: teacher is None; use train() for CE-only training")
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
                optimizer=optimizer,
                optimizer_name=optimizer_name, lr=lr, momentum=momentum, weight_decay=weight_decay,
                scheduler=scheduler, device=device, progress=progress,
                desc="retrain+kd" if teacher is not None else "retrain", op="retrain")


@torch.no_grad()
def evaluate(model: nn.Module, loader, device=None, progress: bool = False, desc: str = "eval") -> dict:
    """Top-1 / top-5 accuracy (percent) and mean CE loss over ``loader``, in eval mode."""
    device = torch.device(device) if device is not None else _device_of(model)
    was_training = model.training
    model.eval()
    correct1 = correct5 = seen = 0
    loss_sum = 0.0
    try:
        bar = _tqdm(len(loader) if hasattr(loader, "__len__") else None, desc, progress)
        for x, y in _batches(loader, "evaluate"):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            out = model(x)
            loss_sum += float(F.cross_entropy(out.float(), y, reduction="sum"))
            top = out.topk(min(5, out.shape[-1]), -1).indices
            correct1 += int((top[:, 0] == y).sum())
            correct5 += int((top == y[:, None]).any(-1).sum())
            seen += y.shape[0]
            bar.update(1)
        bar.close()
    finally:
        model.train(was_training)
    return {"top1": 100.0 * correct1 / seen, "top5": 100.0 * correct5 / seen, "loss": loss_sum / seen, "n": seen}


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader, batches: int = 16, device=None) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics on ``batches`` batches (in place).

    Pruning changes the activations, so the dense model's running statistics no longer fit; this
    replaces them by the cumulative average over the given batches. Weights are not changed.
    """
    if not isinstance(batches, int) or batches < 1:
        raise ValueError(f"recalibrate_bn: batches must be a positive int, got {batches!r}")
    device = torch.device(device) if device is not None else _device_of(model)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return model
    saved = [m.momentum for m in bns]
    was_training = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the batches seen
    model.train()
    try:
        for i, (x, _) in enumerate(_batches(loader, "recalibrate_bn")):
            if i >= batches:
                break
            model(x.to(device, non_blocking=True))
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        model.train(was_training)
    return model


# ============================================================================================
# importance


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
    _check_alpha_temperature("importance", alpha, temperature)
    if teacher is None and alpha > 0:
        raise ValueError("importance: alpha > 0 needs a teacher (pass alpha=0 for CE-only importance)")
    if not isinstance(batches, int) or batches < 1:
        raise ValueError(f"importance: batches must be a positive int, got {batches!r}")
    if accumulate not in ("abs", "grad"):
        raise ValueError(f"importance: accumulate must be 'abs' or 'grad', got {accumulate!r}")
    device = torch.device(device) if device is not None else _device_of(student)
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
    bar = _tqdm(batches, "importance", progress)
    try:
        for x, y in _batches(loader, "importance"):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.enable_grad():
                out = student(x)
                t_out = None
                if teacher is not None:
                    with torch.no_grad():
                        t_out = teacher(x)
                if used == 0:
                    _check_outputs("importance", out, t_out, y)
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


# ============================================================================================
# pruning and masks


def _check_sparsity(op: str, sparsity) -> float:
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


def prune(model: nn.Module, scores: Mapping[str, torch.Tensor], sparsity: float,
          exclude: Iterable[str] | None = DEFAULT_EXCLUDE, scope: str = "global",
          apply: bool = True) -> "OrderedDict[str, torch.Tensor]":
    """Keep the highest-scoring weights; return ``{param_name: bool mask}`` (True = kept).

    Exactly ``round(sparsity * n_prunable)`` weights are removed (``n_prunable`` counts the weights
    of the prunable, non-excluded layers). ``scope="global"`` ranks all of them together (one
    threshold); ``scope="layer"`` prunes each layer to (nearly) the same sparsity. Ties are broken
    by position: layer order, then flat index. ``apply=True`` zeroes the pruned weights in place.
    Scores for excluded layers are ignored; a missing or misshapen score is an error.
    """
    s = _check_sparsity("prune", sparsity)
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
        keep_flat = _lowest_k(torch.cat(flat), k).split(sizes)
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
        from .models.small_cnn import build_model

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


# ============================================================================================
# command line: python -m s2h oneshot


def _sparsity_list(text: str) -> list[float]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            v = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not a number") from None
        if not (math.isfinite(v) and 0.0 <= v < 1.0):
            raise argparse.ArgumentTypeError(f"sparsity {part} is outside [0, 1) (use 0.9 for 90%)")
        out.append(v)
    if not out:
        raise argparse.ArgumentTypeError("no sparsity given")
    return out


def _method_list(text: str) -> list[str]:
    out = [m.strip() for m in text.split(",") if m.strip()]
    for m in out:
        if m not in IMPORTANCE_METHODS:
            raise argparse.ArgumentTypeError(f"unknown importance {m!r}; choose from {', '.join(IMPORTANCE_METHODS)}")
    if not out:
        raise argparse.ArgumentTypeError("no importance method given")
    return list(dict.fromkeys(out))


def _exclude_list(text: str) -> tuple[str, ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _alpha(text: str) -> float:
    """A number in [0, 1] (alpha, gamma)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is outside [0, 1]")
    return v


def _positive(text: str) -> float:
    v = float(text)
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"{text} must be a positive number")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``python -m s2h oneshot``."""
    from .data import add_data_arguments

    add_data_arguments(p)
    m = p.add_argument_group("models")
    m.add_argument("--teacher", default=None,
                   help="teacher architecture: small_cnn_teacher (default for digits), resnet50 (default "
                        "otherwise) or any torchvision model name")
    m.add_argument("--student", default=None,
                   help="student architecture: small_cnn_student (default for digits), resnet18 (default otherwise)")
    m.add_argument("--teacher-ckpt", default=None, help="state_dict of a trained teacher (skips teacher training)")
    m.add_argument("--student-ckpt", default=None, help="state_dict to initialise the student from")
    t = p.add_argument_group("training")
    t.add_argument("--teacher-epochs", type=int, default=15, help="CE epochs for the teacher when no --teacher-ckpt")
    t.add_argument("--distill-epochs", type=int, default=15, help="KD epochs for the dense student")
    t.add_argument("--retrain-epochs", type=int, default=10, help="fixed-mask retraining epochs per sparsity")
    t.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    t.add_argument("--lr", type=_positive, default=0.05, help="peak learning rate (cosine schedule)")
    t.add_argument("--retrain-lr", type=_positive, default=None, help="retraining learning rate (default --lr)")
    t.add_argument("--momentum", type=float, default=0.9)
    t.add_argument("--weight-decay", type=float, default=5e-4)
    k = p.add_argument_group("distillation and pruning")
    k.add_argument("--alpha", type=_alpha, default=0.5, help="weight of CA-KLD in alpha*CA-KLD + (1-alpha)*CE")
    k.add_argument("--temperature", type=_positive, default=4.0, help="CA-KLD temperature T")
    k.add_argument("--gamma", type=_alpha, default=None,
                   help="CA-KLD direction mix (default: the teacher's mean top-1 probability per batch)")
    k.add_argument("--no-standardize", action="store_true", help="do not standardise logits per row in CA-KLD")
    k.add_argument("--kd-scale", type=float, default=None,
                   help="factor on CA-KLD in the loss (default T^2, Hinton's convention; 1 for the bare KL)")
    k.add_argument("--sparsity", type=_sparsity_list, default=[0.9],
                   help="fraction of prunable weights removed, or a comma list (0.5,0.75,0.9,0.95,0.98)")
    k.add_argument("--importance", type=_method_list, default=["grad-kd"],
                   help="magnitude | grad-ce | grad-kd, or a comma list to compare them on the same dense student")
    k.add_argument("--importance-batches", type=int, default=16, help="batches the gradient importance averages over")
    k.add_argument("--accumulate", choices=("abs", "grad"), default="abs",
                   help="average per-batch |theta*g| (abs) or the gradients (grad) over the importance batches")
    k.add_argument("--scope", choices=("global", "layer"), default="global", help="one global threshold, or per layer")
    k.add_argument("--exclude", type=_exclude_list, default=DEFAULT_EXCLUDE,
                   help="layers never pruned: comma list of 'first conv', 'classifier', module names or "
                        "patterns (layer4.*); 'none' prunes all (default: 'first conv,classifier')")
    k.add_argument("--no-kd-retrain", action="store_true", help="retrain the pruned student with CE only")
    k.add_argument("--recalibrate-bn", type=int, default=0, metavar="BATCHES",
                   help="also report the pruned student's accuracy before retraining with BatchNorm statistics "
                        "re-estimated on this many training batches (on a copy; retraining is unaffected)")
    o = p.add_argument_group("run")
    o.add_argument("--out", default=None, help="output folder (default runs/oneshot-<data>)")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    o.add_argument("--threads", type=int, default=None, help="torch intra-op CPU threads (default: torch's choice)")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")


class _Log:
    def __init__(self, path: Path | None):
        self.path = path

    def __call__(self, msg: str) -> None:
        from tqdm.auto import tqdm

        tqdm.write(msg, file=sys.stdout)
        sys.stdout.flush()
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(msg + "\n")


def seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _load_state(model: nn.Module, path: str, what: str) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"oneshot: {what} checkpoint {path} does not exist") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"oneshot: the {what} checkpoint {path} does not fit the {what} architecture "
                         f"(different model or class count?): {str(e).splitlines()[-1].strip()}") from None


def main(args: argparse.Namespace) -> dict:
    """Run the one-shot pipeline; returns the summary written to ``<out>/summary.json``."""
    from .data import loaders_from_args
    from .models.small_cnn import build_model

    t_start = time.perf_counter()
    if args.importance_batches < 1:
        raise SystemExit("oneshot: --importance-batches must be positive")
    out = Path(args.out or f"runs/oneshot-{args.data}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "log.txt").write_text("")
    log = _Log(out / "log.txt")
    progress = not args.no_progress
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"oneshot: --device {args.device} asked for, but no CUDA GPU is available")
    seed_everything(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)

    data = loaders_from_args(args)
    info = data.info
    digits = info.name == "digits"
    teacher_arch = args.teacher or ("small_cnn_teacher" if digits else "resnet50")
    student_arch = args.student or ("small_cnn_student" if digits else "resnet18")
    spec = lambda arch: {"arch": arch, "num_classes": info.num_classes, "in_channels": info.in_channels,  # noqa: E731
                         "image_size": info.image_size}
    log(f"oneshot: data={info.name} ({len(data.train.dataset)} train / {len(data.test.dataset)} test, "
        f"{info.num_classes} classes, {info.in_channels}x{info.image_size}x{info.image_size}) device={device} "
        f"teacher={teacher_arch} student={student_arch}")
    opt = dict(optimizer_name=args.optimizer, momentum=args.momentum, weight_decay=args.weight_decay,
               device=device, progress=progress)
    kd = dict(alpha=args.alpha, temperature=args.temperature, gamma=args.gamma, standardize=not args.no_standardize,
              kd_scale=args.kd_scale)

    # ---- teacher
    teacher = build_model(teacher_arch, info.num_classes, info.in_channels, info.image_size).to(device)
    t0 = time.perf_counter()
    if args.teacher_ckpt:
        _load_state(teacher, args.teacher_ckpt, "teacher")
        teacher_hist = []
    else:
        teacher_hist = train(teacher, data.train, args.teacher_epochs, lr=args.lr, desc="teacher", **opt)
        torch.save({k: v.cpu() for k, v in teacher.state_dict().items()}, out / "teacher.pt")
    teacher.eval()
    t_acc = evaluate(teacher, data.test, device)
    summary: dict = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k != "func"},
        "dataset": {"name": info.name, "num_classes": info.num_classes, "in_channels": info.in_channels,
                    "image_size": info.image_size, "train_samples": len(data.train.dataset),
                    "test_samples": len(data.test.dataset)},
        "device": str(device), "torch": torch.__version__,
        "teacher": {"arch": teacher_arch, "params": sum(p.numel() for p in teacher.parameters()),
                    "top1": t_acc["top1"], "epochs": len(teacher_hist), "seconds": time.perf_counter() - t0},
    }
    log(f"teacher {teacher_arch}: top-1 {t_acc['top1']:.2f}%")

    # ---- dense student, distilled
    student = build_model(student_arch, info.num_classes, info.in_channels, info.image_size).to(device)
    if args.student_ckpt:
        _load_state(student, args.student_ckpt, "student")
    _check_same_classes(teacher, student, data.train, device)
    t0 = time.perf_counter()
    if args.alpha > 0:
        hist = distill(student, teacher, data.train, args.distill_epochs, lr=args.lr, **kd, **opt)
    else:
        hist = train(student, data.train, args.distill_epochs, lr=args.lr, desc="student", **opt)
    s_acc = evaluate(student, data.test, device)
    n_prunable = sum(p.numel() for p in prunable_weights(student, args.exclude).values())
    summary["student_dense"] = {"arch": student_arch, "params": sum(p.numel() for p in student.parameters()),
                                "prunable_weights": n_prunable, "top1": s_acc["top1"], "epochs": len(hist),
                                "seconds": time.perf_counter() - t0}
    torch.save({k: v.cpu() for k, v in student.state_dict().items()}, out / "student_dense.pt")
    (out / "student_dense.json").write_text(json.dumps({"spec": spec(student_arch)}, indent=2) + "\n")
    log(f"dense student {student_arch}: top-1 {s_acc['top1']:.2f}% ({n_prunable} prunable weights)")
    dense_state = {k: v.detach().clone() for k, v in student.state_dict().items()}

    # ---- importance, prune, retrain
    runs = []
    retrain_teacher = None if args.no_kd_retrain else teacher
    for method in args.importance:
        t0 = time.perf_counter()
        # Importance batches drawn by their own seeded generator, anew per method: every method sees
        # the same batches, and the same dense student gets the same scores whatever ran before
        # (teacher training, distillation or a checkpoint instead, other methods).
        score_loader = torch.utils.data.DataLoader(
            data.train.dataset, batch_size=data.train.batch_size, shuffle=True, num_workers=data.train.num_workers,
            generator=torch.Generator().manual_seed(args.seed + 1), pin_memory=data.train.pin_memory)
        student.load_state_dict(dense_state)
        scores = compute_importance(method, student, teacher, score_loader, alpha=args.alpha,
                                    temperature=args.temperature, batches=args.importance_batches,
                                    exclude=args.exclude, **({} if method == "magnitude" else dict(
                                        gamma=args.gamma, standardize=not args.no_standardize, kd_scale=args.kd_scale,
                                        accumulate=args.accumulate, device=device, progress=progress)))
        score_seconds = time.perf_counter() - t0
        for s in args.sparsity:
            t0 = time.perf_counter()
            student.load_state_dict(dense_state)
            masks = prune(student, scores, s, exclude=args.exclude, scope=args.scope)
            before = evaluate(student, data.test, device)
            before_bn = None
            if args.recalibrate_bn > 0:
                before_bn = evaluate(recalibrate_bn(copy.deepcopy(student), data.train, args.recalibrate_bn, device),
                                     data.test, device)
            hist = retrain(student, masks, data.train, args.retrain_epochs, teacher=retrain_teacher, lr=args.retrain_lr or args.lr,
                           **kd, **opt)
            after = evaluate(student, data.test, device)
            rep = sparsity_report(student, masks)
            rel = Path(method) / f"sparsity_{s:g}"
            save_pruned(out / rel, student, masks, spec=spec(student_arch),
                        extra={"importance": method, "top1": after["top1"]})
            run = {"importance": method, "sparsity": s, "pruned": rep["pruned"], "prunable": rep["numel"],
                   "actual_sparsity": rep["sparsity"], "top1_pruned": before["top1"], "top1_retrained": after["top1"],
                   "retrain_kd": retrain_teacher is not None, "retrain_epochs": len(hist),
                   "importance_seconds": score_seconds, "seconds": time.perf_counter() - t0, "path": str(rel),
                   "layers": {k: v["sparsity"] for k, v in rep["layers"].items()}}
            bn_note = ""
            if before_bn is not None:
                run["top1_pruned_bn_recalibrated"] = before_bn["top1"]
                bn_note = f" ({before_bn['top1']:.2f}% with BN recalibrated)"
            runs.append(run)
            log(f"{method:>9s} sparsity {s:.2%}: pruned {rep['pruned']}/{rep['numel']} -> top-1 {before['top1']:.2f}% "
                f"before retraining{bn_note}, {after['top1']:.2f}% after {'KD ' if run['retrain_kd'] else ''}retraining")
    summary["runs"] = runs
    summary["seconds_total"] = time.perf_counter() - t_start
    if len(args.sparsity) > 1:
        from .plots import plot_accuracy_vs_sparsity

        plot_accuracy_vs_sparsity(runs, out / "accuracy_vs_sparsity.png", teacher=t_acc["top1"], dense=s_acc["top1"],
                                  title=f"{student_arch} on {info.name} (teacher {teacher_arch})")
        summary["plot"] = "accuracy_vs_sparsity.png"
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"wrote {out / 'summary.json'} ({summary['seconds_total']:.1f} s)")
    return summary


def _check_same_classes(teacher: nn.Module, student: nn.Module, loader, device) -> None:
    x, _ = next(iter(_batches(loader, "oneshot")))
    x = x[:2].to(device)
    with torch.no_grad():
        was_t, was_s = teacher.training, student.training
        teacher.eval(), student.eval()
        ct, cs = teacher(x).shape[-1], student(x).shape[-1]
        teacher.train(was_t), student.train(was_s)
    if ct != cs:
        raise ValueError(f"oneshot: the teacher has {ct} classes but the student has {cs}")

