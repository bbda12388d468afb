"""``python -m s2h prune``: the S2HPruner training job (one stage: train and prune to a FLOPs budget).

::

    python -m s2h prune --model resnet56 --data cifar100 --data-dir ~/data --target-flops 0.15 \\
        --epochs 300 --batch-size 64 --lr 0.05 --out runs/r56-c100
    python -m s2h prune --preset cifar100-resnet50 --data-dir ~/data --out runs/paper   # Appendix A
    python -m s2h prune ... --resume                      # continue runs/.../checkpoint.pt
    torchrun --nproc_per_node=4 -m s2h prune ...          # DistributedDataParallel

Each epoch: a progress bar; one line of ``log.jsonl`` (soft and hard top-1, hard/soft FLOPs %,
the soft-hard gap as KL and JS on the test split, LR, wall time, keep counts); ``checkpoint.pt``
written atomically (model incl. masks and per-branch BN statistics, both optimizers, the LR
scheduler, the step counter, RNG states, the log so far). ``--resume`` continues so that the run
ends bit-identical to an uninterrupted one: every epoch draws its data order and its augmentation
RNG from ``(seed, epoch)`` alone. At the end: ``pruned.pt`` (the exported hard model, ``s2h.load``
rebuilds it from the architecture and the saved widths), ``s2h_model.pt``, ``trajectory.png``
(hard FLOPs and top-1 per epoch, the paper's Fig. 3), ``architecture.png`` (retained vs total
channels per group, Fig. 4) and ``summary.json``.

``--batch-size`` is the global batch: under torchrun each of N processes takes B/N samples of every
batch, so N processes see the same batches as one process would (the masks' gradients are averaged
before the balancing, so u and its optimizer state are identical on every rank).

A NaN/inf loss stops the run with a message naming the step; the last checkpoint (the end of the
last complete epoch) is kept. Bad input gets a clear error: labels outside [0, classes), a batch of
one with BatchNorm, ``--target-flops`` outside (0, 1], a dataset missing from ``--data-dir`` (the
message says where to put it; nothing is downloaded unless ``--download`` is given).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PRESETS", "PruneConfig", "add_arguments", "main", "run", "evaluate", "recalibrate_bn",
           "build_model", "tune_cpu_allocator", "TrainingStopped"]

# ------------------------------------------------------------------------------------------------ presets

#: The paper's training settings (Appendix A). ``batch_size`` is global (ImageNet: 512 over 4 GPUs).
#: ViT/Swin (A1, A4): AdamW, lr 3e-3 / 1e-3, wd 0.05, 10 warm-up epochs, θ coefficients 1 and 1.
PRESETS: dict[str, dict[str, Any]] = {
    "cifar100-resnet50": dict(data="cifar100", model="resnet50", epochs=500, batch_size=64, lr=0.05,
                              weight_decay=3e-4, scheduler="cosine"),
    "cifar100-mbv3": dict(data="cifar100", model="mobilenet_v3_large", epochs=500, batch_size=64, lr=0.05,
                          weight_decay=3e-4, scheduler="cosine"),
    "cifar100-wrn28-10": dict(data="cifar100", model="wrn28_10", epochs=200, batch_size=128, lr=0.1,
                              weight_decay=5e-4, scheduler="cosine"),
    "tiny-imagenet-resnet50": dict(data="tiny-imagenet", model="resnet50", epochs=500, batch_size=64, lr=0.1,
                                   weight_decay=3e-4, scheduler="step", milestones=(250, 375)),
    "tiny-imagenet-mbv3": dict(data="tiny-imagenet", model="mobilenet_v3_large", epochs=500, batch_size=64,
                               lr=0.1, weight_decay=3e-4, scheduler="step", milestones=(250, 375)),
    "tiny-imagenet-wrn28-10": dict(data="tiny-imagenet", model="wrn28_10", epochs=200, batch_size=128, lr=0.2,
                                   weight_decay=1e-4, scheduler="step", milestones=(100, 150)),
    "imagenet-resnet50": dict(data="imagefolder", model="resnet50", epochs=200, batch_size=512, lr=0.2,
                              weight_decay=1e-4, scheduler="cosine", image_size=224, num_workers=8),
    "cifar100-vit": dict(data="cifar100", model="vit_cifar", epochs=200, batch_size=128, optimizer="adamw", lr=3e-3,
                         weight_decay=0.05, scheduler="cosine", warmup_epochs=10, ce_coef=1.0, gap_coef=1.0),
    "cifar100-swin": dict(data="cifar100", model="swin_cifar", epochs=200, batch_size=128, optimizer="adamw", lr=1e-3,
                          weight_decay=0.05, scheduler="cosine", warmup_epochs=10, ce_coef=1.0, gap_coef=1.0),
    # not from the paper: the CIFAR ResNet-56 used by this package's benchmarks
    "cifar100-resnet56": dict(data="cifar100", model="resnet56", epochs=300, batch_size=64, lr=0.05,
                              weight_decay=3e-4, scheduler="cosine"),
}

CIFAR_RESNET_DEPTHS = (20, 32, 44, 56, 110)


@dataclass
class PruneConfig:
    """Every setting of a prune run (``summary.json`` and the checkpoint record it)."""

    out: str = "runs/prune"
    model: str = "resnet56"
    data: str = "digits"
    data_dir: str | None = None
    download: bool = False
    image_size: int | None = None
    num_classes: int | None = None
    augment: bool = True
    max_train_samples: int | None = None
    max_test_samples: int | None = None
    num_workers: int = 0
    target_flops: float = 0.15
    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 3e-4
    scheduler: str = "cosine"
    milestones: Sequence[int] = ()
    lr_gamma: float = 0.1
    warmup_epochs: float = 0.0
    mask_optimizer: str = "adam"
    mask_lr: float = 0.02
    ce_coef: float = 0.5
    gap_coef: float = 5.0
    resource_coef: float = 5.0
    resource_target: str = "soft"
    temperature: float = 1.0
    balance: str = "paper"
    ablate: Sequence[str] = ()
    enable: Sequence[str] = ()
    divisor: int = 1
    hard_width: str = "threshold"
    mask_temperature: float = 1.0
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    eval_every: int = 1
    recalibrate_bn: int = 0
    progress: bool = True
    deterministic: bool = False
    preset: str | None = None
    stop_after: int | None = None
    latency: bool = False
    quiet: bool = False
    widths: Sequence[int] | None = None  # CIFAR ResNet stage widths (default 16, 32, 64)
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        if not (isinstance(self.target_flops, (int, float)) and 0.0 < float(self.target_flops) <= 1.0):
            raise ValueError(f"prune: --target-flops must be a fraction in (0, 1], got {self.target_flops}")
        if self.epochs < 0:
            raise ValueError(f"prune: --epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"prune: --batch-size must be positive, got {self.batch_size}")
        if self.scheduler not in ("cosine", "step", "constant"):
            raise ValueError(f"prune: --scheduler must be cosine, step or constant, got {self.scheduler!r}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"prune: --optimizer must be sgd or adamw, got {self.optimizer!r}")
        if self.mask_optimizer not in ("sgd", "adam"):
            raise ValueError(f"prune: --mask-optimizer must be sgd or adam, got {self.mask_optimizer!r}")
        if self.lr <= 0 or self.mask_lr < 0:
            raise ValueError("prune: --lr must be > 0 and --mask-lr >= 0")
        if self.eval_every < 1:
            raise ValueError(f"prune: --eval-every must be >= 1, got {self.eval_every}")


# ------------------------------------------------------------------------------------------------ helpers


class TrainingStopped(RuntimeError):
    """Training stopped early (non-finite loss); ``checkpoint`` is the last good checkpoint or None."""

    def __init__(self, message: str, step: int, checkpoint: str | None):
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint


def tune_cpu_allocator() -> bool:
    """Keep freed heap memory in the process (glibc ``mallopt``): returns True if applied.

    The S2H step frees and re-allocates a few hundred MB per step (two graphs, two backward passes);
    glibc trims that back to the OS and page-faults it in again on the next step — about 15% of a
    ResNet-56 step on the CPU. Raising M_TRIM_THRESHOLD and M_MMAP_THRESHOLD stops it (the process
    keeps its peak heap, as it would with jemalloc/tcmalloc). No effect on other platforms.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 28))
    except (OSError, AttributeError):  # not glibc
        return False


def build_model(name: str, num_classes: int, in_channels: int = 3, image_size: int | None = None,
                widths: Sequence[int] | None = None) -> nn.Module:
    """``resnet20/32/44/56/110`` (CIFAR ResNets, :mod:`s2h.models.cifar`) or :func:`s2h.models.build_model`."""
    from .models.cifar import CifarResNet

    key = name.lower()
    if key.startswith("resnet") and key[6:].isdigit() and (int(key[6:]) in CIFAR_RESNET_DEPTHS or
                                                           (int(key[6:]) < 18 and (int(key[6:]) - 2) % 6 == 0)):
        net = CifarResNet(int(key[6:]), num_classes, widths=tuple(widths) if widths else (16, 32, 64))
        if in_channels != 3:
            old = net.conv1
            net.conv1 = nn.Conv2d(in_channels, old.out_channels, 3, 1, 1, bias=False)
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        return net
    from .models import build_model as _build

    return _build(name, num_classes, in_channels, image_size)


def _dist():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _init_distributed(device_pref: str) -> tuple[int, int, torch.device]:
    """Initialise torch.distributed under torchrun (WORLD_SIZE > 1); pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if device_pref not in ("auto", "cpu", "cuda") and not device_pref.startswith("cuda:"):
        raise ValueError(f"prune: --device must be auto, cpu or cuda, got {device_pref!r}")
    if device_pref.startswith("cuda:"):
        device = torch.device(device_pref)
    elif use_cuda:
        device = torch.device("cuda", local if world > 1 else 0)
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = _dist()
    return rank, world, device


def _barrier():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """The RNGs an epoch uses (augmentation, dropout) depend only on (seed, epoch, rank)."""
    s = (seed * 1_000_003 + epoch * 7919 + rank * 104_729) % 2**63
    random.seed(s)
    try:
        import numpy as np

        np.random.seed(s % 2**32)
    except ImportError:  # pragma: no cover
        pass
    torch.manual_seed(s)


def _rng_state() -> dict:
    import numpy as np

    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    import numpy as np

    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class _LRSchedule:
    """Per-iteration LR factor: linear warm-up, then cosine to 0, step decay, or constant."""

    def __init__(self, kind: str, total_steps: int, steps_per_epoch: int, warmup_steps: int,
                 milestones: Sequence[int], gamma: float):
        self.kind, self.total, self.per_epoch = kind, max(1, total_steps), max(1, steps_per_epoch)
        self.warmup, self.milestones, self.gamma = warmup_steps, tuple(milestones), gamma

    def __call__(self, it: int) -> float:
        if it < self.warmup:
            return (it + 1) / self.warmup
        if self.kind == "cosine":
            t = (it - self.warmup) / max(1, self.total - self.warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
        if self.kind == "step":
            epoch = it // self.per_epoch
            return self.gamma ** sum(epoch >= m for m in self.milestones)
        return 1.0


# ------------------------------------------------------------------------------------------------ data


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, ds, idx):
        self.ds, self.idx = ds, list(idx)
        self.classes = getattr(ds, "classes", None)

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, i):
        return self.ds[self.idx[i]]


def _subset(ds, k: int | None, seed: int):
    if k is None or k >= len(ds):
        return ds
    if k < 1:
        raise ValueError(f"prune: a sample limit must be positive, got {k}")
    g = torch.Generator().manual_seed(seed)
    return _Indexed(ds, torch.sort(torch.randperm(len(ds), generator=g)[:k]).values.tolist())


def _load_datasets(cfg: PruneConfig, rank: int):
    """(train, test, num_classes, in_channels, image_size)."""
    from .data import dataset_info, get_dataset, _check_name

    key = _check_name(cfg.data)
    size = cfg.image_size or (32 if key == "digits" else None)
    if cfg.download and rank != 0:
        _barrier()  # rank 0 downloads first
    train = get_dataset(key, cfg.data_dir, train=True, download=cfg.download and rank == 0, image_size=size,
                        augment=cfg.augment)
    if cfg.download and rank == 0:
        _barrier()
    test = get_dataset(key, cfg.data_dir, train=False, image_size=size)
    classes = list(getattr(train, "classes", []) or [])
    info = dataset_info(key, size, num_classes=len(classes) or None)
    train = _subset(train, cfg.max_train_samples, cfg.seed)
    test = _subset(test, cfg.max_test_samples, cfg.seed + 2)
    n_cls = cfg.num_classes if cfg.num_classes is not None else info.num_classes
    return train, test, int(n_cls), info.in_channels, info.image_size


def _epoch_batches(n: int, batch: int, seed: int, epoch: int) -> list[list[int]]:
    """The global batches of an epoch: a permutation drawn from (seed, epoch); the last partial batch
    is dropped (a BatchNorm batch of one sample is undefined)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    return [perm[i:i + batch] for i in range(0, n - batch + 1, batch)]


class _ListSampler(torch.utils.data.Sampler):
    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def _train_loader(ds, cfg: PruneConfig, epoch: int, rank: int, world: int, pin: bool):
    batches = _epoch_batches(len(ds), cfg.batch_size, cfg.seed, epoch)
    per = cfg.batch_size // world
    mine = [b[rank * per:(rank + 1) * per] for b in batches]
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch * 31 + rank)
    return torch.utils.data.DataLoader(ds, batch_sampler=_ListSampler(mine), num_workers=cfg.num_workers,
                                       pin_memory=pin, generator=g)


def _test_loader(ds, cfg: PruneConfig, pin: bool):
    return torch.utils.data.DataLoader(ds, batch_size=max(cfg.batch_size, 256), shuffle=False,
                                       num_workers=cfg.num_workers, pin_memory=pin)


# ------------------------------------------------------------------------------------------------ eval


@torch.no_grad()
def evaluate(model, loader, device, branches=("soft", "hard")) -> dict[str, float]:
    """Top-1 (%) of each branch in eval mode, and the soft→hard gap: KL(soft || hard) and JS, per sample."""
    from .layers import branch

    was = model.training
    model.eval()
    n = 0
    correct = {b: 0 for b in branches}
    kl = js = 0.0
    try:
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            out = {}
            for b in branches:
                with branch(b):
                    out[b] = model(x).float()
                correct[b] += int((out[b].argmax(1) == y).sum())
            if "soft" in out and "hard" in out:
                lp, lq = F.log_softmax(out["soft"], 1), F.log_softmax(out["hard"], 1)
                p, q = lp.exp(), lq.exp()
                kl += float((p * (lp - lq)).sum())
                lm = torch.log((p + q) / 2).clamp_min(-1e30)
                js += float(0.5 * (p * (lp - lm)).sum() + 0.5 * (q * (lq - lm)).sum())
            n += y.numel()
    finally:
        model.train(was)
    res = {f"{b}_top1": 100.0 * correct[b] / max(n, 1) for b in branches}
    if "soft" in branches and "hard" in branches:
        res["gap_kl"] = kl / max(n, 1)
        res["gap_js"] = js / max(n, 1)
    return res


@torch.no_grad()
def evaluate_plain(net: nn.Module, loader, device) -> float:
    """Top-1 (%) of a plain model (e.g. the exported hard network) in eval mode."""
    was = net.training
    net.eval()
    c = n = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        c += int((net(x).argmax(1) == y).sum())
        n += y.numel()
    net.train(was)
    return 100.0 * c / max(n, 1)


@torch.no_grad()
def recalibrate_bn(model, loader, device, batches: int, branch_name: str = "hard") -> int:
    """Re-estimate one branch's BatchNorm running statistics on ``batches`` training batches
    (cumulative average, train-mode forwards under no_grad). Returns the batches used."""
    from .layers import _S2HBatchNorm, branch

    bns = [m for m in model.modules() if isinstance(m, _S2HBatchNorm) and m.track_running_stats]
    if not bns or batches <= 0:
        return 0
    saved = [m.momentum for m in bns]
    for m in bns:
        rm, rv, nbt = m._stats(branch_name)
        rm.zero_()
        rv.fill_(1.0)
        nbt.zero_()
        m.momentum = None
    was = model.training
    model.train()
    used = 0
    try:
        for x, _ in loader:
            if used >= batches:
                break
            with branch(branch_name):
                model(x.to(device))
            used += 1
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        model.train(was)
    return used


# ------------------------------------------------------------------------------------------------ plots


def plot_trajectory(history: list[dict], path, target: float | None = None, title: str = "") -> Path:
    """Hard FLOPs (%) and top-1 (%) per epoch, two y-axes (the paper's Fig. 3)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ep = [h["epoch"] for h in history]
    ax.plot(ep, [h["hard_flops_pct"] for h in history], "-", color="tab:blue", label="hard FLOPs")
    ax.plot(ep, [h["soft_flops_pct"] for h in history], "--", color="tab:blue", alpha=0.5,
            label="soft (expected) FLOPs")
    if target is not None:
        ax.axhline(100 * target, color="tab:blue", linestyle=":", alpha=0.6, label=f"target {100 * target:g}%")
    ax.set_xlabel("epoch")
    ax.set_ylabel("hard-network FLOPs (% of dense)", color="tab:blue")
    ax2 = ax.twinx()
    ev = [h for h in history if h.get("hard_top1") is not None]
    ax2.plot([h["epoch"] for h in ev], [h["hard_top1"] for h in ev], "-", color="tab:red", label="hard top-1")
    ax2.plot([h["epoch"] for h in ev], [h["soft_top1"] for h in ev], "--", color="tab:orange", label="soft top-1")
    ax2.set_ylabel("top-1 accuracy (%)", color="tab:red")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="center right")
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


def plot_architecture(groups: list[tuple[str, int, int]], path, title: str = "") -> Path:
    """Retained against total channels per dependency group (the paper's Fig. 4)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(groups)
    fig = Figure(figsize=(max(6.4, 0.28 * n + 2), 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xs = list(range(n))
    ax.bar(xs, [g[1] for g in groups], color="lightgray", label="total channels")
    ax.bar(xs, [g[2] for g in groups], color="tab:blue", label="retained")
    ax.set_xticks(xs)
    ax.set_xticklabels([g[0] for g in groups], rotation=90, fontsize=6)
    ax.set_ylabel("channels")
    ax.set_xlabel("dependency group (by first producer)")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


# ------------------------------------------------------------------------------------------------ latency


@torch.no_grad()
def cpu_latency_ms(net: nn.Module, example: torch.Tensor, reps: int = 30, warmup: int = 5) -> float:
    """Median forward latency in ms (eval mode, inference_mode, current thread settings)."""
    net = net.eval()
    with torch.inference_mode():
        for _ in range(warmup):
            net(example)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            net(example)
            ts.append(time.perf_counter() - t0)
    ts.sort()
    return 1e3 * ts[len(ts) // 2]


# ------------------------------------------------------------------------------------------------ run


def _log(cfg: PruneConfig, rank: int, msg: str) -> None:
    if rank == 0 and not cfg.quiet:
        try:
            from tqdm.auto import tqdm

            tqdm.write(msg, file=sys.stdout)
        except ImportError:  # pragma: no cover
            print(msg)


def _make_optimizers(cfg: PruneConfig, model):
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(model.weight_parameters(), lr=cfg.lr, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(model.weight_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.mask_optimizer == "adam":
        mopt = torch.optim.Adam(model.mask_parameters(), lr=cfg.mask_lr)
    else:
        mopt = torch.optim.SGD(model.mask_parameters(), lr=cfg.mask_lr, momentum=cfg.momentum)
    return opt, mopt


def _check_resume(ck: dict, cfg: PruneConfig) -> None:
    old = ck["config"]
    keys = ("model", "data", "target_flops", "batch_size", "epochs", "seed", "lr", "scheduler", "divisor",
            "resource_target", "ce_coef", "gap_coef",
            "hard_width", "balance", "ablate", "enable", "optimizer", "mask_optimizer", "mask_lr",
            "max_train_samples", "num_classes", "image_size")
    diff = [k for k in keys if _norm(old.get(k)) != _norm(getattr(cfg, k))]
    if diff:
        raise ValueError("prune --resume: the checkpoint was written with different settings for "
                         + ", ".join(f"{k} ({old.get(k)!r} vs {getattr(cfg, k)!r})" for k in diff))


def _norm(v):
    return list(v) if isinstance(v, (tuple, list)) else v


def run(cfg: PruneConfig, resume: bool = False) -> dict:
    """Train and prune per ``cfg``; returns the summary (also written to ``OUT/summary.json``)."""
    import s2h

    from .trainer import NonFiniteLossError, S2HPruner

    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    rank, world, device = _init_distributed(cfg.device)
    if cfg.batch_size % world:
        raise ValueError(f"prune: --batch-size {cfg.batch_size} (global) is not divisible by {world} processes")
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    if device.type == "cpu":
        tune_cpu_allocator()
    out = Path(cfg.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    _barrier()
    ck_path = out / "checkpoint.pt"
    log_path = out / "log.jsonl"

    train_ds, test_ds, n_cls, in_ch, size = _load_datasets(cfg, rank)
    if len(train_ds) < cfg.batch_size:
        raise ValueError(f"prune: the training split has {len(train_ds)} samples, fewer than one batch "
                         f"({cfg.batch_size})")
    torch.manual_seed(cfg.seed)
    net = build_model(cfg.model, n_cls, in_ch, size, cfg.widths).to(device)
    example = torch.zeros(2, in_ch, size, size, device=device)
    model = s2h.convert(net, example, target_flops=cfg.target_flops, divisor=cfg.divisor,
                        temperature=cfg.mask_temperature, hard_width=cfg.hard_width, inplace=True)
    model.train()
    opt, mopt = _make_optimizers(cfg, model)
    pruner = S2HPruner(model, opt, mopt, ce_coef=cfg.ce_coef, gap_coef=cfg.gap_coef,
                       resource_coef=cfg.resource_coef, temperature=cfg.temperature, balance=cfg.balance,
                       ablate=tuple(cfg.ablate), enable=tuple(cfg.enable), resource_target=cfg.resource_target)
    steps_per_epoch = len(train_ds) // cfg.batch_size
    sched_fn = _LRSchedule(cfg.scheduler, cfg.epochs * steps_per_epoch, steps_per_epoch,
                           int(round(cfg.warmup_epochs * steps_per_epoch)), cfg.milestones, cfg.lr_gamma)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, sched_fn)
    history: list[dict] = []
    start_epoch = 0
    elapsed_before = 0.0
    if resume:
        if not ck_path.is_file():
            raise FileNotFoundError(f"prune --resume: no checkpoint at {ck_path}")
        ck = torch.load(ck_path, map_location=device, weights_only=False)
        if ck.get("format") != "s2h-prune-checkpoint":
            raise ValueError(f"prune --resume: {ck_path} is not a prune checkpoint")
        _check_resume(ck, cfg)
        model.load_state_dict(ck["model"])
        pruner.load_state_dict(ck["trainer"])
        sched.load_state_dict(ck["scheduler"])
        history = list(ck["history"])
        start_epoch = int(ck["epoch"])
        elapsed_before = float(ck.get("wall_time", 0.0))
        _set_rng_state(ck["rng"])
        if rank == 0:
            _atomic_write_text(log_path, "".join(json.dumps(h) + "\n" for h in history))
        _log(cfg, rank, f"resumed from {ck_path} after epoch {start_epoch}")
    elif rank == 0:
        _atomic_write_text(log_path, "")

    pin = device.type == "cuda"
    test_loader = _test_loader(test_ds, cfg, pin)
    dense_flops = model.dense_flops()
    _log(cfg, rank, f"S2H prune: {cfg.model} on {cfg.data} ({len(train_ds)} train / {len(test_ds)} test, "
                    f"{n_cls} classes, {size}x{size}), {len(model.groups)} groups, dense {dense_flops / 1e6:.1f}M MACs, "
                    f"target {100 * cfg.target_flops:g}% FLOPs, {cfg.epochs} epochs x {steps_per_epoch} steps"
                    + (f", {world} processes" if world > 1 else ""))
    t_start = time.perf_counter() - elapsed_before
    ran = 0
    stopped = None
    for epoch in range(start_epoch, cfg.epochs):
        if cfg.stop_after is not None and ran >= cfg.stop_after:
            break
        _seed_epoch(cfg.seed, epoch, rank)
        loader = _train_loader(train_ds, cfg, epoch, rank, world, pin)
        t0 = time.perf_counter()
        sums = {"loss": 0.0, "acc": 0.0, "hard_acc": 0.0, "gap": 0.0}
        n = 0
        last = None
        bar = None
        if rank == 0 and cfg.progress and not cfg.quiet:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, dynamic_ncols=True,
                       file=sys.stderr)
        try:
            for i, (x, y) in enumerate(loader):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                try:
                    last = pruner.step(x, y)
                except NonFiniteLossError as e:
                    good = str(ck_path) if ck_path.is_file() else None
                    where = (f"the last good checkpoint is {good} (after epoch {start_epoch + ran})" if good
                             else "no checkpoint was written yet")
                    stopped = TrainingStopped(f"non-finite loss at step {e.step} (epoch {epoch + 1}, batch {i + 1}/"
                                              f"{len(loader)}); training stopped, {where}", e.step, good)
                    break
                sched.step()
                for k in sums:
                    sums[k] += last[k]
                n += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{last['loss']:.3f}", acc=f"{100 * last['acc']:.1f}",
                                    hard=f"{100 * last['hard_flops']:.1f}%", gap=f"{last['gap']:.4f}")
        finally:
            if bar is not None:
                bar.close()
        if stopped is not None:
            break
        epoch_time = time.perf_counter() - t0
        rec = {"epoch": epoch + 1, "step": pruner.num_steps, "lr": opt.param_groups[0]["lr"],
               "mask_lr": mopt.param_groups[0]["lr"], "train_loss": sums["loss"] / max(n, 1),
               "train_acc": 100 * sums["acc"] / max(n, 1), "train_hard_acc": 100 * sums["hard_acc"] / max(n, 1),
               "train_gap": sums["gap"] / max(n, 1)}
        with torch.no_grad():
            rec["hard_flops_pct"] = 100 * model.hard_flops() / dense_flops
            rec["soft_flops_pct"] = 100 * float(model.soft_flops()) / dense_flops
        do_eval = (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs
        if do_eval and rank == 0:
            ev = evaluate(model, test_loader, device)
            rec.update(soft_top1=ev["soft_top1"], hard_top1=ev["hard_top1"], gap_kl=ev["gap_kl"], gap_js=ev["gap_js"])
        else:
            rec.update(soft_top1=None, hard_top1=None, gap_kl=None, gap_js=None)
        rec["keep"] = model.keep_counts()
        rec["epoch_time"] = epoch_time
        rec["wall_time"] = time.perf_counter() - t_start
        history.append(rec)
        ran += 1
        if rank == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            _atomic_save({"format": "s2h-prune-checkpoint", "version": 1, "epoch": epoch + 1,
                          "model": model.state_dict(), "trainer": pruner.state_dict(),
                          "scheduler": sched.state_dict(), "history": history, "rng": _rng_state(),
                          "config": dataclasses.asdict(cfg), "wall_time": rec["wall_time"]}, ck_path)
            if rec["hard_top1"] is not None:
                _log(cfg, rank, f"epoch {epoch + 1}/{cfg.epochs}: loss {rec['train_loss']:.3f}  soft {rec['soft_top1']:.2f}%  "
                                f"hard {rec['hard_top1']:.2f}%  hard FLOPs {rec['hard_flops_pct']:.1f}%  "
                                f"gap KL {rec['gap_kl']:.4f} JS {rec['gap_js']:.4f}  lr {rec['lr']:.4g}  "
                                f"{epoch_time:.1f}s")
        _barrier()
    if stopped is not None:
        _barrier()
        raise stopped
    done = start_epoch + ran
    if done < cfg.epochs:  # --stop-after: leave the checkpoint for --resume
        _log(cfg, rank, f"stopped after epoch {done} of {cfg.epochs} (--stop-after); continue with --resume")
        return {"stopped_after_epoch": done, "checkpoint": str(ck_path)}
    summary = _finish(cfg, model, train_ds, test_ds, test_loader, device, rank, history, n_cls, in_ch, size,
                      time.perf_counter() - t_start)
    _barrier()
    return summary


def _finish(cfg, model, train_ds, test_ds, test_loader, device, rank, history, n_cls, in_ch, size, wall) -> dict:
    import s2h

    if rank != 0:
        return {}
    out = Path(cfg.out)
    recal = 0
    if cfg.recalibrate_bn > 0:
        g = torch.Generator().manual_seed(cfg.seed + 99)
        loader = torch.utils.data.DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True, generator=g,
                                             drop_last=True)
        recal = recalibrate_bn(model, loader, device, cfg.recalibrate_bn)
    final = evaluate(model, test_loader, device)
    pruned = model.export()
    exported_top1 = evaluate_plain(pruned, test_loader, device)
    s2h.save(model, out / "s2h_model.pt")
    s2h.save(pruned, out / "pruned.pt")
    groups = [(g.name, g.channels, k) for g, k in zip(model.groups, model.keep_counts().values())]
    title = f"{cfg.model} on {cfg.data}, target {100 * cfg.target_flops:g}% FLOPs"
    plot_trajectory(history, out / "trajectory.png", cfg.target_flops, title)
    plot_architecture(groups, out / "architecture.png", title)
    n_dense = sum(p.numel() for p in model.weight_parameters())
    n_pruned = sum(p.numel() for p in pruned.parameters())
    summary = {
        "model": cfg.model, "data": cfg.data, "classes": n_cls, "image_size": size,
        "train_samples": len(train_ds), "test_samples": len(test_ds),
        "target_flops": cfg.target_flops, "epochs": cfg.epochs, "steps": history[-1]["step"] if history else 0,
        "dense_macs": model.dense_flops(), "hard_macs": model.hard_flops(),
        "hard_flops_pct": 100 * model.hard_flops() / model.dense_flops(),
        "soft_top1": final["soft_top1"], "hard_top1": final["hard_top1"], "gap_kl": final["gap_kl"],
        "gap_js": final["gap_js"], "exported_top1": exported_top1,
        "exported_matches_hard": abs(exported_top1 - final["hard_top1"]) < 1e-9,
        "bn_recalibrated_batches": recal,
        "params_dense": n_dense, "params_pruned": n_pruned,
        "widths": {g[0]: {"channels": g[1], "kept": g[2]} for g in groups},
        "wall_time_s": wall, "files": {"pruned": "pruned.pt", "s2h_model": "s2h_model.pt", "log": "log.jsonl",
                                       "trajectory": "trajectory.png", "architecture": "architecture.png",
                                       "checkpoint": "checkpoint.pt"},
        "config": dataclasses.asdict(cfg),
    }
    if cfg.latency and device.type == "cpu":
        dense_net = build_model(cfg.model, n_cls, in_ch, size, cfg.widths).eval()
        for bs in (1, 64):
            ex = torch.randn(bs, in_ch, size, size)
            summary[f"latency_ms_bs{bs}"] = {"dense": cpu_latency_ms(dense_net, ex), "pruned": cpu_latency_ms(pruned, ex)}
    _atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    if not summary["exported_matches_hard"]:
        _log(cfg, rank, f"warning: the exported model's top-1 ({exported_top1:.2f}%) differs from the hard "
                        f"branch's ({final['hard_top1']:.2f}%)")
    _log(cfg, rank, f"done: soft {final['soft_top1']:.2f}%  hard {final['hard_top1']:.2f}%  exported "
                    f"{exported_top1:.2f}%  at {summary['hard_flops_pct']:.1f}% FLOPs "
                    f"({n_pruned / 1e3:.1f}k of {n_dense / 1e3:.1f}k parameters); wrote {out}/")
    return summary


# ------------------------------------------------------------------------------------------------ CLI

def _fraction(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], got {s}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .data import DATASETS
    from .trainer import BALANCES, TERMS

    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="the paper's settings (Appendix A); explicit options override them")
    p.add_argument("--out", required=True, help="output folder (log, checkpoint, pruned model, plots)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    m = p.add_argument_group("model")
    m.add_argument("--model", default=None, help="resnet20/32/44/56/110 (CIFAR), wrn28_10, small_cnn, vit_cifar, "
                                                 "swin_cifar, or a torchvision model name (default resnet56)")
    m.add_argument("--widths", type=int, nargs=3, default=None, help="stage widths of a CIFAR ResNet")
    m.add_argument("--target-flops", type=_fraction, default=0.15, help="FLOPs budget, fraction of dense")
    m.add_argument("--divisor", type=int, default=1, help="channels per mask bucket")
    m.add_argument("--hard-width", choices=("threshold", "expected"), default="threshold")
    m.add_argument("--mask-temperature", type=float, default=1.0, help="tau of the softmax over buckets")
    d = p.add_argument_group("data")
    d.add_argument("--data", choices=DATASETS, default=None, help="dataset (default digits)")
    d.add_argument("--data-dir", default=None, help="folder holding the dataset (default $S2H_DATA or ./data)")
    d.add_argument("--download", action="store_true", help="download cifar10/cifar100/tiny-imagenet if missing")
    d.add_argument("--image-size", type=int, default=None, help="square input size (digits: 32 by default)")
    d.add_argument("--num-classes", type=int, default=None, help="classifier outputs (default: the dataset's)")
    d.add_argument("--no-augment", action="store_true", help="no random crop/flip")
    d.add_argument("--max-train-samples", type=int, default=None)
    d.add_argument("--max-test-samples", type=int, default=None)
    d.add_argument("--workers", dest="num_workers", type=int, default=None, help="DataLoader workers")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=None)
    o.add_argument("--batch-size", type=int, default=None, help="global batch (split across torchrun processes)")
    o.add_argument("--optimizer", choices=("sgd", "adamw"), default=None)
    o.add_argument("--lr", type=float, default=None)
    o.add_argument("--momentum", type=float, default=None)
    o.add_argument("--weight-decay", type=float, default=None)
    o.add_argument("--scheduler", choices=("cosine", "step", "constant"), default=None)
    o.add_argument("--milestones", type=int, nargs="*", default=None, help="epochs of the step scheduler")
    o.add_argument("--lr-gamma", type=float, default=0.1)
    o.add_argument("--warmup-epochs", type=float, default=None)
    o.add_argument("--mask-optimizer", choices=("sgd", "adam"), default="adam")
    o.add_argument("--mask-lr", type=float, default=0.02)
    s = p.add_argument_group("S2H")
    s.add_argument("--ce-coef", type=float, default=None, help="beta (0.5 for CNNs, 1 for Transformers)")
    s.add_argument("--gap-coef", type=float, default=None, help="gamma (5 for CNNs, 1 for Transformers)")
    s.add_argument("--resource-coef", type=float, default=5.0)
    s.add_argument("--resource-target", choices=("soft", "hard"), default="soft",
                   help="R on the expected FLOPs (soft, the paper) or on the hard network's FLOPs with a "
                        "straight-through gradient (hard, the authors' demo)")
    s.add_argument("--temperature", type=float, default=1.0, help="T of the gap's softmaxes")
    s.add_argument("--balance", choices=BALANCES, default="paper")
    s.add_argument("--ablate", nargs="*", choices=TERMS, default=[], help="gradient terms to disable (Table 5)")
    s.add_argument("--enable", nargs="*", choices=["G_soft_theta"], default=[], help="G_soft_theta: Table 5 row 1")
    r = p.add_argument_group("run")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    r.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    r.add_argument("--eval-every", type=int, default=1, help="evaluate on the test split every N epochs")
    r.add_argument("--recalibrate-bn", type=int, default=0,
                   help="re-estimate the hard network's BN statistics on N batches before export")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms (GPU)")
    r.add_argument("--stop-after", type=int, default=None,
                   help="stop after N epochs in this invocation (time-limited jobs); continue with --resume")
    r.add_argument("--latency", action="store_true", help="measure exported vs dense CPU latency at the end")


def config_from_args(args: argparse.Namespace) -> PruneConfig:
    """Explicit options > the preset's values > :class:`PruneConfig` defaults."""
    preset = PRESETS.get(args.preset or "", {})
    kw = {}
    for f in dataclasses.fields(PruneConfig):
        v = getattr(args, f.name, None)
        if v is None and f.name in preset:
            v = preset[f.name]
        if v is not None:
            kw[f.name] = v
    kw["augment"] = not getattr(args, "no_augment", False)
    kw["progress"] = not getattr(args, "no_progress", False)
    for k in ("milestones", "ablate", "enable", "widths"):
        if kw.get(k) is not None:
            kw[k] = tuple(kw[k])
    if str(kw.get("model", PruneConfig.model)).lower().startswith(("vit_", "swin_")):  # Transformers (A4): 1 and 1
        kw.setdefault("ce_coef", 1.0)
        kw.setdefault("gap_coef", 1.0)
    return PruneConfig(**kw)


def main(args: argparse.Namespace) -> dict:
    from .trainer import NonFiniteLossError

    cfg = config_from_args(args)
    try:
        return run(cfg, resume=args.resume)
    except (TrainingStopped, NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(3) from None
