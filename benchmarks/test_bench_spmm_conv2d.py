"""Direct sparse conv2d (s2h_kernels.spmm_conv2d) on the CPU against F.conv2d in the same run:
ResNet-18/50 convolutions at batch 1, sparsity 50-98%, 1 and 2 threads (docs/DESIGN.md §4).
Timing helpers, the thread fixture and the markdown table (``python benchmarks/test_bench_spmm.py
out.json``, which takes both files' results): benchmarks/test_bench_spmm.py.

    pytest benchmarks/test_bench_spmm_conv2d.py --benchmark-only --benchmark-json=out.json
"""
import functools

import pytest
import torch
import torch.nn.functional as F

import s2h_kernels
from s2h_kernels import SparseWeight
from test_bench_spmm import SPARSITIES, check, paired, run, threads  # noqa: F401  (threads: a fixture)

# name: (C_in, C_out, H, kernel, stride) at batch 1, padding kernel // 2
CONVS = {
    "r18.layer1.conv3x3": (64, 64, 56, 3, 1),
    "r18.layer2.0.conv1.s2": (64, 128, 56, 3, 2),
    "r18.layer3.conv3x3": (256, 256, 14, 3, 1),
    "r18.layer4.conv3x3": (512, 512, 7, 3, 1),
    "r50.layer1.conv1x1": (64, 256, 56, 1, 1),
}


@functools.lru_cache(maxsize=None)
def conv_case(name, sparsity):
    cin, cout, h, k, s = CONVS[name]
    g = torch.Generator().manual_seed(cin + cout + h)
    w = torch.randn(cout, cin, k, k, generator=g)
    w = w * (torch.rand(w.shape, generator=g) >= sparsity)
    x = torch.randn(1, cin, h, h, generator=g)
    return w, SparseWeight.from_dense(w.reshape(cout, -1)), x, F.conv2d(x, w, None, s, k // 2)


@pytest.mark.parametrize("method", ["dense_conv2d", "s2h_conv"])
@pytest.mark.parametrize("sparsity", SPARSITIES, ids=lambda s: f"s{int(round(s * 100))}")
@pytest.mark.parametrize("name", list(CONVS))
def test_conv(benchmark, threads, name, sparsity, method):
    w, sw, x, ref = conv_case(name, sparsity)
    cin, cout, h, k, s = CONVS[name]
    benchmark.group = f"conv {name} ({cin}->{cout}, {h}x{h}, k{k} s{s}) s{int(round(sparsity * 100))} t{threads}"
    benchmark.extra_info.update(kind="conv", shape=name, sparsity=sparsity, threads=threads, method=method)
    fn = {
        "dense_conv2d": lambda: F.conv2d(x, w, None, s, k // 2),
        "s2h_conv": lambda: s2h_kernels.spmm_conv2d(sw, x, k, None, s, k // 2),
    }[method]
    with torch.no_grad():
        out = run(benchmark, fn)
        if method == "s2h_conv" and not benchmark.disabled:
            benchmark.extra_info["paired_vs_dense"] = paired(lambda: F.conv2d(x, w, None, s, k // 2), fn, threads)
    check(out, ref)
