"""KL gap, forward and both gradients: the fused op against the reference, the best eager code, both
under torch.compile, and the paper's eager d1 + d2 (docs/DESIGN.md §2).

    .venv/bin/python -m pytest benchmarks/test_bench_kl_gap.py --benchmark-only \
        --benchmark-columns=min,median,mean,rounds --benchmark-json=/tmp/kl_cpu.json
    .venv/bin/python benchmarks/report.py /tmp/kl_cpu.json

One group per shape (B rows, C classes), fp32 logits on the CPU, torch's default threads (or
``S2H_BENCH_THREADS``):

* ``reference``: ``s2h_kernels.reference.kl_gap_with_grads`` (eager autograd of the reference KL).
* ``best_eager``: benchmarks/baselines.py ``kl_gap_with_grads_eager``: softmaxes once, both gradients
  in closed form, in place (what a PyTorch expert writes); ``best_eager_autograd``: log-target
  ``F.kl_div`` and one ``autograd.grad``.
* ``compiled_reference`` / ``compiled_best_eager`` / ``compiled_best_eager_autograd``: the same under
  ``torch.compile`` (inductor), compiled before timing (seconds in ``extra_info["compile_s"]``).
* ``eager`` (the paper's, not a best baseline: each softmax twice): ``d1 = F.kl_div(log_softmax(h/T), softmax(s.detach()/T))`` and
  ``d2 = F.kl_div(log_softmax(h.detach()/T), softmax(s/T))``, batchmean, and their gradients
  (``torch.autograd.grad(d1, h)``, ``torch.autograd.grad(d2, s)``): what the paper's code runs.
* ``fused``: ``s2h_kernels.kl_gap_with_grads`` (loss, grad_soft, grad_hard), the trainer's path.
* ``fused_autograd``: ``s2h_kernels.kl_gap`` then ``torch.autograd.grad`` of it with respect to both
  inputs (the saved per-row gradients are scaled in backward: two more B x C tensors).

CA-KLD has its own file (benchmarks/test_bench_ca_kld.py), which reuses the helpers here.

Every test checks its result against the other implementation, so a wrong kernel fails here too.

**Peak extra memory** (``extra_info["peak_extra_bytes"]``, and in units of one B x C fp32 tensor):
the maximum, over one call, of the bytes held by torch's CPU allocator above the level at the start
of the call, from the allocation and free events that ``torch.profiler`` records with
``profile_memory=True`` (every ``at::empty`` in any kernel, in order; exported in the Chrome trace
with their sizes). The inputs exist before the call and are not counted; the outputs (loss and
two gradients) are. Memory a kernel takes with ``malloc`` outside torch's allocator is invisible to
this method: the fused CPU kernel takes none (its per-row state lives on the stack).
"""
import json
import os
import tempfile
import time

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import baselines
import s2h_kernels
from s2h_kernels import reference

T = 1.0
SHAPES = [(B, C) for B in (64, 512, 4096) for C in (10, 100, 1000, 32000)]
# S2H_BENCH_THREADS=1 measures single-threaded (steadier on a shared machine: a 2-thread OpenMP
# barrier waits a whole time slice whenever another process holds the second core).
THREADS = int(os.environ.get("S2H_BENCH_THREADS", "0")) or torch.get_num_threads()


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


def make_inputs(B, C, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (2.0 * torch.randn(B, C, generator=g)).requires_grad_(True)
    h = (2.0 * torch.randn(B, C, generator=g)).requires_grad_(True)
    return s, h


def eager(s, h):
    d1 = F.kl_div(F.log_softmax(h / T, -1), F.softmax(s.detach() / T, -1), reduction="batchmean")
    d2 = F.kl_div(F.log_softmax(h.detach() / T, -1), F.softmax(s / T, -1), reduction="batchmean")
    (gh,) = torch.autograd.grad(d1, h)
    (gs,) = torch.autograd.grad(d2, s)
    return d1.detach(), gs, gh


def fused(s, h):
    return s2h_kernels.kl_gap_with_grads(s, h, T, "batchmean")


def fused_autograd(s, h):
    loss = s2h_kernels.kl_gap(s, h, T, "batchmean")
    gs, gh = torch.autograd.grad(loss, (s, h))
    return loss.detach(), gs, gh


def compiled(fn):
    return torch.compile(fn, dynamic=False)


IMPLS = {"eager": eager, "fused": fused, "fused_autograd": fused_autograd,
         "reference": lambda s, h: reference.kl_gap_with_grads(s, h, T, "batchmean"),
         "best_eager": lambda s, h: baselines.kl_gap_with_grads_eager(s, h, T, "batchmean"),
         "best_eager_autograd": lambda s, h: baselines.kl_gap_with_grads_autograd(s, h, T, "batchmean")}
COMPILED = {"compiled_reference": "reference", "compiled_best_eager": "best_eager",
            "compiled_best_eager_autograd": "best_eager_autograd"}


def check(impl, out, s, h):
    """Against the other implementation: all rows' loss (in chunks, eager), gradients of 16 rows."""
    B = s.shape[0]
    loss, gs, gh = out
    with torch.no_grad():
        if impl == "eager":
            ref_loss = s2h_kernels.kl_gap(s, h, T, "batchmean")
        else:
            ref_loss = sum(
                F.kl_div(F.log_softmax(h[i:i + 256] / T, -1), F.softmax(s[i:i + 256] / T, -1), reduction="sum")
                for i in range(0, B, 256)
            ) / B
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-6)
    k = min(B, 16)
    sk, hk = s[:k].detach().clone().requires_grad_(True), h[:k].detach().clone().requires_grad_(True)
    ref = fused(sk, hk) if impl == "eager" else eager(sk, hk)
    # batchmean over B rows vs over k rows: the per-row gradients differ by k / B.
    torch.testing.assert_close(gs[:k] * (B / k), ref[1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gh[:k] * (B / k), ref[2], rtol=1e-4, atol=1e-6)


def peak_extra_bytes(fn, *args) -> int:
    """Peak of torch CPU allocator bytes above the call's starting level (see the module docstring)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn(*args)
        del out
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.unlink(path)
    mem = sorted((e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0),
                 key=lambda e: e["ts"])
    level = peak = 0
    for e in mem:
        level += e["args"]["Bytes"]
        peak = max(peak, level)
    return peak


def rounds_for(n: int) -> dict:
    """About a second of eager time per test at most; more iterations for tiny problems."""
    return dict(rounds=max(3, min(30, int(3e7 // n))), iterations=max(1, min(50, int(2e5 // n))), warmup_rounds=1)


@pytest.mark.parametrize("impl", list(IMPLS) + list(COMPILED))
@pytest.mark.parametrize("B,C", SHAPES, ids=[f"B{B}-C{C}" for B, C in SHAPES])
def test_kl_gap(benchmark, impl, B, C):
    benchmark.group = f"kl_gap B={B} C={C} cpu {THREADS}t"
    s, h = make_inputs(B, C)
    if impl in COMPILED:
        fn = compiled(IMPLS[COMPILED[impl]])
        t0 = time.perf_counter()
        fn(s, h)
        benchmark.extra_info["compile_s"] = round(time.perf_counter() - t0, 2)
    else:
        fn = IMPLS[impl]
    out = benchmark.pedantic(fn, args=(s, h), **rounds_for(B * C))
    check(impl, out, s, h)
    del out
    if not benchmark.disabled:
        peak = peak_extra_bytes(fn, s, h)
        benchmark.extra_info["peak_extra_bytes"] = peak
        benchmark.extra_info["peak_extra_BxC"] = round(peak / (B * C * 4), 3)
