"""CA-KLD, forward and the student's gradient: the fused op against the eager reference (docs/DESIGN.md §3).

    .venv/bin/python -m pytest benchmarks/test_bench_ca_kld.py --benchmark-only \
        --benchmark-columns=min,median,mean,rounds --benchmark-json=/tmp/ca_kld_cpu.json
    .venv/bin/python benchmarks/report.py /tmp/ca_kld_cpu.json

One group per shape (B rows, C classes), fp32 logits on the CPU, torch's default threads (or
``S2H_BENCH_THREADS``); ``eager`` (the reference) is ``s2h_kernels.reference.ca_kld`` and ``torch.autograd.grad``,
``fused`` the same through ``s2h_kernels.ca_kld``, ``best_eager`` through benchmarks/baselines.py
``ca_kld_eager`` (closed-form student gradient saved in forward), and ``compiled_reference`` /
``compiled_best_eager`` the reference and the best eager code under ``torch.compile`` (compiled
before timing; seconds in ``extra_info["compile_s"]``). Each checks its result against another. Peak
extra memory as in benchmarks/test_bench_kl_gap.py.
"""
import time

import pytest
import torch

import baselines
import s2h_kernels
from test_bench_kl_gap import THREADS, make_inputs, peak_extra_bytes, rounds_for


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


CA_SHAPES = [(512, 100), (512, 1000), (512, 32000)]


def ca_eager(zs, zt):
    loss = s2h_kernels.reference.ca_kld(zs, zt, 4.0)
    (g,) = torch.autograd.grad(loss, zs)
    return loss.detach(), g


def ca_fused(zs, zt):
    loss = s2h_kernels.ca_kld(zs, zt, 4.0)
    (g,) = torch.autograd.grad(loss, zs)
    return loss.detach(), g


def ca_best_eager(zs, zt):
    loss = baselines.ca_kld_eager(zs, zt, 4.0)
    (g,) = torch.autograd.grad(loss, zs)
    return loss.detach(), g


IMPLS = {"eager": ca_eager, "fused": ca_fused, "best_eager": ca_best_eager}
COMPILED = {"compiled_reference": ca_eager, "compiled_best_eager": ca_best_eager}


@pytest.mark.parametrize("impl", list(IMPLS) + list(COMPILED))
@pytest.mark.parametrize("B,C", CA_SHAPES, ids=[f"B{B}-C{C}" for B, C in CA_SHAPES])
def test_ca_kld(benchmark, impl, B, C):
    benchmark.group = f"ca_kld B={B} C={C} cpu {THREADS}t"
    zs, zt = make_inputs(B, C, seed=1)
    zt = zt.detach()
    if impl in COMPILED:
        fn = torch.compile(COMPILED[impl], dynamic=False)
        t0 = time.perf_counter()
        fn(zs, zt)
        benchmark.extra_info["compile_s"] = round(time.perf_counter() - t0, 2)
    else:
        fn = IMPLS[impl]
    loss, g = benchmark.pedantic(fn, args=(zs, zt), **rounds_for(B * C))
    k = 16
    ref_loss, ref_g = (ca_fused if impl == "eager" else ca_eager)(zs, zt)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g[:k], ref_g[:k], rtol=1e-4, atol=1e-7)
    if not benchmark.disabled:
        peak = peak_extra_bytes(fn, zs, zt)
        benchmark.extra_info["peak_extra_bytes"] = peak
        benchmark.extra_info["peak_extra_BxC"] = round(peak / (B * C * 4), 3)
