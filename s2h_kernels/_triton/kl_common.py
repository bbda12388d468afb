"""Triton helpers shared by the KL kernels (kl_gap, ca_kld); imported only with triton installed."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def rescale(acc, old):
    # acc * old, where a 0 factor drops acc (its terms are underflowed probabilities).
    return tl.where(old == 0, 0.0, acc * old)


@triton.jit
def pmul(e, f):
    # e * f with 0 * anything = 0 when e == 0 (a zero probability contributes nothing).
    return tl.where(e == 0, 0.0, e * f)


def acc_torch(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of the per-row losses: float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


# Largest chunk of classes a program holds at once; the loop handles any C. Tests lower it to
# exercise the multi-chunk path with small C.
MAX_BLOCK = 4096
# Elements of one [ROWS, BLOCK] tile per thread for long rows. Each program holds a few tiles of
# this size live (both rows' logits, exponentials, the gradient terms) besides its per-row state,
# so this sets the registers per thread: 8 fp32 values (4 fp64, two registers each) keep kl_gap
# and top1 at <= 64 registers on sm_80 / sm_90, i.e. >= 50% theoretical occupancy
# (benchmarks/results/gpu_static.md).
ELEMS_PER_THREAD = {"fp32": 8, "fp64": 4}
# Short rows: ROWS rows per program, a [ROWS, BLOCK] tile of SHORT_TILE elements on 4 warps (2 per
# thread, 1 in fp64). One row per 1-warp program (the old choice) capped occupancy at 50% (32 resident
# blocks per SM); 4 elements per thread and more cost registers (the per-row state is replicated
# across the threads that share a row).
SHORT_TILE = {"fp32": 256, "fp64": 128}
MIN_WARPS = 4
# Rows shorter than this are padded to it: [ROWS, 2..8] tiles spread one row over threads in a way
# that replicates the per-row state (72-160 registers in ca_kld); [ROWS, 16] tiles do not.
MIN_BLOCK = 16
MAX_WARPS = 16


def launch_config(C: int, dtype: torch.dtype, elems_per_thread: dict | None = None, max_warps: int = MAX_WARPS,
                  short_tile: dict | None = None, min_rows: int = 1) -> dict:
    """Block sizes of the KL kernels (kl_gap, ca_kld, top1) for rows of C classes of ``dtype``.

    A program takes a ``[ROWS, BLOCK]`` tile: BLOCK = next power of two of C up to a cap (longer
    rows loop over chunks) with ``elems_per_thread`` elements per thread; short rows (fewer than
    MIN_WARPS warps' worth) go ROWS at a time in SHORT_TILE tiles. The same choice on the GPU and
    under the interpreter (it depends on the shape only), so the interpreted tests run the tiles
    the GPU runs.
    """
    kind = "fp64" if dtype == torch.float64 else "fp32"
    ept = (elems_per_thread or ELEMS_PER_THREAD)[kind]
    block = min(max(triton.next_power_of_2(max(int(C), 1)), MIN_BLOCK), MAX_BLOCK, max_warps * 32 * ept)
    if block < MIN_WARPS * 32 * ept:
        tile = (short_tile or SHORT_TILE)[kind]
        rows = max(1, tile // block)
        if rows < min_rows and min_rows * block <= 2 * tile:  # at most twice the short tile
            rows = min_rows
        return dict(ROWS=rows, BLOCK=block, num_warps=MIN_WARPS)
    return dict(ROWS=1, BLOCK=block, num_warps=min(max_warps, block // (32 * ept)))
