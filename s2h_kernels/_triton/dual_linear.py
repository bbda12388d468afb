"""Triton kernel of s2h::dual_linear_triton (imported only with triton installed).

The output is tiled like a GEMM. Each program owns one ``[BLOCK_M, BLOCK_N]`` tile of both outputs
and walks K in two loops: over ``[0, k_split)`` it loads one ``[BLOCK_N, BLOCK_K]`` tile of W per
step and feeds it to both products (W crosses the memory bus once for both branches); over
``[k_split, K)`` it runs the soft product alone. ``k_split`` is K_IN rounded up to BLOCK_K where the
tile overlaps the hard ``k_out x k_in`` block, else 0. The loads sit in the loop bodies with no
branch around them (bounds are masks, not ``if``), so Triton's software pipeliner prefetches them
``num_stages - 1`` steps ahead (cp.async on sm_80, TMA-free async copies on sm_90). Columns of the
hard tile at or past K_OUT are computed with W's full rows and never stored; x_hard's columns past
K_IN load as 0, so they add nothing.

Block sizes: :func:`launch_config` (one config, the default, always used under the interpreter so
that the CPU tests are deterministic) and on the GPU an autotuner over :data:`CONFIGS` for the
dtype (key: N, K and the power-of-two bucket of the row count). Semantics: s2h_kernels/dual_linear.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreted


@triton.jit
def dual_linear_kernel(
    xs_ptr, xh_ptr, w_ptr, b_ptr, ys_ptr, yh_ptr,
    M_S, M_H, N, K, K_OUT, K_IN, M_BUCKET,
    s_xs_m, s_xs_k, s_xh_m, s_xh_k, s_w_n, s_w_k, s_ys_m, s_ys_n, s_yh_m, s_yh_n,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_s = offs_m < M_S
    m_h = offs_m < M_H
    n_s = offs_n < N
    n_h = offs_n < K_OUT
    do_soft = (pid_m * BLOCK_M < M_S).to(tl.int32)
    do_hard = ((pid_m * BLOCK_M < M_H) & (pid_n * BLOCK_N < K_OUT)).to(tl.int32)
    k_split = do_hard * (tl.cdiv(K_IN, BLOCK_K) * BLOCK_K)
    k_end = do_soft * K + (1 - do_soft) * k_split  # a tile past the soft rows: no soft-only steps
    xs_ptrs = xs_ptr + offs_m[:, None] * s_xs_m + offs_k[None, :] * s_xs_k
    xh_ptrs = xh_ptr + offs_m[:, None] * s_xh_m + offs_k[None, :] * s_xh_k
    w_ptrs = w_ptr + offs_n[:, None] * s_w_n + offs_k[None, :] * s_w_k
    acc_s = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    acc_h = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    # Both products: one W tile for two dots.
    for k0 in range(0, k_split, BLOCK_K):
        kk = k0 + offs_k
        w = tl.load(w_ptrs + k0 * s_w_k, mask=n_s[:, None] & (kk[None, :] < K), other=0.0)
        xs = tl.load(xs_ptrs + k0 * s_xs_k, mask=m_s[:, None] & (kk[None, :] < K), other=0.0)
        xh = tl.load(xh_ptrs + k0 * s_xh_k, mask=m_h[:, None] & (kk[None, :] < K_IN), other=0.0)
        if UPCAST:  # the interpreter's numpy dot has no bf16
            w, xs, xh = w.to(tl.float32), xs.to(tl.float32), xh.to(tl.float32)
        wt = tl.trans(w)
        acc_s += tl.dot(xs, wt, input_precision=PRECISION, out_dtype=ACC)
        acc_h += tl.dot(xh, wt, input_precision=PRECISION, out_dtype=ACC)
    # The soft product alone over the rest of K.
    for k0 in range(k_split, k_end, BLOCK_K):
        kk = k0 + offs_k
        w = tl.load(w_ptrs + k0 * s_w_k, mask=n_s[:, None] & (kk[None, :] < K), other=0.0)
        xs = tl.load(xs_ptrs + k0 * s_xs_k, mask=m_s[:, None] & (kk[None, :] < K), other=0.0)
        if UPCAST:
            w, xs = w.to(tl.float32), xs.to(tl.float32)
        acc_s += tl.dot(xs, tl.trans(w), input_precision=PRECISION, out_dtype=ACC)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_s, other=0.0).to(ACC)
        acc_s += bias[None, :]
        acc_h += bias[None, :]
    tl.store(ys_ptr + offs_m[:, None] * s_ys_m + offs_n[None, :] * s_ys_n,
             acc_s.to(ys_ptr.dtype.element_ty), mask=m_s[:, None] & n_s[None, :])
    tl.store(yh_ptr + offs_m[:, None] * s_yh_m + offs_n[None, :] * s_yh_n,
             acc_h.to(yh_ptr.dtype.element_ty), mask=m_h[:, None] & n_h[None, :])


def _kind(dtype: torch.dtype, precision: str = "ieee") -> str:
    if dtype == torch.float64:
        return "fp64"
    if dtype == torch.float32:
        return "tf32" if precision == "tf32" else "fp32"
    return "16bit"


def _cfg(bm, bn, bk, warps, stages) -> dict:
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)


# GPU configs per input kind: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages). Two [BLOCK_M, BLOCK_N]
# accumulators live in registers, so the tiles are about half a plain GEMM's; every config compiles
# without spills and at >= 25% theoretical occupancy on H100 (benchmarks/results/gpu_static.md).
# "16bit" and "tf32" run on tensor cores (mma on sm_80, wgmma on sm_90 for BLOCK_M >= 64); "fp32"
# is fp32 with TF32 not allowed (torch's default): FMA, smaller tiles (the FMA dot holds more per
# thread); "fp64" runs DMMA, BLOCK_M x BLOCK_N <= 2048 (64 x 64 at 4 warps took 255 registers and
# spilled ~400 B). Register counts were read from ptxas for both archs; on A100 (sm_80, mma.sync
# instead of wgmma) the 16-bit 64 x 64 config needs 140 registers (12.5%): the autotuner there
# weighs it against the 25% ones by measured time.
CONFIGS = {
    "16bit": [_cfg(64, 64, 32, 8, 3), _cfg(32, 64, 64, 4, 4), _cfg(64, 128, 32, 8, 3)],
    "tf32": [_cfg(64, 64, 16, 8, 3), _cfg(32, 64, 32, 4, 4), _cfg(64, 128, 32, 8, 3)],
    "fp32": [_cfg(64, 64, 16, 8, 3), _cfg(32, 32, 32, 4, 3), _cfg(32, 64, 16, 4, 3)],
    "fp64": [_cfg(64, 32, 16, 8, 3), _cfg(32, 32, 16, 4, 2)],
}


def launch_config(m: int, dtype: torch.dtype, precision: str | None = None) -> dict:
    """The default config for ``m`` rows of ``dtype`` (``precision``: "tf32" or "ieee", default
    from torch's allow_tf32): the one the interpreter always runs, so the CPU tests are
    deterministic. Small batches (m <= 32) take the kind's 32-row config (its second), others its
    first. On the GPU the autotuner chooses among CONFIGS[kind]."""
    return dict(CONFIGS[_kind(dtype, precision or _precision(dtype))][1 if m <= 32 else 0])


# Which kind each autotune config belongs to (pruned by the input dtype before benchmarking).
_KIND_OF: dict[int, str] = {}


def _autotune_configs() -> list:
    out = []
    for kind, cfgs in CONFIGS.items():
        for c in cfgs:
            cfg = triton.Config({k: v for k, v in c.items() if k.startswith("BLOCK")},
                                num_warps=c["num_warps"], num_stages=c["num_stages"])
            _KIND_OF[id(cfg)] = kind
            out.append(cfg)
    return out


def _prune(configs, named_args, **kwargs):
    kind = _kind(named_args["xs_ptr"].dtype, kwargs.get("PRECISION", "ieee"))
    return [c for c in configs if _KIND_OF.get(id(c)) == kind]


dual_linear_autotuned = triton.autotune(
    configs=_autotune_configs(), key=["M_BUCKET", "N", "K"], prune_configs_by={"early_config_prune": _prune},
)(dual_linear_kernel)


def _precision(dtype: torch.dtype) -> str:
    # follow torch's own fp32 matmul setting, so the kernel matches F.linear's precision: TF32
    # tensor cores only when the user allowed them (torch.backends.cuda.matmul.allow_tf32)
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def forward(
    x_soft: torch.Tensor, x_hard: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    k_out: int, k_in: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = weight.shape
    m_s, m_h = x_soft.shape[0], x_hard.shape[0]
    ys = x_soft.new_empty(m_s, n)
    yh = x_hard.new_empty(m_h, k_out)
    if ys.numel() == 0 and yh.numel() == 0:
        return ys, yh
    m = max(m_s, m_h, 1)
    interpreted = triton_interpreted()
    args = (x_soft, x_hard, weight, bias if bias is not None else weight, ys, yh,
            m_s, m_h, n, k, k_out, k_in, triton.next_power_of_2(m),
            x_soft.stride(0), x_soft.stride(1), x_hard.stride(0), x_hard.stride(1),
            weight.stride(0), weight.stride(1), ys.stride(0), ys.stride(1), yh.stride(0), yh.stride(1))
    consts = dict(HAS_BIAS=bias is not None, ACC=_acc(x_soft.dtype), PRECISION=_precision(x_soft.dtype),
                  UPCAST=x_soft.dtype == torch.bfloat16 and interpreted)
    if interpreted:
        cfg = launch_config(m, x_soft.dtype, consts["PRECISION"])
        grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
        dual_linear_kernel[grid](*args, **consts, **cfg)
    else:
        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))
        dual_linear_autotuned[grid](*args, **consts)
    return ys, yh


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32
