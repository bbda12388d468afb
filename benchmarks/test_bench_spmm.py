"""Sparse x dense matmul (s2h_kernels.spmm) on the CPU, against torch dense (torch.mm) and torch CSR
(torch.sparse.mm, MKL) in the same run.

Shapes: ResNet-18/50 convolutions as GEMMs at batch 1 (M = out channels, K = in*kh*kw,
N = H_out*W_out) and the classifiers (N = 1), sparsity 50-98%, 1 and 2 threads.  The direct sparse
conv has its own file, benchmarks/test_bench_spmm_conv2d.py, with the helpers here.  Every
benchmark also checks its result against the dense one.

    make bench     (or: pytest benchmarks/test_bench_spmm.py benchmarks/test_bench_spmm_conv2d.py
                    --benchmark-only --benchmark-json=out.json)
    python benchmarks/test_bench_spmm.py out.json     -> the markdown tables of benchmarks/results/spmm_cpu.md

Interleaved mode (one process, every method of a shape timed in turn each round, warm, minimum over
rounds; the goal check of issue 18, s2h >= 1.5x torch CSR from 90% sparsity up):

    python benchmarks/test_bench_spmm.py --interleaved [--threads 1 2] [--min-sparsity 0.9]
                                         [--rounds 15] [--passes 2] [--shapes r18.fc r50.fc]

It times the public ``s2h_kernels.spmm(sw, x)``, ``SparseLinear`` (N = 1 shapes: the module at batch
1), the raw C++ op (``s2h::spmv_sell`` for N = 1, else ``s2h::spmm``), torch CSR and ``torch.mm``,
and prints a markdown table with the load average.
"""
import functools
import json
import math
import os
import sys
import time

if __name__ == "__main__":  # table mode: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import torch

import s2h_kernels
from s2h_kernels import SparseWeight

# name: (M, K, N)
GEMMS = {
    "r18.layer1.conv3x3": (64, 576, 3136),
    "r18.layer3.conv3x3": (256, 2304, 196),
    "r18.layer4.conv3x3": (512, 4608, 49),
    "r50.layer3.conv1x1": (256, 1024, 196),
    "r50.layer4.conv1x1": (2048, 512, 49),
    "r18.fc": (1000, 512, 1),
    "r50.fc": (1000, 2048, 1),
}
SPARSITIES = [0.5, 0.7, 0.8, 0.9, 0.95, 0.98]
THREADS = [1, 2]


@pytest.fixture(params=THREADS, ids=lambda t: f"t{t}")
def threads(request):
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


@functools.lru_cache(maxsize=None)
def gemm_case(name, sparsity):
    m, k, n = GEMMS[name]
    g = torch.Generator().manual_seed(m + k + n)
    w = torch.randn(m, k, generator=g)
    w = w * (torch.rand(m, k, generator=g) >= sparsity)
    x = torch.randn(k, n, generator=g)
    return w, SparseWeight.from_dense(w), w.to_sparse_csr(), x, w @ x


def run(benchmark, fn):
    """pedantic with a round count sized to about 0.2 s per benchmark (the suite stays short)."""
    if benchmark.disabled:
        return benchmark(fn)
    fn()
    t0 = time.perf_counter()
    fn()
    dt = max(time.perf_counter() - t0, 1e-6)
    rounds = int(min(60, max(5, 0.2 / dt)))
    return benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)


def paired(baseline, fn, threads, rounds=12):
    """Median over rounds of time(baseline) / time(fn), the two timed back to back.

    The machine this runs on is shared; pairing the calls cancels slow changes in load, and at
    one thread the per-thread CPU clock leaves out time the thread was descheduled.  Each timed
    call follows an untimed call of the same function, so that both see the cache state of their
    own steady state.  (Timing fn right after baseline was unfair to fn: MKL's GEMM reads X
    without leaving it in L2/L3 on AMD Zen 4, so fn then fetched X from DRAM, which no layer of
    a network does: its X was just written by the layer before.)
    """
    clock = time.thread_time if threads == 1 else time.perf_counter
    ratios = []
    for _ in range(rounds):
        baseline()
        t0 = clock()
        baseline()
        t1 = clock()
        fn()
        t2 = clock()
        fn()
        t3 = clock()
        ratios.append((t1 - t0) / max(t3 - t2, 1e-9))
    ratios.sort()
    return ratios[len(ratios) // 2]


def check(out, ref):
    ref = ref.to(out.dtype)
    scale = ref.abs().max().clamp_min(1.0)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(scale))


METHODS = ["dense_mm", "torch_csr", "s2h_spmm"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sparsity", SPARSITIES, ids=lambda s: f"s{int(round(s * 100))}")
@pytest.mark.parametrize("name", list(GEMMS))
def test_gemm(benchmark, threads, name, sparsity, method):
    w, sw, csr, x, ref = gemm_case(name, sparsity)
    m, k, n = GEMMS[name]
    benchmark.group = f"gemm {name} ({m}x{k}x{n}) s{int(round(sparsity * 100))} t{threads}"
    benchmark.extra_info.update(kind="gemm", shape=name, mkn=[m, k, n], sparsity=sparsity, threads=threads,
                                method=method)
    fn = {
        "dense_mm": lambda: torch.mm(w, x),
        "torch_csr": lambda: torch.sparse.mm(csr, x),
        "s2h_spmm": lambda: s2h_kernels.spmm(sw, x),
    }[method]
    with torch.no_grad():
        out = run(benchmark, fn)
        if method == "s2h_spmm" and not benchmark.disabled:
            benchmark.extra_info["paired_vs_dense"] = paired(lambda: torch.mm(w, x), fn, threads)
            benchmark.extra_info["paired_vs_csr"] = paired(lambda: torch.sparse.mm(csr, x), fn, threads)
    check(out, ref)


# ----------------------------------------------------------------------------------------------
# Markdown table from a --benchmark-json file
# ----------------------------------------------------------------------------------------------


def table(path: str) -> str:
    data = json.load(open(path))
    rows: dict = {}
    for b in data["benchmarks"]:
        info = b["extra_info"]
        key = (info["kind"], info["shape"], info["threads"], info["sparsity"])
        rows.setdefault(key, {})[info["method"]] = b
    cpu = data["machine_info"].get("cpu", {})
    out = [f"Machine: {cpu.get('brand_raw', '?')}, {cpu.get('count', '?')} cores; torch {torch.__version__}.",
           "Times: minimum over the rounds (ms).  'min' ratios divide those minima; 'paired' ratios are the",
           "median over rounds of time(baseline) / time(s2h), each timed call after an untimed call of",
           "the same function (per-thread CPU time at 1 thread).", ""]
    for kind, base, extra in (("gemm", "dense_mm", "torch_csr"), ("conv", "dense_conv2d", None)):
        ours = "s2h_spmm" if kind == "gemm" else "s2h_conv"
        cols = ["shape", "threads", "sparsity", f"{base} ms"] + ([f"{extra} ms"] if extra else []) + \
            [f"{ours} ms", "vs dense (min)", "vs dense (paired)"] + (["vs CSR (min)", "vs CSR (paired)"] if extra else [])
        out += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for (k, shape, t, sp), r in sorted(rows.items()):
            if k != kind or ours not in r or base not in r:
                continue
            d, o = r[base]["stats"]["min"], r[ours]["stats"]["min"]
            info = r[ours]["extra_info"]
            cells = [shape, str(t), f"{int(round(sp * 100))}%", f"{d * 1e3:.3f}"]
            if extra:
                c = r[extra]["stats"]["min"] if extra in r else float("nan")
                cells.append(f"{c * 1e3:.3f}")
            cells += [f"{o * 1e3:.3f}", f"{d / o:.2f}x", f"{info.get('paired_vs_dense', float('nan')):.2f}x"]
            if extra:
                cells += [f"{c / o:.2f}x", f"{info.get('paired_vs_csr', float('nan')):.2f}x"]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    out += summary(rows)
    return "\n".join(out)


def summary(rows: dict) -> list:
    """Geometric means over the shapes of each kind, per thread count and sparsity (min; paired)."""
    pairs = (("gemm", "dense_mm", "s2h_spmm", "paired_vs_dense", "GEMM shapes vs `torch.mm`"),
             ("gemm", "torch_csr", "s2h_spmm", "paired_vs_csr", "GEMM shapes vs torch CSR (MKL)"),
             ("conv", "dense_conv2d", "s2h_conv", "paired_vs_dense", "convs vs `F.conv2d` (oneDNN)"))
    sparsities = sorted({key[3] for key in rows})
    threads = sorted({key[2] for key in rows})
    out = ["Geometric means over the shapes: paired ratio (min-based ratio in brackets).", ""]
    for t in threads:
        out += [f"{t} thread{'s' if t > 1 else ''}:", "",
                "| | " + " | ".join(f"{int(round(sp * 100))}%" for sp in sparsities) + " |",
                "|---|" + "---|" * len(sparsities)]
        for kind, base, ours, key, label in pairs:
            cells = []
            for sp in sparsities:
                group = [r for (k, _, tt, s), r in rows.items() if k == kind and tt == t and s == sp
                         and base in r and ours in r]
                if not group:
                    cells.append("")
                    continue
                mins = [r[base]["stats"]["min"] / r[ours]["stats"]["min"] for r in group]
                paired_ = [r[ours]["extra_info"].get(key, float("nan")) for r in group]
                cells.append(f"{_geomean(paired_):.2f}x ({_geomean(mins):.2f}x)")
            out.append(f"| {label} | " + " | ".join(cells) + " |")
        out.append("")
    return out


def _geomean(values) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


# ----------------------------------------------------------------------------------------------
# Interleaved mode (see the module docstring)
# ----------------------------------------------------------------------------------------------


def interleaved_methods(name, sparsity):
    """{method: fn} for one shape: public spmm, the module (N = 1), the raw op, CSR, dense."""
    from s2h.sparse import SparseLinear

    w, sw, csr, x, _ = gemm_case(name, sparsity)
    m, _, n = GEMMS[name]
    fns = {"dense_mm": lambda: torch.mm(w, x), "torch_csr": lambda: torch.sparse.mm(csr, x),
           "s2h_spmm": lambda: s2h_kernels.spmm(sw, x)}
    if n == 1:
        lin, xr = SparseLinear(sw), x.t().contiguous()
        fns["s2h_module"] = lambda: lin(xr)
        sell, op = sw.sell(), torch.ops.s2h.spmv_sell.default
        fns["raw_op"] = lambda: op(*sell, m, x, None, False)
    else:
        op = torch.ops.s2h.spmm.default
        fns["raw_op"] = lambda: op(sw.values, sw.row_ptr, sw.col_idx, None, x, None, False)
    return fns


def time_interleaved(fns, threads, rounds, target_s):
    """Per-call time of each fn, minimum over rounds; each round times every fn in turn (after one
    untimed call), a batch of calls sized to about target_s.  Per-thread CPU time at 1 thread
    (time the thread was descheduled is left out); wall time at 2, where short batches and more
    rounds give a shared machine's scheduler more chances to leave both cores free for one."""
    clock = time.thread_time if threads == 1 else time.perf_counter
    reps = {}
    for name, fn in fns.items():
        fn()
        t0 = time.perf_counter()
        fn()
        reps[name] = int(min(2000, max(1, target_s / max(time.perf_counter() - t0, 1e-7))))
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()
            r = reps[name]
            t0 = clock()
            for _ in range(r):
                fn()
            best[name] = min(best[name], (clock() - t0) / r)
    return best


def interleaved(threads=(1, 2), min_sparsity=0.9, rounds=15, shapes=None, goal=1.5, passes=2) -> str:
    """The markdown table of the interleaved mode.  Every (thread count, shape) is timed in each of
    ``passes`` sweeps over the suite and keeps its minima: on a shared machine a shape timed only
    once can fall in one busy stretch (at 2 threads, a second core taken for the whole shape).  At
    2+ threads 3x the rounds of 1/6 the length."""
    methods = ["dense_mm", "torch_csr", "raw_op", "s2h_spmm", "s2h_module"]
    cols = ["shape", "threads", "sparsity"] + [f"{m} us" for m in methods] + \
        ["raw vs CSR", "spmm vs CSR", "module vs CSR", "spmm vs dense"]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    cases = [(t, name, sp) for t in threads for name in shapes or GEMMS
             for sp in SPARSITIES if sp >= min_sparsity - 1e-9]
    best = {case: {} for case in cases}
    load_before = _load()
    old = torch.get_num_threads()
    try:
        with torch.no_grad():
            for _ in range(passes):
                for case in cases:
                    t, name, sp = case
                    torch.set_num_threads(t)
                    fns = interleaved_methods(name, sp)
                    ref = gemm_case(name, sp)[4]
                    for method in ("s2h_spmm", "raw_op"):
                        check(fns[method](), ref)
                    if "s2h_module" in fns:
                        check(fns["s2h_module"]().t(), ref)
                    times = time_interleaved(fns, t, rounds if t == 1 else 3 * rounds, 2e-3 if t == 1 else 3e-4)
                    for m, v in times.items():
                        best[case][m] = min(v, best[case].get(m, float("inf")))
    finally:
        torch.set_num_threads(old)
    misses = []
    for (t, name, sp), b in best.items():
        c = b["torch_csr"]
        cells = [name, str(t), f"{int(round(sp * 100))}%"]
        cells += [f"{b[m] * 1e6:.1f}" if m in b else "-" for m in methods]
        cells += [f"{c / b[m]:.2f}x" if m in b else "-" for m in ("raw_op", "s2h_spmm", "s2h_module")]
        cells.append(f"{b['dense_mm'] / b['s2h_spmm']:.2f}x")
        out.append("| " + " | ".join(cells) + " |")
        worst = min(c / b[m] for m in ("s2h_spmm", "s2h_module") if m in b)
        if worst < goal:
            misses.append(f"{name} {int(round(sp * 100))}% t{t}: {worst:.2f}x")
    from s2h_kernels import _cpu_config

    head = [f"Machine: {_cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}; s2h ISA "
            f"{_cpu_config.active_isa()}; load average (1 min) before {load_before}, after {_load()}.",
            f"Interleaved, warm; per cell the minimum over {passes} sweeps of the suite, each {rounds} rounds of a "
            f"batch of calls of about 2 ms (per-thread CPU time) at 1 thread, {3 * rounds} rounds of 0.3 ms (wall "
            "time) at 2; us per call.", ""]
    tail = ["", f"Below {goal}x over CSR (public spmm or module): " + ("; ".join(misses) if misses else "none")]
    return "\n".join(head + out + tail)


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def _load() -> str:
    try:
        return open("/proc/loadavg").read().split()[0]
    except OSError:
        return "?"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--interleaved":
        import argparse

        ap = argparse.ArgumentParser(description="interleaved spmm measurement (module docstring)")
        ap.add_argument("--interleaved", action="store_true")
        ap.add_argument("--threads", type=int, nargs="+", default=THREADS)
        ap.add_argument("--min-sparsity", type=float, default=0.9)
        ap.add_argument("--rounds", type=int, default=15)
        ap.add_argument("--shapes", nargs="+", choices=list(GEMMS), default=None)
        ap.add_argument("--passes", type=int, default=2)
        a = ap.parse_args()
        print(interleaved(a.threads, a.min_sparsity, a.rounds, a.shapes, passes=a.passes))
    else:
        print(table(sys.argv[1]))
