"""What the two Fashion-MNIST studies share: the data, one training loop, evaluation, FLOPs,
latency, a resumable result store, and a small process pool.

Every method in a study trains through :func:`train_supervised` (or S2H's own step on the same
batches): the same fixed training subset, the same per-(seed, epoch) batch order, the same
augmentation (random 28x28 crop of the 3-pixel padded image, horizontal flip), the same SGD with
Nesterov momentum 0.9, weight decay 5e-4 and a per-step cosine schedule.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

BATCH = 128
LR = 0.1
WEIGHT_DECAY = 5e-4
CROP_PADDING = 3


@dataclass
class FashionData:
    x: torch.Tensor          # (N, 1, 28, 28) normalised training images (the subset)
    y: torch.Tensor
    x_test: torch.Tensor     # the whole 10,000-image test split
    y_test: torch.Tensor
    pad_value: float         # a black pixel after normalisation


def load_fashion(n_train: int | None, subset_seed: int = 0, n_test: int | None = None) -> FashionData:
    """The training subset is drawn once from ``subset_seed``: every method and seed sees the same images."""
    from s2h.data import get_dataset

    train = get_dataset("fashion-mnist", train=True, augment=True)
    test = get_dataset("fashion-mnist", train=False)
    x, y = train.images, train.targets
    if n_train is not None and n_train < len(y):
        keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(subset_seed))[:n_train]
        x, y = x[keep.sort().values], y[keep.sort().values]
    xt, yt = test.images, test.targets
    if n_test is not None and n_test < len(yt):
        xt, yt = xt[:n_test], yt[:n_test]
    return FashionData(x.contiguous(), y, xt, yt, train.pad_value)


def epoch_batches(n: int, seed: int, epoch: int, batch: int = BATCH) -> list[torch.Tensor]:
    """The batches of one epoch, a permutation drawn from (seed, epoch); the last partial batch dropped."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return [perm[i:i + batch] for i in range(0, n - batch + 1, batch)]


def augment(x: torch.Tensor, pad_value: float, gen: torch.Generator) -> torch.Tensor:
    """Random crop of the padded image and random horizontal flip, per sample, in one gather."""
    b, c, h, w = x.shape
    p = CROP_PADDING
    padded = F.pad(x, (p, p, p, p), value=pad_value)
    top = torch.randint(0, 2 * p + 1, (b,), generator=gen)
    left = torch.randint(0, 2 * p + 1, (b,), generator=gen)
    flip = torch.rand(b, generator=gen) < 0.5
    cols = torch.arange(w)
    cols = torch.where(flip[:, None], w - 1 - cols, cols) + left[:, None]
    rows = torch.arange(h) + top[:, None]
    bi = torch.arange(b)[:, None, None]
    return padded[bi, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def training_batches(data: FashionData, epochs: int, seed: int):
    """(epoch, step, x, y) for every step of the run, augmented from a generator seeded by ``seed``."""
    gen = torch.Generator().manual_seed(seed + 7)
    for epoch in range(epochs):
        for step, idx in enumerate(epoch_batches(len(data.y), seed, epoch)):
            yield epoch, step, augment(data.x[idx], data.pad_value, gen), data.y[idx]


def steps_per_epoch(data: FashionData) -> int:
    return len(data.y) // BATCH


def cosine(total_steps: int) -> Callable[[int], float]:
    return lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / max(total_steps, 1)))


def sgd(params, lr: float = LR) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=WEIGHT_DECAY)


def train_supervised(net: nn.Module, data: FashionData, epochs: int, seed: int, loss_fn=None,
                     after_step: Callable[[], None] | None = None, lr: float = LR) -> nn.Module:
    """SGD + cosine over ``epochs`` of ``data``. ``loss_fn(net, x, y)`` defaults to cross-entropy;
    ``after_step`` runs after every optimizer step (e.g. re-applying a pruning mask)."""
    if epochs <= 0:
        return net
    opt = sgd([p for p in net.parameters() if p.requires_grad], lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine(epochs * steps_per_epoch(data)))
    net.train()
    for _, _, x, y in training_batches(data, epochs, seed):
        loss = loss_fn(net, x, y) if loss_fn is not None else F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if after_step is not None:
            after_step()
    return net


@torch.no_grad()
def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    """Top-1 (%) in eval mode."""
    was = net.training
    net.eval()
    correct = sum(int((net(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(y), batch))
    net.train(was)
    return 100.0 * correct / len(y)


def macs(net: nn.Module, shape=(1, 1, 28, 28)) -> int:
    """Multiply-accumulates of one forward, from torch.utils.flop_counter (FLOPs / 2)."""
    was = net.training
    net.eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        net(torch.zeros(shape))
    net.train(was)
    return fc.get_total_flops() // 2


def params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@torch.no_grad()
def interleaved_latency_ms(nets: list[nn.Module], batch: int, rounds: int, threads: int = 1,
                           shape=(1, 28, 28)) -> list[float]:
    """Wall time (ms) of one eval forward of each net at ``batch`` on ``threads`` threads: the minimum
    over ``rounds`` (the README's one rule). Each round calls every net once, in an order rotated per
    round, so load swings of a shared machine fall on all of them alike."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.randn(batch, *shape)
        for net in nets:
            net.eval()
            for _ in range(3):
                net(x)
        times: list[list[float]] = [[] for _ in nets]
        for r in range(rounds):
            order = list(range(len(nets)))
            for i in order[r % len(nets):] + order[:r % len(nets)]:
                t = time.perf_counter()
                nets[i](x)
                times[i].append(time.perf_counter() - t)
        return [1e3 * min(t) for t in times]
    finally:
        torch.set_num_threads(old)


class ResultStore:
    """One JSON file per finished row under ``folder``: a study cut short resumes where it stopped."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def get(self, key: str) -> dict | None:
        p = self.path(key)
        return json.loads(p.read_text()) if p.is_file() else None

    def finished(self, keys) -> list[dict]:
        """The stored results of those ``keys`` that have one."""
        return [r for r in (self.get(k) for k in keys) if r is not None]

    def result_or_claim(self, key: str) -> dict | None:
        """The result of ``key`` if stored (or once the process running it has stored it); None when this
        process has claimed it and should run it."""
        done = self.get(key)
        if done is None and not self.claim(key):
            done = self.wait(key)
        return done

    def claim(self, key: str) -> bool:
        """True if this process may run ``key``: no live process holds its lock (a dead one's is taken over)."""
        lock = self.folder / f"{key}.lock"
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                os.kill(int(lock.read_text() or 0), 0)
                return False
            except (ProcessLookupError, ValueError):
                lock.unlink(missing_ok=True)
                return self.claim(key)
            except PermissionError:
                return False
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True

    def wait(self, key: str, poll_s: float = 10.0) -> dict:
        """The result of ``key`` once the process holding its lock has written it (or run it here if it died)."""
        while (done := self.get(key)) is None:
            if self.claim(key):
                raise RuntimeError(f"{key}: the process that claimed it died; run the study again to redo it")
            time.sleep(poll_s)
        return done

    def put(self, key: str, value: dict) -> None:
        tmp = self.path(key).with_suffix(".tmp")
        tmp.write_text(json.dumps(value, indent=1))
        os.replace(tmp, self.path(key))
        (self.folder / f"{key}.lock").unlink(missing_ok=True)


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def run_parallel(fn: Callable, jobs: list, workers: int, threads: int = 1) -> list:
    """``fn(job)`` for every job, on ``workers`` processes of ``threads`` threads each (spawned)."""
    if workers <= 1 or len(jobs) <= 1:
        _init_worker(threads)
        return [fn(j) for j in jobs]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    # Not multiprocessing.Pool: its map waits forever for the task of a worker that died (a segfault,
    # the OOM killer); the executor raises instead, and the finished runs are on disk.
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                             initargs=(threads,), max_tasks_per_child=1) as pool:
        try:
            return list(pool.map(fn, jobs))
        except BrokenProcessPool as e:
            raise RuntimeError("a worker process died (killed, or crashed: see dmesg); the finished runs are "
                               "kept, run the same command again to resume") from e


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values or any(math.isnan(v) for v in values):
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def machine_line() -> str:
    import platform

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()}, torch {torch.__version__}"
