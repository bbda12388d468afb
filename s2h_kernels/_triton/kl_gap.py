"""Triton kernel of s2h::kl_gap_triton (imported only with triton installed): each program takes
ROWS rows (more than one for short rows, so that a program has several warps) and loops over
BLOCK-class chunks (online softmax, any C). Math: s2h_kernels/kl_gap.py, csrc/common/kl_gap.h.
Block sizes: kl_common.launch_config.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import kl_common
from .kl_common import pmul, rescale


@triton.jit
def kl_gap_kernel(
    s_ptr, h_ptr, loss_ptr, gs_ptr, gh_ptr, B, C, stride_s, stride_h, stride_g, inv_t, gscale,
    ROWS: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    live = rows < B
    s_row = s_ptr + rows[:, None] * stride_s
    h_row = h_ptr + rows[:, None] * stride_h
    g_off = rows[:, None] * stride_g
    offs = tl.arange(0, BLOCK)[None, :]
    ms = tl.full([ROWS], float("-inf"), ACC)
    mh = tl.full([ROWS], float("-inf"), ACC)
    zs = tl.zeros([ROWS], ACC)
    zh = tl.zeros([ROWS], ACC)
    w = tl.zeros([ROWS], ACC)
    # Pass 1: online softmax of both rows and w = sum_j exp(a_j - ms) (a_j - b_j).
    for c in range(0, C, BLOCK):
        valid = live[:, None] & (c + offs < C)
        a = tl.load(s_row + c + offs, mask=valid, other=float("-inf")).to(ACC) * inv_t
        b = tl.load(h_row + c + offs, mask=valid, other=float("-inf")).to(ACC) * inv_t
        ms_new = tl.maximum(ms, tl.max(a, axis=1))
        sh = tl.where(ms_new == float("-inf"), 0.0, ms_new)
        es = tl.exp(a - sh[:, None])
        old = tl.exp(ms - sh)
        zs = zs * old + tl.sum(es, axis=1)
        w = rescale(w, old) + tl.sum(pmul(es, a - b), axis=1)
        ms = ms_new
        mh_new = tl.maximum(mh, tl.max(b, axis=1))
        sh = tl.where(mh_new == float("-inf"), 0.0, mh_new)
        zh = zh * tl.exp(mh - sh) + tl.sum(tl.exp(b - sh[:, None]), axis=1)
        mh = mh_new
    # log p = (a - ms) - lzs, in that order: the largest logit's log p is exact even for huge |a|.
    # (Rows past B are all -inf: their d is NaN, never stored.)
    lzs = tl.log(zs)
    lzh = tl.log(zh)
    d = w / zs - ((ms - mh) + (lzs - lzh))
    # Pass 2: both gradients.
    for c in range(0, C, BLOCK):
        valid = live[:, None] & (c + offs < C)
        a = tl.load(s_row + c + offs, mask=valid, other=float("-inf")).to(ACC) * inv_t
        b = tl.load(h_row + c + offs, mask=valid, other=float("-inf")).to(ACC) * inv_t
        ls = (a - ms[:, None]) - lzs[:, None]
        lh = (b - mh[:, None]) - lzh[:, None]
        p = tl.exp(ls)
        q = tl.exp(lh)
        gh = (q - p) * gscale
        gs = pmul(p, ls - lh - d[:, None]) * gscale
        tl.store(gs_ptr + g_off + c + offs, gs.to(gs_ptr.dtype.element_ty), mask=valid)
        tl.store(gh_ptr + g_off + c + offs, gh.to(gh_ptr.dtype.element_ty), mask=valid)
    tl.store(loss_ptr + rows, d, mask=live)


def launch_config(C: int, dtype: torch.dtype) -> dict:
    """The kernel's block sizes for rows of C classes (kl_common.launch_config), two rows per
    short-row program where that is at most twice the short tile (ptxas spilled 16 B in fp64
    [1, 128] on sm_80; [2, 128] does not; [2, 256] in fp64 would need 90 registers)."""
    return kl_common.launch_config(C, dtype, min_rows=2)


def kl_gap(
    soft: torch.Tensor, hard: torch.Tensor, temperature: float, grad_scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    soft, hard = soft.contiguous(), hard.contiguous()
    B, C = soft.shape
    loss = soft.new_empty(B, dtype=kl_common.acc_torch(soft.dtype))
    gs = torch.empty_like(soft)
    gh = torch.empty_like(hard)
    cfg = launch_config(C, soft.dtype)
    kl_gap_kernel[(triton.cdiv(B, cfg["ROWS"]),)](
        soft, hard, loss, gs, gh, B, C, soft.stride(0), hard.stride(0), gs.stride(0),
        1.0 / temperature, grad_scale / temperature, ACC=kl_common.acc(soft.dtype), **cfg,
    )
    return loss, gs, gh
