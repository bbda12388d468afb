"""Triton kernels of s2h::ca_kld_triton (imported only with triton installed): the teacher's top-1
probability per row (for gamma=None) and the fused two-direction KL; each program takes ROWS rows
(several for short rows) and loops over BLOCK-class chunks. Block sizes: launch_config. Math: s2h_kernels/ca_kld.py, csrc/common/kl_gap.h.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import kl_common
from .kl_common import pmul, rescale


@triton.jit
def top1_kernel(z_ptr, out_ptr, B, C, stride, ROWS: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Top-1 probability of softmax(z) per row: 1 / sum_j exp(z_j - max z)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    live = rows < B
    z_row = z_ptr + rows[:, None] * stride
    offs = tl.arange(0, BLOCK)[None, :]
    m = tl.full([ROWS], float("-inf"), ACC)
    z = tl.zeros([ROWS], ACC)
    for c in range(0, C, BLOCK):
        x = tl.load(z_row + c + offs, mask=live[:, None] & (c + offs < C), other=float("-inf")).to(ACC)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        sh = tl.where(m_new == float("-inf"), 0.0, m_new)
        z = z * tl.exp(m - sh) + tl.sum(tl.exp(x - sh[:, None]), axis=1)
        m = m_new
    tl.store(out_ptr + rows, 1.0 / z, mask=live)


@triton.jit
def row_affine(z_row, live, C, inv_t, eps, STD: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
               ACC: tl.constexpr):
    """(shift, alpha, n, sigma) per row of z -> (z - shift) * alpha: standardise over the finite
    logits (Welford per chunk, Chan's merge), then divide by T; or just divide by T."""
    if STD:
        offs = tl.arange(0, BLOCK)[None, :]
        n = tl.zeros([ROWS], ACC)
        mean = tl.zeros([ROWS], ACC)
        m2 = tl.zeros([ROWS], ACC)
        for c in range(0, C, BLOCK):
            x = tl.load(z_row + c + offs, mask=live[:, None] & (c + offs < C), other=float("-inf")).to(ACC)
            take = x != float("-inf")
            nc = tl.sum(take.to(ACC), axis=1)
            mc = tl.sum(tl.where(take, x, 0.0), axis=1) / tl.maximum(nc, 1.0)
            dev = tl.where(take, x - mc[:, None], 0.0)
            m2c = tl.sum(dev * dev, axis=1)
            nn = n + nc
            delta = mc - mean
            frac = nc / tl.maximum(nn, 1.0)
            mean = tl.where(nc == 0, mean, tl.where(n == 0, mc, mean + delta * frac))
            m2 = tl.where(nc == 0, m2, tl.where(n == 0, m2c, m2 + m2c + delta * delta * n * frac))
            n = nn
        sigma = tl.sqrt(m2 / tl.maximum(n - 1.0, 1.0))
        alpha = inv_t / (sigma + eps)
        shift = mean
    else:
        shift = tl.zeros([ROWS], ACC)
        alpha = tl.zeros([ROWS], ACC) + inv_t
        n = tl.zeros([ROWS], ACC)
        sigma = tl.zeros([ROWS], ACC)
    return shift, alpha, n, sigma


@triton.jit
def ca_kld_kernel(
    zs_ptr, zt_ptr, gamma_ptr, loss_ptr, g_ptr, B, C, stride_s, stride_t, stride_g, inv_t, eps, grad_scale,
    STD: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    live = rows < B
    zs_row = zs_ptr + rows[:, None] * stride_s
    zt_row = zt_ptr + rows[:, None] * stride_t
    g_row = g_ptr + rows[:, None] * stride_g
    offs = tl.arange(0, BLOCK)[None, :]
    gamma = tl.load(gamma_ptr).to(ACC)
    shift_s, alpha_s, n_s, sigma_s = row_affine(zs_row, live, C, inv_t, eps, STD, ROWS, BLOCK, ACC)
    shift_t, alpha_t, n_t, sigma_t = row_affine(zt_row, live, C, inv_t, eps, STD, ROWS, BLOCK, ACC)
    ms = tl.full([ROWS], float("-inf"), ACC)
    mt = tl.full([ROWS], float("-inf"), ACC)
    zs = tl.zeros([ROWS], ACC)
    zt = tl.zeros([ROWS], ACC)
    ws = tl.zeros([ROWS], ACC)
    wt = tl.zeros([ROWS], ACC)
    sas = tl.zeros([ROWS], ACC)
    sab = tl.zeros([ROWS], ACC)
    sat = tl.zeros([ROWS], ACC)
    # Pass 1: both online softmaxes; ws = sum e_s (a - b), wt = sum e_t (b - a), and the sums of the
    # standardisation chain rule: sas = sum e_s a, sab = sum e_s (a - b) a, sat = sum e_t a.
    for c in range(0, C, BLOCK):
        valid = live[:, None] & (c + offs < C)
        a = (tl.load(zs_row + c + offs, mask=valid, other=float("-inf")).to(ACC) - shift_s[:, None]) * alpha_s[:, None]
        b = (tl.load(zt_row + c + offs, mask=valid, other=float("-inf")).to(ACC) - shift_t[:, None]) * alpha_t[:, None]
        ab = a - b
        ms_new = tl.maximum(ms, tl.max(a, axis=1))
        sh = tl.where(ms_new == float("-inf"), 0.0, ms_new)
        es = tl.exp(a - sh[:, None])
        old = tl.exp(ms - sh)
        zs = zs * old + tl.sum(es, axis=1)
        ws = rescale(ws, old) + tl.sum(pmul(es, ab), axis=1)
        if STD:
            sas = rescale(sas, old) + tl.sum(pmul(es, a), axis=1)
            sab = rescale(sab, old) + tl.sum(pmul(es, ab * a), axis=1)
        ms = ms_new
        mt_new = tl.maximum(mt, tl.max(b, axis=1))
        sh = tl.where(mt_new == float("-inf"), 0.0, mt_new)
        et = tl.exp(b - sh[:, None])
        old = tl.exp(mt - sh)
        zt = zt * old + tl.sum(et, axis=1)
        wt = rescale(wt, old) + tl.sum(pmul(et, -ab), axis=1)
        if STD:
            sat = rescale(sat, old) + tl.sum(pmul(et, a), axis=1)
        mt = mt_new
    lzs = tl.log(zs)
    lzt = tl.log(zt)
    cc = (ms - mt) + (lzs - lzt)
    klr = ws / zs - cc
    klf = wt / zt + cc
    tl.store(loss_ptr + rows, gamma * klf + (1.0 - gamma) * klr, mask=live)
    kappa = tl.zeros([ROWS], ACC)
    if STD:
        g_dot = gamma * (sas / zs - sat / zt) + (1.0 - gamma) * (sab / zs - (cc + klr) * (sas / zs))
        ok = (sigma_s > 0) & (n_s > 1)
        kappa = tl.where(ok, g_dot / (inv_t * tl.maximum(n_s - 1.0, 1.0) * tl.where(ok, sigma_s, 1.0)), 0.0)
    # Pass 2: the student's gradient.
    for c in range(0, C, BLOCK):
        valid = live[:, None] & (c + offs < C)
        a = (tl.load(zs_row + c + offs, mask=valid, other=float("-inf")).to(ACC) - shift_s[:, None]) * alpha_s[:, None]
        b = (tl.load(zt_row + c + offs, mask=valid, other=float("-inf")).to(ACC) - shift_t[:, None]) * alpha_t[:, None]
        ls = (a - ms[:, None]) - lzs[:, None]
        lt = (b - mt[:, None]) - lzt[:, None]
        s = tl.exp(ls)
        t = tl.exp(lt)
        ga = gamma * (s - t) + (1.0 - gamma) * pmul(s, ls - lt - klr[:, None])
        chain = tl.where(a == float("-inf"), 0.0, kappa[:, None] * a)
        g = (alpha_s[:, None] * ga - chain) * grad_scale
        tl.store(g_row + c + offs, g.to(g_ptr.dtype.element_ty), mask=valid)


# ca_kld_kernel keeps more live than kl_gap (both affine maps, up to nine running sums per row):
# half of kl_gap's elements per thread, 128-element tiles for short rows, and at most 4 warps in
# fp64 (with 8 or 16 warps ptxas spills 16-24 B in some fp64 configs). No spills then; fp64
# STD=True still needs 82-96 registers (its per-row state alone is 34): the KL configs under 50%.
CA_KLD_ELEMS_PER_THREAD = {"fp32": 4, "fp64": 2}
CA_KLD_SHORT_TILE = {"fp32": 128, "fp64": 64}


def launch_config(C: int, dtype: torch.dtype, kernel: str = "ca_kld") -> dict:
    """Block sizes for rows of C classes: ``kernel`` "ca_kld" (the loss) or "top1" (gamma=None)."""
    if kernel == "top1":
        return kl_common.launch_config(C, dtype)
    return kl_common.launch_config(C, dtype, CA_KLD_ELEMS_PER_THREAD, max_warps=4 if dtype == torch.float64 else 16,
                                   short_tile=CA_KLD_SHORT_TILE)


def ca_kld(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, gamma: Optional[float], standardize: bool,
    eps: float, grad_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    student, teacher = student.contiguous(), teacher.contiguous()
    B, C = student.shape
    acc = kl_common.acc_torch(student.dtype)
    if gamma is None:
        top1 = student.new_empty(B, dtype=acc)
        cfg = launch_config(C, student.dtype, "top1")
        top1_kernel[(triton.cdiv(B, cfg["ROWS"]),)](teacher, top1, B, C, teacher.stride(0),
                                                    ACC=kl_common.acc(student.dtype), **cfg)
        gamma_t = top1.mean()
    else:
        gamma_t = torch.full((), gamma, dtype=acc, device=student.device)
    loss = student.new_empty(B, dtype=acc)
    g = torch.empty_like(student)
    cfg = launch_config(C, student.dtype)
    ca_kld_kernel[(triton.cdiv(B, cfg["ROWS"]),)](
        student, teacher, gamma_t, loss, g, B, C, student.stride(0), teacher.stride(0), g.stride(0),
        1.0 / temperature, eps, grad_scale, STD=bool(standardize), ACC=kl_common.acc(student.dtype), **cfg,
    )
    return loss, g, gamma_t
