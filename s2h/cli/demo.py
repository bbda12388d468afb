"""``python -m s2h demo`` (what ``make demo`` runs): S2HPruner end to end on real data, offline, on a CPU.

scikit-learn's bundled digits (1,797 real 8x8 handwritten digits) upscaled to 32x32; a small
CIFAR-style ResNet; S2HPruner to 15% of the dense FLOPs in one stage (``python -m s2h prune``'s
loop); a dense baseline trained on the same data with the same optimiser and LR schedule (8 epochs,
where it has converged). It prints the dense, soft
and hard top-1, the hard FLOPs, and the exported model's CPU latency against the dense one, and
writes ``trajectory.png``, ``architecture.png``, ``log.jsonl``, ``pruned.pt``, ``summary.json``
(the prune run's) and ``demo.json`` into ``--out``. Deterministic for a given ``--seed`` (every
number but the timings).
"""
from __future__ import annotations

import argparse
import math
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import get_dataset
from ..engine.evaluation import evaluate
from ..engine.loaders import epoch_batches, subset
from ..engine.perf import cpu_latency_ms, tune_cpu_allocator
from ..engine.seeding import seed_epoch
from ..models import build_model
from ..structured.io import load
from ..structured.step_base import DEFAULTS as S2H_DEFAULTS
from .prune import PruneConfig, run

# The S2H settings are the package defaults (S2HPruner's and prune's: Adam 0.02 on the masks, β = γ = 1,
# R on the hard network's FLOPs). With the paper's CNN setting (0.5, 5, R on the expected FLOPs), meant
# for 500 epochs, the distillation term dominates θ's early updates (a 10-epoch run on digits ended at
# 81%) and the hard network ends near 17% instead of 15%.
DEFAULTS = dict(model="resnet8", epochs=14, dense_epochs=8, batch_size=64, lr=0.1, mask_lr=S2H_DEFAULTS["mask_lr"],
                target_flops=0.15, ce_coef=S2H_DEFAULTS["ce_coef"], gap_coef=S2H_DEFAULTS["gap_coef"],
                hard_width="threshold", resource_target=S2H_DEFAULTS["resource_target"])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=DEFAULTS["model"], help="a CIFAR ResNet (resnet8/14/20/...)")
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"], help="S2H epochs")
    p.add_argument("--dense-epochs", type=int, default=DEFAULTS["dense_epochs"], help="dense baseline epochs")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    p.add_argument("--mask-lr", type=float, default=DEFAULTS["mask_lr"])
    p.add_argument("--target-flops", type=float, default=DEFAULTS["target_flops"])
    p.add_argument("--ce-coef", type=float, default=DEFAULTS["ce_coef"], help="beta")
    p.add_argument("--gap-coef", type=float, default=DEFAULTS["gap_coef"], help="gamma")
    p.add_argument("--hard-width", choices=("threshold", "expected"), default=DEFAULTS["hard_width"])
    p.add_argument("--resource-target", choices=("soft", "hard"), default=DEFAULTS["resource_target"])
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--max-train-samples", type=int, default=None, help="(tests) a seeded subset of the training split")
    p.add_argument("--no-progress", action="store_true")


def train_dense(model_name: str, epochs: int, batch_size: int, lr: float, seed: int, train_ds, test_ds,
                progress: bool = True):
    """The dense baseline: the same network, optimiser and schedule as the prune run, no masks."""
    torch.manual_seed(seed)
    net = build_model(model_name, 10, 1, 32)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=3e-4)
    per_epoch = len(train_ds) // batch_size
    total = max(1, epochs * per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 0.5 * (1 + math.cos(math.pi * min(1.0, it / total))))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs * per_epoch, desc="dense baseline", leave=False, dynamic_ncols=True, file=sys.stderr)
    net.train()
    for e in range(epochs):
        seed_epoch(seed, e, 0)
        for b in epoch_batches(len(train_ds), batch_size, seed, e):
            xs, ys = zip(*(train_ds[i] for i in b))
            x, y = torch.stack(xs), torch.tensor(ys)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            opt.step()
            sched.step()
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    loader = torch.utils.data.DataLoader(test_ds, batch_size=256)
    return net.eval(), evaluate(net, loader, torch.device("cpu"))["top1"]


def main(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    tune_cpu_allocator()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not 0.0 < args.target_flops <= 1.0:
        raise ValueError(f"demo: --target-flops must be in (0, 1], got {args.target_flops}")
    progress = not args.no_progress
    print(f"s2h demo: S2HPruner on scikit-learn's digits (32x32), {args.model}, target "
          f"{100 * args.target_flops:g}% FLOPs, {args.threads} threads")

    train_ds = subset(get_dataset("digits", train=True, image_size=32), args.max_train_samples, args.seed)
    test_ds = get_dataset("digits", train=False, image_size=32)
    t_dense = time.perf_counter()
    dense, dense_top1 = train_dense(args.model, args.dense_epochs, args.batch_size, args.lr, args.seed, train_ds,
                                    test_ds, progress)
    t_dense = time.perf_counter() - t_dense
    print(f"dense baseline: {dense_top1:.2f}% top-1 after {args.dense_epochs} epochs ({t_dense:.0f}s)")

    cfg = PruneConfig(out=str(out), model=args.model, data="digits", image_size=32, epochs=args.epochs,
                      batch_size=args.batch_size, lr=args.lr, mask_lr=args.mask_lr, target_flops=args.target_flops,
                      seed=args.seed, progress=progress, max_train_samples=args.max_train_samples,
                      threads=args.threads, device="cpu", ce_coef=args.ce_coef, gap_coef=args.gap_coef,
                      hard_width=args.hard_width, resource_target=args.resource_target)
    t_s2h = time.perf_counter()
    summary = run(cfg)
    t_s2h = time.perf_counter() - t_s2h

    pruned = load(out / "pruned.pt").eval()  # the file records its build_model arguments
    lat = {}
    for bs in (1, 64):
        ex = torch.randn(bs, 1, 32, 32, generator=torch.Generator().manual_seed(0))
        lat[bs] = (cpu_latency_ms(dense, ex), cpu_latency_ms(pruned, ex))
    n_dense = sum(p.numel() for p in dense.parameters())
    n_pruned = sum(p.numel() for p in pruned.parameters())
    total = time.perf_counter() - t0
    res = {
        "model": args.model, "seed": args.seed, "threads": args.threads, "target_flops": args.target_flops,
        "dense_top1": dense_top1, "soft_top1": summary["soft_top1"], "hard_top1": summary["hard_top1"],
        "exported_top1": summary["exported_top1"], "hard_flops_pct": summary["hard_flops_pct"],
        "dense_macs": summary["dense_macs"], "hard_macs": summary["hard_macs"],
        "params_dense": n_dense, "params_pruned": n_pruned,
        "latency_ms": {f"batch{bs}": {"dense": d, "pruned": p, "speedup": d / p} for bs, (d, p) in lat.items()},
        "time_s": {"dense_baseline": t_dense, "s2h": t_s2h, "total": total},
        "epochs": {"s2h": args.epochs, "dense": args.dense_epochs},
    }
    (out / "demo.json").write_text(json.dumps(res, indent=2))
    w = 34
    print()
    print(f"{'':{w}s}{'top-1':>9s}{'MACs':>10s}{'params':>10s}{'latency b=1':>13s}{'b=64':>10s}")
    print(f"{'dense ' + args.model:{w}s}{dense_top1:8.2f}%{summary['dense_macs'] / 1e6:9.1f}M{n_dense / 1e3:9.1f}k"
          f"{lat[1][0]:11.2f}ms{lat[64][0]:8.1f}ms")
    print(f"{'S2H soft network (θ⊙w)':{w}s}{summary['soft_top1']:8.2f}%")
    print(f"{'S2H hard network (exported)':{w}s}{summary['exported_top1']:8.2f}%{summary['hard_macs'] / 1e6:9.1f}M"
          f"{n_pruned / 1e3:9.1f}k{lat[1][1]:11.2f}ms{lat[64][1]:8.1f}ms")
    print(f"\nhard network: {summary['hard_flops_pct']:.1f}% of the dense FLOPs (target {100 * args.target_flops:g}%), "
          f"{100 * n_pruned / n_dense:.1f}% of the parameters; CPU latency {lat[1][0] / lat[1][1]:.2f}x faster at "
          f"batch 1, {lat[64][0] / lat[64][1]:.2f}x at batch 64 ({args.threads} threads)")
    print(f"hard-branch top-1 {summary['hard_top1']:.2f}% = exported top-1 {summary['exported_top1']:.2f}%: "
          f"{'yes' if summary['exported_matches_hard'] else 'NO'}")
    print(f"wrote {out}/: trajectory.png, architecture.png, log.jsonl, pruned.pt, summary.json, demo.json "
          f"({total:.0f}s in all: dense {t_dense:.0f}s, S2H {t_s2h:.0f}s)")
    return res
