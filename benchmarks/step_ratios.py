"""Interleaved timing of one ResNet-56 training step (batch 64, 32x32): dense, literal reference, fused.

    OMP_WAIT_POLICY=passive python benchmarks/step_ratios.py --rounds 7 --out benchmarks/results/step_cpu.md

Round-robin over the variants (so load from other processes hits all of them alike), min and median
over rounds. Variants: the dense step, S2HReference, S2HPruner, S2HPruner with the hard branch in
channels-last (``hard_channels_last=True``), and all three again with the model and input in
channels-last. ``--no-malloc-tune`` leaves glibc's trimming on (see
``s2h.train.tune_cpu_allocator``).
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import s2h  # noqa: E402
from s2h.structured.reference import S2HReference  # noqa: E402
from s2h.engine.perf import tune_cpu_allocator  # noqa: E402
from s2h.structured.step import S2HPruner  # noqa: E402
from test_bench_step import BATCH, CLASSES, SIZE, _trainer, set_hard_flops  # noqa: E402


def variants(state: str, channels_last: bool):
    torch.manual_seed(0)
    net = s2h.models.resnet56(CLASSES)
    x = torch.randn(BATCH, 3, SIZE, SIZE)
    y = torch.randint(0, CLASSES, (BATCH,))
    model = s2h.convert(net, x[:2], target_flops=0.15)
    model.train()
    f = set_hard_flops(model, 0.15) if state == "flops15" else model.hard_flops() / model.dense_flops()
    tag = ""
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
        tag = " (channels-last)"
    opt = torch.optim.SGD(net.parameters(), lr=0.0, momentum=0.9, weight_decay=3e-4)

    def dense():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        opt.step()

    ref = _trainer(S2HReference, copy.deepcopy(model))
    fused = _trainer(S2HPruner, copy.deepcopy(model))
    out = {"dense" + tag: dense, "reference" + tag: lambda: ref.step(x, y), "fused" + tag: lambda: fused.step(x, y)}
    if not channels_last:
        fused_cl = _trainer(S2HPruner, copy.deepcopy(model), hard_channels_last=True)
        out["fused, hard branch channels-last"] = lambda: fused_cl.step(x, y)
    return out, f


def measure(fns: dict, rounds: int, clock) -> dict:
    for fn in fns.values():  # warm-up
        fn()
    ts = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = clock()
            fn()
            ts[k].append(clock() - t0)
    return {k: (min(v), statistics.median(v)) for k, v in ts.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-malloc-tune", action="store_true")
    ap.add_argument("--no-channels-last", action="store_true")
    ap.add_argument("--out", default=None, help="append a markdown section to this file")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = ap.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads)
    tuned = False if args.no_malloc_tune else tune_cpu_allocator()
    lines = []
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines.append(f"### {args.threads} thread(s), {args.clock} clock, allocator tuning {'on' if tuned else 'off'}, "
                 f"{args.rounds} rounds\n")
    lines.append(f"{cpu}; torch {torch.__version__}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; "
                 f"load average at start {load:.1f} (shared machine)\n")
    lines.append(f"clock: {args.clock} time per step (cpu: process CPU time, all threads)\n")
    lines.append("| state | step | min (s) | median (s) | vs dense (min) | vs dense (median) | "
                 "reference / this (min) | reference / this (median) |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for state in ("init", "flops15"):
        fns, f = variants(state, False)
        if not args.no_channels_last:  # measured in the same round-robin, so the load hits both alike
            fns.update(variants(state, True)[0])
        res = measure(fns, args.rounds, clock)
        n0 = len(lines)
        for k, (mn, md) in res.items():
            tag = " (channels-last)" if k.endswith("(channels-last)") else ""
            d, r = res["dense" + tag], res["reference" + tag]
            lines.append(f"| {state} ({100 * f:.0f}% hard FLOPs) | {k} | {mn:.3f} | {md:.3f} | "
                         f"{mn / d[0]:.2f}x | {md / d[1]:.2f}x | {r[0] / mn:.2f}x | {r[1] / md:.2f}x |")
        print("\n".join(lines[n0:]), flush=True)
    text = "\n".join(lines) + "\n\n"
    print(text)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
