"""A 90%-sparse ResNet-18 end to end on the CPU: s2h.sparse.sparsify against the same masked
model run dense (eager), at batch 1 and 32, in the same run.

The model: torchvision resnet18 (random init, eval mode, BatchNorm statistics perturbed so that
activations are not trivial), every conv except the stem magnitude-pruned to 90% per layer (the
stem and the classifier stay dense, as in the one-shot pipeline's defaults).

Variants, so that the table says where the time goes:
  dense_eager     the masked model as it is (torch's dense kernels)
  dense_fused     sparsify(min_sparsity=1.0): only the non-sparse conversions (BatchNorm folded,
                  MaxPool on oneDNN); no sparse layer
  sparse_layers   sparsify(fuse=False, fast_pool=False): only sparse layers
  sparsified      sparsify(example_inputs=x): the default conversion (calibrated per layer)

    pytest benchmarks/test_bench_sparse_model.py --benchmark-only --benchmark-json=out.json
    python benchmarks/test_bench_sparse_model.py out.json     -> markdown table
"""
import functools
import json
import os
import sys
import time

if __name__ == "__main__":  # table mode: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import torch
import torchvision
from torch import nn

from s2h.sparse import sparsify

SPARSITY = 0.9
CASES = [(1, 1), (1, 2), (32, 2)]   # (batch, threads)
VARIANTS = ["dense_eager", "dense_fused", "sparse_layers", "sparsified"]


@functools.lru_cache(maxsize=None)
def pruned_resnet18() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
            if isinstance(m, nn.Conv2d) and name != "conv1":
                w = m.weight
                thr = w.abs().flatten().kthvalue(int(w.numel() * SPARSITY)).values
                w.mul_(w.abs() > thr)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@functools.lru_cache(maxsize=None)
def inputs(batch: int):
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return x, pruned_resnet18()(x)


def paired(baseline, model, x, threads, rounds):
    """Median of time(baseline) / time(model) over back-to-back pairs (thread CPU time at 1 thread)."""
    clock = time.thread_time if threads == 1 else time.perf_counter
    ratios = []
    for _ in range(rounds):
        t0 = clock()
        baseline(x)
        t1 = clock()
        model(x)
        t2 = clock()
        ratios.append((t1 - t0) / max(t2 - t1, 1e-9))
    return sorted(ratios)[len(ratios) // 2]


def build(variant: str, x: torch.Tensor, calibrate: bool) -> nn.Module:
    model = pruned_resnet18()
    if variant == "dense_eager":
        return model
    if variant == "dense_fused":
        return sparsify(model, min_sparsity=1.0)
    if variant == "sparse_layers":
        return sparsify(model, calibrate=False, fuse=False, fast_pool=False)
    return sparsify(model, example_inputs=x, reps=3) if calibrate else sparsify(model, calibrate=False)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("batch,threads", CASES, ids=lambda v: str(v))
def test_resnet18_90(benchmark, batch, threads, variant):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, ref = inputs(batch)
        # With benchmarking disabled (CI) skip the per-layer timing: one checked forward each.
        model = build(variant, x, calibrate=not benchmark.disabled)
        benchmark.group = f"resnet18 90% sparse, batch {batch}, {threads} threads"
        benchmark.extra_info.update(batch=batch, threads=threads, variant=variant)
        with torch.no_grad():
            if benchmark.disabled:
                out = benchmark(model, x)
            else:
                model(x)
                out = benchmark.pedantic(model, args=(x,), rounds=5 if batch == 1 else 3, iterations=1,
                                         warmup_rounds=1)
                if variant != "dense_eager":   # back-to-back pairs against dense eager (shared machine)
                    benchmark.extra_info["paired_vs_dense_eager"] = paired(pruned_resnet18(), model, x, threads,
                                                                           rounds=7 if batch == 1 else 3)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-4 * float(ref.abs().max().clamp_min(1.0)))
    finally:
        torch.set_num_threads(old)


def table(path: str) -> str:
    data = json.load(open(path))
    rows: dict = {}
    for b in data["benchmarks"]:
        i = b["extra_info"]
        rows.setdefault((i["batch"], i["threads"]), {})[i["variant"]] = b
    cols = ["batch", "threads"] + [f"{v} ms" for v in VARIANTS] + \
        [f"{v} vs dense_eager (min / paired)" for v in VARIANTS[1:]]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for (batch, threads), r in sorted(rows.items()):
        cells = [str(batch), str(threads)]
        cells += [f"{r[v]['stats']['min'] * 1e3:.1f}" if v in r else "-" for v in VARIANTS]
        d = r["dense_eager"]["stats"]["min"] if "dense_eager" in r else float("nan")
        for v in VARIANTS[1:]:
            if v in r:
                cells.append(f"{d / r[v]['stats']['min']:.2f}x / "
                             f"{r[v]['extra_info'].get('paired_vs_dense_eager', float('nan')):.2f}x")
            else:
                cells.append("-")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    print(table(sys.argv[1]))
