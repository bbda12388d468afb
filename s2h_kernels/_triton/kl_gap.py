"""Triton kernel of s2h::kl_gap_triton (imported only with triton installed): one program per row, a
loop over BLOCK-class chunks (online softmax, any C). Math: s2h_kernels/kl_gap.py, csrc/common/kl_gap.h.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import kl_common
from .kl_common import pmul, rescale


@triton.jit
def kl_gap_kernel(
    s_ptr, h_ptr, loss_ptr, gs_ptr, gh_ptr, C, stride_s, stride_h, stride_g, inv_t, gscale,
    BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    h_row = h_ptr + row * stride_h
    offs = tl.arange(0, BLOCK)
    ms = tl.full([], float("-inf"), ACC)
    mh = tl.full([], float("-inf"), ACC)
    zs = tl.zeros([], ACC)
    zh = tl.zeros([], ACC)
    w = tl.zeros([], ACC)
    # Pass 1: online softmax of both rows and w = sum_j exp(a_j - ms) (a_j - b_j).
    for c in range(0, C, BLOCK):
        valid = c + offs < C
        a = tl.load(s_row + c + offs, mask=valid, other=float("-inf")).to(ACC) * inv_t
        b = tl.load(h_row + c + offs, mask=valid, other=float("-inf")).to(ACC) * inv_t
        ms_new = tl.maximum(ms, tl.max(a, axis=0))
        sh = tl.where(ms_new == float("-inf"), 0.0, ms_new)
        es = tl.exp(a - sh)
        old = tl.exp(ms - sh)
        zs = zs * old + tl.sum(es, axis=0)
        w = rescale(w, old) + tl.sum(pmul(es, a - b), axis=0)
        ms = ms_new
        mh_new = tl.maximum(mh, tl.max(b, axis=0))
        sh = tl.where(mh_new == float("-inf"), 0.0, mh_new)
        zh = zh * tl.exp(mh - sh) + tl.sum(tl.exp(b - sh), axis=0)
        mh = mh_new
    # log p = (a - ms) - lzs, in that order: the largest logit's log p is exact even for huge |a|.
    lzs = tl.log(zs)
    lzh = tl.log(zh)
    d = w / zs - ((ms - mh) + (lzs - lzh))
    # Pass 2: both gradients.
    for c in range(0, C, BLOCK):
        valid = c + offs < C
        a = tl.load(s_row + c + offs, mask=valid, other=float("-inf")).to(ACC) * inv_t
        b = tl.load(h_row + c + offs, mask=valid, other=float("-inf")).to(ACC) * inv_t
        ls = (a - ms) - lzs
        lh = (b - mh) - lzh
        p = tl.exp(ls)
        q = tl.exp(lh)
        gh = (q - p) * gscale
        gs = pmul(p, ls - lh - d) * gscale
        tl.store(gs_ptr + row * stride_g + c + offs, gs.to(gs_ptr.dtype.element_ty), mask=valid)
        tl.store(gh_ptr + row * stride_g + c + offs, gh.to(gh_ptr.dtype.element_ty), mask=valid)
    tl.store(loss_ptr + row, d)


def kl_gap(
    soft: torch.Tensor, hard: torch.Tensor, temperature: float, grad_scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    soft, hard = soft.contiguous(), hard.contiguous()
    B, C = soft.shape
    loss = soft.new_empty(B, dtype=kl_common.acc_torch(soft.dtype))
    gs = torch.empty_like(soft)
    gh = torch.empty_like(hard)
    kl_gap_kernel[(B,)](
        soft, hard, loss, gs, gh, C, soft.stride(0), hard.stride(0), gs.stride(0),
        1.0 / temperature, grad_scale / temperature, ACC=kl_common.acc(soft.dtype), **kl_common.launch_cfg(C),
    )
    return loss, gs, gh
