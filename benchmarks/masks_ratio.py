"""Interleaved timing of channel_masks forward+backward: fused op vs eager per-group PyTorch, in one process.

    python benchmarks/masks_ratio.py [--rounds 30]

On a VM whose small-op speed changes from one process to the next, only a ratio measured within
one process, with the two variants alternating, is meaningful (benchmarks/results/masks_cpu.md).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import s2h_kernels  # noqa: E402
from s2h_kernels import reference  # noqa: E402
from test_bench_channel_masks import packed_inputs, step  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    u, offsets, grads = packed_inputs("cpu")
    offs = offsets.tolist()
    variants = {
        "fused": (100, lambda: step(s2h_kernels.channel_masks, u, offsets, grads)),
        "eager": (3, lambda: step(lambda u, o: reference.channel_masks(u, offs), u, offsets, grads)),
    }
    best = {k: float("inf") for k in variants}
    for _ in range(args.rounds):
        for k, (reps, fn) in variants.items():
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            best[k] = min(best[k], (time.perf_counter() - t0) / reps)
    print(f"eager {best['eager'] * 1e3:.2f} ms, fused {best['fused'] * 1e6:.1f} us, "
          f"eager / fused {best['eager'] / best['fused']:.1f}x (minimum over {args.rounds} rounds)")


if __name__ == "__main__":
    main()
