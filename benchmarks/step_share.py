"""Each fused op's share of a ResNet-50 S2H training step on the CPU, and the step with the best eager
baseline (benchmarks/baselines.py) in the op's place (issue 18).

    python benchmarks/step_share.py [--threads 2] [--batch 16] [--size 64] [--rounds 5]

ResNet-50 (torchvision, 100 classes) converted with ``s2h.convert`` at 15% target FLOPs, masks at
init (u = 0), ``S2HPruner.step`` with lr 0 (every step starts from the same state). Two measurements,
interleaved in one process:

* the ops alone at the step's shapes: ``channel_masks`` forward + backward on the model's groups
  (its offsets and divisors, as the step calls it) and ``kl_gap_with_grads`` at (batch, 100), fused
  and best eager; their share = op time / fused step time;
* whole steps: fused, and with each op replaced by its best eager baseline (the step module's
  ``channel_masks`` / ``kl_gap_with_grads`` names patched), minimum over rounds.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import baselines  # noqa: E402
import s2h  # noqa: E402
import s2h.structured.step as step_mod  # noqa: E402
import s2h_kernels  # noqa: E402
from s2h.engine.perf import tune_cpu_allocator  # noqa: E402
from s2h.structured.step import S2HPruner  # noqa: E402


@contextlib.contextmanager
def patched(**names):
    old = {k: getattr(step_mod, k) for k in names}
    for k, v in names.items():
        setattr(step_mod, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(step_mod, k, v)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tune_cpu_allocator()
    torch.manual_seed(0)
    net = torchvision.models.resnet50(num_classes=100)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 100, (args.batch,))
    model = s2h.convert(net, x[:2], target_flops=0.15)
    model.train()
    opt = torch.optim.SGD(model.weight_parameters(), lr=0.0, momentum=0.9)
    tr = S2HPruner(model, opt, torch.optim.SGD(model.mask_parameters(), lr=0.0))

    # the ops at the step's shapes
    u = model.u.detach().clone().requires_grad_(True)
    offsets = model.group_offsets
    divisors = getattr(tr, "_divisors", None)
    n_ch = s2h_kernels.channel_masks(u.detach(), offsets, divisors=divisors)[0].shape[0]
    gw, ge = torch.randn(n_ch), torch.randn(offsets.shape[0] - 1)

    def masks(fn):
        u.grad = None
        w, e, _ = fn(u, offsets, temperature=model.temperature, divisors=divisors, hard_width=model.hard_width)
        torch.autograd.backward((w, e), (gw, ge))

    s, h = torch.randn(args.batch, 100), torch.randn(args.batch, 100)
    ops = {
        "channel_masks fused": lambda: masks(s2h_kernels.channel_masks),
        "channel_masks best eager": lambda: masks(baselines.channel_masks_flat_cf),
        "kl_gap_with_grads fused": lambda: s2h_kernels.kl_gap_with_grads(s, h, 1.0, "batchmean"),
        "kl_gap_with_grads best eager": lambda: baselines.kl_gap_with_grads_eager(s, h, 1.0, "batchmean"),
    }

    def step_with(**names):
        def run():
            with patched(**names):
                tr.step(x, y)
        return run

    steps = {
        "step fused": step_with(),
        "step, channel_masks best eager": step_with(channel_masks=baselines.channel_masks_flat_cf),
        "step, kl_gap_with_grads best eager": step_with(kl_gap_with_grads=baselines.kl_gap_with_grads_eager),
    }
    op_t = {k: min(v) for k, v in baselines.interleaved(ops, rounds=15).items()}
    for fn in steps.values():
        fn()
    st = {k: [] for k in steps}
    for _ in range(args.rounds):
        for k, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            st[k].append(time.perf_counter() - t0)
    step_t = {k: min(v) for k, v in st.items()}
    T = step_t["step fused"]
    G = offsets.shape[0] - 1
    print(f"ResNet-50 S2H step, batch {args.batch}, {args.size}x{args.size}, 100 classes, {args.threads} thread(s), "
          f"{G} groups / {u.shape[0]} buckets / {n_ch} channels; hard FLOPs {model.hard_flops() / model.dense_flops():.0%}; "
          f"load average {os.getloadavg()[0]:.1f}; minimum over rounds ({args.rounds} steps, 15 op rounds)\n")
    print("| op | fused | best eager | share of the fused step: fused | with best eager |")
    print("|---|---|---|---|---|")
    for op in ("channel_masks", "kl_gap_with_grads"):
        f, b = op_t[f"{op} fused"], op_t[f"{op} best eager"]
        print(f"| {op} | {f * 1e6:.0f} us | {b * 1e6:.0f} us ({b / f:.1f}x) | {f / T:.3%} | {b / (T - f + b):.3%} |")
    print()
    print("| step | min (s) | vs fused |")
    print("|---|---|---|")
    for k, v in step_t.items():
        print(f"| {k} | {v:.3f} | {v / T:.3f}x |")


if __name__ == "__main__":
    main()
