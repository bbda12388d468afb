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
RNG from ``(seed, epoch)`` alone; ``--resume --epochs N`` with a larger N extends a run (the LR
follows an N-epoch schedule from there). At the end: ``pruned.pt`` (the exported hard model) and
``s2h_model.pt`` (the S2HModel: masks, both branches), both read back by ``s2h.load(path)`` (they
record the ``s2h.models.build_model`` arguments), ``convert_report.md`` (what convert pruned and
what it kept dense, and why), ``trajectory.png``
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
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..data import canonical_name, dataset_info, get_dataset
from ..engine.checkpoints import atomic_save, atomic_write_text, load_checkpoint
from ..engine.distributed import barrier, init_distributed
from ..engine.evaluation import evaluate, recalibrate_bn
from ..engine.loaders import epoch_loader, subset
from ..engine.perf import cpu_latency_ms, tune_cpu_allocator
from ..engine.plots import plot_architecture, plot_trajectory
from ..engine.seeding import rng_state, seed_epoch, set_rng_state
from ..models import build_model
from ..structured.convert import convert
from ..structured.io import save
from ..structured.model import S2HModel
from ..structured.step import NonFiniteLossError, S2HPruner
from .prune_config import PRESETS, PruneConfig, add_arguments, config_from_args

__all__ = ["PRESETS", "PruneConfig", "PruneJob", "LRSchedule", "TrainingStopped", "add_arguments",
           "config_from_args", "load_datasets", "main", "run", "setup"]


class TrainingStopped(RuntimeError):
    """Training stopped early (non-finite loss); ``checkpoint`` is the last good checkpoint or None."""

    def __init__(self, message: str, step: int, checkpoint: str | None):
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint


class LRSchedule:
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


@dataclass
class PruneJob:
    """Everything one prune run holds (built by :func:`setup`)."""

    cfg: PruneConfig
    rank: int
    world: int
    device: torch.device
    out: Path
    train_ds: Any
    test_ds: Any
    n_cls: int
    in_ch: int
    size: int
    model: S2HModel
    opt: torch.optim.Optimizer
    mopt: torch.optim.Optimizer
    pruner: S2HPruner
    sched: Any
    steps_per_epoch: int
    history: list = field(default_factory=list)
    start_epoch: int = 0
    elapsed_before: float = 0.0

    @property
    def ck_path(self) -> Path:
        return self.out / "checkpoint.pt"

    @property
    def log_path(self) -> Path:
        return self.out / "log.jsonl"


def load_datasets(cfg: PruneConfig, rank: int):
    """(train, test, num_classes, in_channels, image_size)."""
    key = canonical_name(cfg.data)
    size = cfg.image_size or (32 if key == "digits" else None)
    if cfg.download and rank != 0:
        barrier()  # rank 0 downloads first
    train = get_dataset(key, cfg.data_dir, train=True, download=cfg.download and rank == 0, image_size=size,
                        augment=cfg.augment)
    if cfg.download and rank == 0:
        barrier()
    test = get_dataset(key, cfg.data_dir, train=False, image_size=size)
    classes = list(getattr(train, "classes", []) or [])
    info = dataset_info(key, size, num_classes=len(classes) or None)
    train = subset(train, cfg.max_train_samples, cfg.seed)
    test = subset(test, cfg.max_test_samples, cfg.seed + 2)
    n_cls = cfg.num_classes if cfg.num_classes is not None else info.num_classes
    return train, test, int(n_cls), info.in_channels, info.image_size


def _test_loader(ds, cfg: PruneConfig, pin: bool):
    return torch.utils.data.DataLoader(ds, batch_size=max(cfg.batch_size, 256), shuffle=False,
                                       num_workers=cfg.num_workers, pin_memory=pin)


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
    keys = ("model", "data", "target_flops", "batch_size", "seed", "lr", "scheduler", "divisor",
            "resource_target", "ce_coef", "gap_coef",
            "hard_width", "balance", "ablate", "enable", "optimizer", "mask_optimizer", "mask_lr",
            "max_train_samples", "num_classes", "image_size", "ignore", "strict")
    diff = [k for k in keys if _norm(old.get(k, PruneConfig.__dataclass_fields__[k].default))
            != _norm(getattr(cfg, k))]
    if diff:
        raise ValueError("prune --resume: the checkpoint was written with different settings for "
                         + ", ".join(f"{k} ({old.get(k)!r} vs {getattr(cfg, k)!r})" for k in diff))
    if cfg.epochs < int(ck["epoch"]):
        raise ValueError(f"prune --resume: the checkpoint is after epoch {ck['epoch']}; --epochs {cfg.epochs} "
                         "cannot shorten the run (a larger --epochs extends it)")


def _norm(v):
    return list(v) if isinstance(v, (tuple, list)) else v


def _write_convert_report(cfg: PruneConfig, rank: int, out: Path, model) -> None:
    """What convert pruned and what it kept dense: printed, and OUT/convert_report.md."""
    if rank != 0:
        return
    try:
        from ..structured.report import report_of
    except ImportError:  # pragma: no cover - an s2h without conversion reports
        return
    report = report_of(model)
    atomic_write_text(out / "convert_report.md", report.to_markdown() + "\n")
    _log(cfg, rank, str(report))


def _make_out(out: Path) -> list[Path]:
    """Create ``out`` (and missing parents); the folders this created, innermost first."""
    created = []
    p = out.resolve()
    while not p.exists():
        created.append(p)
        p = p.parent
    out.mkdir(parents=True, exist_ok=True)
    return created


def _remove_if_empty(created: list[Path]) -> None:
    """After a failed run: remove the folders it created, if nothing was written into them."""
    for p in created:
        try:
            p.rmdir()  # only an empty folder
        except OSError:
            return


def setup(cfg: PruneConfig) -> PruneJob:
    """Device and processes, output folder, data, the converted model, optimizers, LR schedule."""
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    rank, world, device = init_distributed(cfg.device)
    if cfg.batch_size % world:
        raise ValueError(f"prune: --batch-size {cfg.batch_size} (global) is not divisible by {world} processes")
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    if device.type == "cpu":
        tune_cpu_allocator()
    out = Path(cfg.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)  # run() made it (and removes it if the run fails empty)
    barrier()
    train_ds, test_ds, n_cls, in_ch, size = load_datasets(cfg, rank)
    if len(train_ds) < cfg.batch_size:
        raise ValueError(f"prune: the training split has {len(train_ds)} samples, fewer than one batch "
                         f"({cfg.batch_size})")
    torch.manual_seed(cfg.seed)
    net = build_model(cfg.model, n_cls, in_ch, size, cfg.widths).to(device)
    example = torch.zeros(2, in_ch, size, size, device=device)
    model = convert(net, example, target_flops=cfg.target_flops, divisor=cfg.divisor,
                    temperature=cfg.mask_temperature, hard_width=cfg.hard_width, inplace=True,
                    ignored_layers=list(cfg.ignore) or None, strict=cfg.strict)
    model.train()
    _write_convert_report(cfg, rank, out, model)
    opt, mopt = _make_optimizers(cfg, model)
    pruner = S2HPruner(model, opt, mopt, ce_coef=cfg.ce_coef, gap_coef=cfg.gap_coef,
                       resource_coef=cfg.resource_coef, temperature=cfg.temperature, balance=cfg.balance,
                       ablate=tuple(cfg.ablate), enable=tuple(cfg.enable), resource_target=cfg.resource_target)
    steps_per_epoch = len(train_ds) // cfg.batch_size
    sched_fn = LRSchedule(cfg.scheduler, cfg.epochs * steps_per_epoch, steps_per_epoch,
                          int(round(cfg.warmup_epochs * steps_per_epoch)), cfg.milestones, cfg.lr_gamma)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, sched_fn)
    return PruneJob(cfg, rank, world, device, out, train_ds, test_ds, n_cls, in_ch, size, model, opt, mopt, pruner,
                    sched, steps_per_epoch)


def resume_from_checkpoint(job: PruneJob) -> None:
    """Continue from OUT/checkpoint.pt (read with weights_only=True; a tampered file is refused)."""
    ck_path = job.ck_path
    if not ck_path.is_file():
        raise FileNotFoundError(f"prune --resume: no checkpoint at {ck_path}")
    ck = load_checkpoint(ck_path, map_location=job.device, what="prune --resume")
    if not isinstance(ck, dict) or ck.get("format") != "s2h-prune-checkpoint":
        raise ValueError(f"prune --resume: {ck_path} is not a prune checkpoint")
    _check_resume(ck, job.cfg)
    job.model.load_state_dict(ck["model"])
    job.pruner.load_state_dict(ck["trainer"])
    fresh = job.sched.lr_lambdas
    job.sched.load_state_dict(ck["scheduler"])
    # LambdaLR restores its LRSchedule's fields (total steps) from the checkpoint: keep this run's, so
    # --resume --epochs N extends a run on the schedule of an N-epoch run
    job.sched.lr_lambdas = fresh
    job.history = list(ck["history"])
    job.start_epoch = int(ck["epoch"])
    job.elapsed_before = float(ck.get("wall_time", 0.0))
    set_rng_state(ck["rng"])
    if job.rank == 0:
        atomic_write_text(job.log_path, "".join(json.dumps(h) + "\n" for h in job.history))
    extended = int(ck["config"].get("epochs", job.cfg.epochs)) != job.cfg.epochs
    _log(job.cfg, job.rank, f"resumed from {ck_path} after epoch {job.start_epoch}"
                            + (f" (extended to {job.cfg.epochs} epochs)" if extended else ""))


def _stopped(job: PruneJob, e: NonFiniteLossError, ran: int, batches: int) -> TrainingStopped:
    good = str(job.ck_path) if job.ck_path.is_file() else None
    where = (f"the last good checkpoint is {good} (after epoch {job.start_epoch + ran})" if good
             else "no checkpoint was written yet")
    epoch, batch = divmod(e.step, job.steps_per_epoch)
    return TrainingStopped(f"non-finite loss at step {e.step} (epoch {epoch + 1}, batch {batch + 1}/{batches}); "
                           f"training stopped, {where}", e.step, good)


#: the progress bar reads the step statistics (a device read) every this many steps
POSTFIX_EVERY = 20


def train_epoch(job: PruneJob, epoch: int, ran: int) -> tuple[dict, int, TrainingStopped | None]:
    """One epoch of S2HPruner steps: (summed step statistics, steps, the stop on a non-finite loss or None).

    The statistics are summed on the device and read once at the end of the epoch (with the step
    checks, so a bad step is reported before the epoch's checkpoint is written)."""
    cfg, rank = job.cfg, job.rank
    seed_epoch(cfg.seed, epoch, rank)
    loader = epoch_loader(job.train_ds, cfg.batch_size, cfg.seed, epoch, rank, job.world, cfg.num_workers,
                          job.device.type == "cuda")
    keys = ("loss", "acc", "hard_acc", "gap")
    sums = {k: torch.zeros((), dtype=torch.float64, device=job.device) for k in keys}
    n = 0
    bar = None
    if rank == 0 and cfg.progress and not cfg.quiet:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, dynamic_ncols=True,
                   file=sys.stderr)
    try:
        for i, (x, y) in enumerate(loader):
            x, y = x.to(job.device, non_blocking=True), y.to(job.device, non_blocking=True)
            last = job.pruner.step(x, y)
            job.sched.step()
            t = last.tensors
            for k in keys:
                sums[k] += t[k]
            n += 1
            if bar is not None:
                bar.update(1)
                if i % POSTFIX_EVERY == 0:
                    bar.set_postfix(loss=f"{last['loss']:.3f}", acc=f"{100 * last['acc']:.1f}",
                                    hard=f"{100 * last['hard_flops']:.1f}%", gap=f"{last['gap']:.4f}")
        totals = dict(zip(keys, job.pruner.checks.read([sums[k] for k in keys])))
    except NonFiniteLossError as e:
        return {}, n, _stopped(job, e, ran, len(loader))
    finally:
        if bar is not None:
            bar.close()
    return totals, n, None


def end_epoch(job: PruneJob, epoch: int, sums: dict, n: int, epoch_time: float, t_start: float,
              test_loader) -> None:
    """The epoch's record (evaluation every --eval-every epochs), log.jsonl, the checkpoint."""
    cfg, model, rank = job.cfg, job.model, job.rank
    dense_flops = model.dense_flops()
    rec = {"epoch": epoch + 1, "step": job.pruner.num_steps, "lr": job.opt.param_groups[0]["lr"],
           "mask_lr": job.mopt.param_groups[0]["lr"], "train_loss": sums["loss"] / max(n, 1),
           "train_acc": 100 * sums["acc"] / max(n, 1), "train_hard_acc": 100 * sums["hard_acc"] / max(n, 1),
           "train_gap": sums["gap"] / max(n, 1)}
    with torch.no_grad():
        rec["hard_flops_pct"] = 100 * model.hard_flops() / dense_flops
        rec["soft_flops_pct"] = 100 * float(model.soft_flops()) / dense_flops
    do_eval = (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs
    if do_eval and rank == 0:
        ev = evaluate(model, test_loader, job.device, branches=("soft", "hard"))
        rec.update(soft_top1=ev["soft_top1"], hard_top1=ev["hard_top1"], gap_kl=ev["gap_kl"], gap_js=ev["gap_js"])
    else:
        rec.update(soft_top1=None, hard_top1=None, gap_kl=None, gap_js=None)
    rec["keep"] = model.keep_counts()
    rec["epoch_time"] = epoch_time
    rec["wall_time"] = time.perf_counter() - t_start
    job.history.append(rec)
    if rank == 0:
        with open(job.log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        atomic_save({"format": "s2h-prune-checkpoint", "version": 2, "epoch": epoch + 1,
                     "model": model.state_dict(), "trainer": job.pruner.state_dict(),
                     "scheduler": job.sched.state_dict(), "history": job.history, "rng": rng_state(),
                     "config": dataclasses.asdict(cfg), "wall_time": rec["wall_time"]}, job.ck_path)
        if rec["hard_top1"] is not None:
            _log(cfg, rank, f"epoch {epoch + 1}/{cfg.epochs}: loss {rec['train_loss']:.3f}  soft {rec['soft_top1']:.2f}%  "
                            f"hard {rec['hard_top1']:.2f}%  hard FLOPs {rec['hard_flops_pct']:.1f}%  "
                            f"gap KL {rec['gap_kl']:.4f} JS {rec['gap_js']:.4f}  lr {rec['lr']:.4g}  "
                            f"{epoch_time:.1f}s")


def run(cfg: PruneConfig, resume: bool = False) -> dict:
    """Train and prune per ``cfg``; returns the summary (also written to ``OUT/summary.json``).
    A run that fails before writing anything leaves no (empty) output folder behind."""
    created = _make_out(Path(cfg.out)) if int(os.environ.get("RANK", "0")) == 0 else []
    try:
        return _run(cfg, resume)
    except BaseException:
        _remove_if_empty(created)
        raise


def _run(cfg: PruneConfig, resume: bool) -> dict:
    job = setup(cfg)
    if resume:
        resume_from_checkpoint(job)
    elif job.rank == 0:
        atomic_write_text(job.log_path, "")
    test_loader = _test_loader(job.test_ds, cfg, job.device.type == "cuda")
    _log(cfg, job.rank, f"S2H prune: {cfg.model} on {cfg.data} ({len(job.train_ds)} train / {len(job.test_ds)} "
                        f"test, {job.n_cls} classes, {job.size}x{job.size}), {len(job.model.groups)} groups, dense "
                        f"{job.model.dense_flops() / 1e6:.1f}M MACs, target {100 * cfg.target_flops:g}% FLOPs, "
                        f"{cfg.epochs} epochs x {job.steps_per_epoch} steps"
                        + (f", {job.world} processes" if job.world > 1 else ""))
    t_start = time.perf_counter() - job.elapsed_before
    ran = 0
    for epoch in range(job.start_epoch, cfg.epochs):
        if cfg.stop_after is not None and ran >= cfg.stop_after:
            break
        t0 = time.perf_counter()
        sums, n, stopped = train_epoch(job, epoch, ran)
        if stopped is not None:
            barrier()
            raise stopped
        end_epoch(job, epoch, sums, n, time.perf_counter() - t0, t_start, test_loader)
        ran += 1
        barrier()
    done = job.start_epoch + ran
    if done < cfg.epochs:  # --stop-after: leave the checkpoint for --resume
        _log(cfg, job.rank, f"stopped after epoch {done} of {cfg.epochs} (--stop-after); continue with --resume")
        return {"stopped_after_epoch": done, "checkpoint": str(job.ck_path)}
    summary = _finish(cfg, job.model, job.train_ds, job.test_ds, test_loader, job.device, job.rank, job.history,
                      job.n_cls, job.in_ch, job.size, time.perf_counter() - t_start)
    barrier()
    return summary


def _finish(cfg, model, train_ds, test_ds, test_loader, device, rank, history, n_cls, in_ch, size, wall) -> dict:
    if rank != 0:
        return {}
    out = Path(cfg.out)
    recal = 0
    if cfg.recalibrate_bn > 0:
        g = torch.Generator().manual_seed(cfg.seed + 99)
        loader = torch.utils.data.DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True, generator=g,
                                             drop_last=True)
        recal = recalibrate_bn(model, loader, cfg.recalibrate_bn, device, branch="hard")
    final = evaluate(model, test_loader, device, branches=("soft", "hard"))
    pruned = model.export()
    exported_top1 = evaluate(pruned, test_loader, device)["top1"]
    spec = {"name": cfg.model, "num_classes": n_cls, "in_channels": in_ch, "image_size": size,
            "widths": list(cfg.widths) if cfg.widths else None}
    save(model, out / "s2h_model.pt", spec=spec)  # s2h.load(path) rebuilds both without a factory
    save(pruned, out / "pruned.pt", spec=spec)
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
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    if not summary["exported_matches_hard"]:
        _log(cfg, rank, f"warning: the exported model's top-1 ({exported_top1:.2f}%) differs from the hard "
                        f"branch's ({final['hard_top1']:.2f}%)")
    _log(cfg, rank, f"done: soft {final['soft_top1']:.2f}%  hard {final['hard_top1']:.2f}%  exported "
                    f"{exported_top1:.2f}%  at {summary['hard_flops_pct']:.1f}% FLOPs "
                    f"({n_pruned / 1e3:.1f}k of {n_dense / 1e3:.1f}k parameters); wrote {out}/")
    return summary


def main(args: argparse.Namespace) -> dict:
    cfg = config_from_args(args)
    try:
        return run(cfg, resume=args.resume)
    except (TrainingStopped, NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(3) from None
