"""Triton kernels of s2h::ca_kld_triton (imported only with triton installed): the teacher's top-1
probability per row (for gamma=None) and the fused two-direction KL, one program per row, a loop
over BLOCK-class chunks. Math: s2h_kernels/ca_kld.py, csrc/common/kl_gap.h.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import kl_common
from .kl_common import pmul, rescale


@triton.jit
def top1_kernel(z_ptr, out_ptr, C, stride, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Top-1 probability of softmax(z) per row: 1 / sum_j exp(z_j - max z)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    m = tl.full([], float("-inf"), ACC)
    z = tl.zeros([], ACC)
    for c in range(0, C, BLOCK):
        x = tl.load(z_ptr + row * stride + c + offs, mask=c + offs < C, other=float("-inf")).to(ACC)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        sh = tl.where(m_new == float("-inf"), 0.0, m_new)
        z = z * tl.exp(m - sh) + tl.sum(tl.exp(x - sh), axis=0)
        m = m_new
    tl.store(out_ptr + row, 1.0 / z)


@triton.jit
def row_affine(z_row, C, inv_t, eps, STD: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """(shift, alpha, n, sigma) of z -> (z - shift) * alpha: standardise over the finite logits
    (Welford per chunk, Chan's merge), then divide by T; or just divide by T."""
    if STD:
        offs = tl.arange(0, BLOCK)
        n = tl.zeros([], ACC)
        mean = tl.zeros([], ACC)
        m2 = tl.zeros([], ACC)
        for c in range(0, C, BLOCK):
            x = tl.load(z_row + c + offs, mask=c + offs < C, other=float("-inf")).to(ACC)
            take = x != float("-inf")
            nc = tl.sum(take.to(ACC), axis=0)
            mc = tl.sum(tl.where(take, x, 0.0), axis=0) / tl.maximum(nc, 1.0)
            m2c = tl.sum(tl.where(take, (x - mc) * (x - mc), 0.0), axis=0)
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
        shift = tl.zeros([], ACC)
        alpha = tl.zeros([], ACC) + inv_t
        n = tl.zeros([], ACC)
        sigma = tl.zeros([], ACC)
    return shift, alpha, n, sigma


@triton.jit
def ca_kld_kernel(
    zs_ptr, zt_ptr, gamma_ptr, loss_ptr, g_ptr, C, stride_s, stride_t, stride_g, inv_t, eps, grad_scale,
    STD: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    zs_row = zs_ptr + row * stride_s
    zt_row = zt_ptr + row * stride_t
    offs = tl.arange(0, BLOCK)
    gamma = tl.load(gamma_ptr).to(ACC)
    shift_s, alpha_s, n_s, sigma_s = row_affine(zs_row, C, inv_t, eps, STD, BLOCK, ACC)
    shift_t, alpha_t, n_t, sigma_t = row_affine(zt_row, C, inv_t, eps, STD, BLOCK, ACC)
    ms = tl.full([], float("-inf"), ACC)
    mt = tl.full([], float("-inf"), ACC)
    zs = tl.zeros([], ACC)
    zt = tl.zeros([], ACC)
    ws = tl.zeros([], ACC)
    wt = tl.zeros([], ACC)
    sas = tl.zeros([], ACC)
    sab = tl.zeros([], ACC)
    sat = tl.zeros([], ACC)
    # Pass 1: both online softmaxes; ws = sum e_s (a - b), wt = sum e_t (b - a), and the sums of the
    # standardisation chain rule: sas = sum e_s a, sab = sum e_s (a - b) a, sat = sum e_t a.
    for c in range(0, C, BLOCK):
        valid = c + offs < C
        a = (tl.load(zs_row + c + offs, mask=valid, other=float("-inf")).to(ACC) - shift_s) * alpha_s
        b = (tl.load(zt_row + c + offs, mask=valid, other=float("-inf")).to(ACC) - shift_t) * alpha_t
        ab = a - b
        ms_new = tl.maximum(ms, tl.max(a, axis=0))
        sh = tl.where(ms_new == float("-inf"), 0.0, ms_new)
        es = tl.exp(a - sh)
        old = tl.exp(ms - sh)
        zs = zs * old + tl.sum(es, axis=0)
        ws = rescale(ws, old) + tl.sum(pmul(es, ab), axis=0)
        if STD:
            sas = rescale(sas, old) + tl.sum(pmul(es, a), axis=0)
            sab = rescale(sab, old) + tl.sum(pmul(es, ab * a), axis=0)
        ms = ms_new
        mt_new = tl.maximum(mt, tl.max(b, axis=0))
        sh = tl.where(mt_new == float("-inf"), 0.0, mt_new)
        et = tl.exp(b - sh)
        old = tl.exp(mt - sh)
        zt = zt * old + tl.sum(et, axis=0)
        wt = rescale(wt, old) + tl.sum(pmul(et, -ab), axis=0)
        if STD:
            sat = rescale(sat, old) + tl.sum(pmul(et, a), axis=0)
        mt = mt_new
    lzs = tl.log(zs)
    lzt = tl.log(zt)
    cc = (ms - mt) + (lzs - lzt)
    klr = ws / zs - cc
    klf = wt / zt + cc
    tl.store(loss_ptr + row, gamma * klf + (1.0 - gamma) * klr)
    kappa = tl.zeros([], ACC)
    if STD:
        g_dot = gamma * (sas / zs - sat / zt) + (1.0 - gamma) * (sab / zs - (cc + klr) * (sas / zs))
        ok = (sigma_s > 0) & (n_s > 1)
        kappa = tl.where(ok, g_dot / (inv_t * tl.maximum(n_s - 1.0, 1.0) * tl.where(ok, sigma_s, 1.0)), 0.0)
    # Pass 2: the student's gradient.
    for c in range(0, C, BLOCK):
        valid = c + offs < C
        a = (tl.load(zs_row + c + offs, mask=valid, other=float("-inf")).to(ACC) - shift_s) * alpha_s
        b = (tl.load(zt_row + c + offs, mask=valid, other=float("-inf")).to(ACC) - shift_t) * alpha_t
        ls = (a - ms) - lzs
        lt = (b - mt) - lzt
        s = tl.exp(ls)
        t = tl.exp(lt)
        ga = gamma * (s - t) + (1.0 - gamma) * pmul(s, ls - lt - klr)
        chain = tl.where(a == float("-inf"), 0.0, kappa * a)
        g = (alpha_s * ga - chain) * grad_scale
        tl.store(g_ptr + row * stride_g + c + offs, g.to(g_ptr.dtype.element_ty), mask=valid)


def ca_kld(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, gamma: Optional[float], standardize: bool,
    eps: float, grad_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    student, teacher = student.contiguous(), teacher.contiguous()
    B, C = student.shape
    acc = kl_common.acc_torch(student.dtype)
    cfg = kl_common.launch_cfg(C)
    if gamma is None:
        top1 = student.new_empty(B, dtype=acc)
        top1_kernel[(B,)](teacher, top1, C, teacher.stride(0), ACC=kl_common.acc(student.dtype), **cfg)
        gamma_t = top1.mean()
    else:
        gamma_t = torch.full((), gamma, dtype=acc, device=student.device)
    loss = student.new_empty(B, dtype=acc)
    g = torch.empty_like(student)
    ca_kld_kernel[(B,)](
        student, teacher, gamma_t, loss, g, C, student.stride(0), teacher.stride(0), g.stride(0),
        1.0 / temperature, eps, grad_scale, STD=bool(standardize), ACC=kl_common.acc(student.dtype), **cfg,
    )
    return loss, g, gamma_t
