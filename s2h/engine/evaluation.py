"""Evaluation and BatchNorm recalibration, for plain models and for the branches of an S2HModel."""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .batches import iterate_batches, module_device, progress_bar

__all__ = ["evaluate", "recalibrate_bn"]


class _Tally:
    """Top-1, top-5 and summed CE of one output stream."""

    def __init__(self):
        self.top1 = self.top5 = 0
        self.loss = 0.0

    def add(self, out: torch.Tensor, y: torch.Tensor) -> None:
        self.loss += float(F.cross_entropy(out.float(), y, reduction="sum"))
        self.top1 += int((out.argmax(-1) == y).sum())
        top = out.topk(min(5, out.shape[-1]), -1).indices
        self.top5 += int((top == y[:, None]).any(-1).sum())


def _branch_context(model, name: str | None):
    return contextlib.nullcontext() if name is None else model.branch(name)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device=None, branches: Sequence[str] | None = None,
             progress: bool = False, desc: str = "eval") -> dict:
    """Accuracy over ``loader`` in eval mode (the model's mode is restored).

    ``branches=None``: the model as it is: ``top1``, ``top5`` (percent), ``loss`` (mean CE), ``n``.
    ``branches=("soft", "hard")`` (an S2HModel): the same per branch (``soft_top1``, ``hard_loss``,
    ...) and the soft→hard gap per sample, ``gap_kl`` = KL(soft || hard) and ``gap_js``.
    """
    device = torch.device(device) if device is not None else module_device(model)
    names = list(branches) if branches is not None else [None]
    tallies = {b: _Tally() for b in names}
    gap = {"kl": 0.0, "js": 0.0}
    seen = 0
    was_training = model.training
    model.eval()
    bar = progress_bar(len(loader) if hasattr(loader, "__len__") else None, desc, progress)
    try:
        for x, y in iterate_batches(loader, "evaluate"):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            outs = {}
            for b in names:
                with _branch_context(model, b):
                    outs[b] = model(x)
                tallies[b].add(outs[b], y)
            if "soft" in outs and "hard" in outs:
                _add_gap(gap, outs["soft"].float(), outs["hard"].float())
            seen += y.shape[0]
            bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
    res = {}
    for b, t in tallies.items():
        pre = "" if b is None else f"{b}_"
        res.update({f"{pre}top1": 100.0 * t.top1 / seen, f"{pre}top5": 100.0 * t.top5 / seen,
                    f"{pre}loss": t.loss / seen})
    if "soft" in tallies and "hard" in tallies:
        res["gap_kl"], res["gap_js"] = gap["kl"] / seen, gap["js"] / seen
    res["n"] = seen
    return res


def _add_gap(gap: dict, soft: torch.Tensor, hard: torch.Tensor) -> None:
    lp, lq = F.log_softmax(soft, 1), F.log_softmax(hard, 1)
    p, q = lp.exp(), lq.exp()
    gap["kl"] += float((p * (lp - lq)).sum())
    lm = torch.log((p + q) / 2).clamp_min(-1e30)
    gap["js"] += float(0.5 * (p * (lp - lm)).sum() + 0.5 * (q * (lq - lm)).sum())


def _statistics(m: nn.Module, branch: str | None):
    if branch is not None and hasattr(m, "statistics"):  # an S2H BatchNorm: that branch's buffers
        return m.statistics(branch)
    return m.running_mean, m.running_var, m.num_batches_tracked


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader, batches: int = 16, device=None, branch: str | None = None) -> int:
    """Re-estimate BatchNorm running statistics on ``batches`` batches, in place; returns the batches used.

    The statistics are reset and replaced by the cumulative average over the batches (train-mode
    forwards under no_grad; weights are not changed). ``branch`` (an S2HModel): re-estimate that
    branch's statistics, running the model in that branch. Pruning changes the activations, so
    the dense statistics no longer fit the pruned network.
    """
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise ValueError(f"recalibrate_bn: batches must be a positive int, got {batches!r}")
    device = torch.device(device) if device is not None else module_device(model)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    saved = [m.momentum for m in bns]
    for m in bns:
        rm, rv, nbt = _statistics(m, branch)
        rm.zero_()
        rv.fill_(1.0)
        nbt.zero_()
        m.momentum = None  # cumulative moving average over the batches seen
    was_training = model.training
    model.train()
    used = 0
    try:
        for x, _ in iterate_batches(loader, "recalibrate_bn"):
            if used >= batches:
                break
            with _branch_context(model, branch):
                model(x.to(device, non_blocking=True))
            used += 1
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        model.train(was_training)
    return used
