"""CPU performance helpers: the glibc allocator setting for training, forward latency."""
from __future__ import annotations

import sys
import time

import torch
from torch import nn

__all__ = ["tune_cpu_allocator", "cpu_latency_ms"]


def tune_cpu_allocator() -> bool:
    """Keep freed heap memory in the process (glibc ``mallopt``): returns True if applied.

    The S2H step frees and re-allocates a few hundred MB per step (two graphs, two backward passes);
    glibc trims that back to the OS and page-faults it in again on the next step, a noticeable
    share of a ResNet-56 step on the CPU (benchmarks/results/step_cpu.md). Raising
    M_TRIM_THRESHOLD and M_MMAP_THRESHOLD stops it (the process keeps its peak heap, as it would
    with jemalloc/tcmalloc). No effect on other platforms.
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
