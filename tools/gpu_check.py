"""One command for a machine with a CUDA GPU: `make gpu-check` (python tools/gpu_check.py).

With a GPU it
1. runs the ``gpu``-marked tests and benchmark assertions (``pytest -m gpu tests benchmarks --benchmark-disable``);
2. times every fused op against eager PyTorch and ``torch.compile`` baselines (``triton.testing.do_bench``,
   CUDA events, median), each output checked equal to the fused (Triton) result;
3. profiles the two-branch S2H training step (``s2h.S2HPruner.step``) with ``torch.profiler`` and measures
   how much of the hard branch's kernel time overlaps kernels of the other stream:
   overlap fraction = time where kernels of both streams are active / hard-branch (side-stream) kernel time;
4. runs ``python -m s2h prune`` on digits for one epoch on the GPU;
and writes ``benchmarks/results/gpu_<device name>.md``. Exit status 1 on any mismatch or failure.

Without a GPU it says so, measures nothing, writes nothing and exits 0.

Only public API is used (``s2h.convert``, ``s2h.S2HPruner``, ``s2h_kernels.<op>``, ``s2h_kernels.reference``,
the ``python -m s2h prune`` command line), so the check survives internal reorganisations.

    python tools/gpu_check.py [--out-dir benchmarks/results] [--skip-tests] [--skip-prune] [--quick]
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_GPU = ("gpu-check: no CUDA GPU found (torch.cuda.is_available() is False). Nothing was measured and no results "
          "were written; run `make gpu-check` on a machine with an NVIDIA GPU.")


# ----------------------------------------------------------------------------------------------
# The report: a plain dict, rendered to markdown (tests feed it fake numbers)
# ----------------------------------------------------------------------------------------------


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'NVIDIA_H100_80GB_HBM3' (the results file's name)."""
    return re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9.-]+", "_", name)).strip("_") or "unknown"


def report_path(out_dir: str, device: str) -> str:
    return os.path.join(out_dir, f"gpu_{device_slug(device)}.md")


def failures(report: dict) -> list[str]:
    """Everything that makes the check fail (exit status 1)."""
    out = []
    for t in report.get("tests", []):
        if t.get("rc") != 0:
            out.append(f"tests `{t['name']}` exited {t.get('rc')}: {t.get('summary', '')}")
    for b in report.get("bench", []):
        if not b.get("match", False):
            out.append(f"bench {b['op']} {b['shape']}: {b.get('error') or 'mismatch'}")
    ov = report.get("overlap")
    if ov is not None and ov.get("error"):
        out.append(f"overlap: {ov['error']}")
    pr = report.get("prune")
    if pr is not None and pr.get("rc") != 0:
        out.append(f"prune run exited {pr.get('rc')}: {pr.get('error', '')}")
    return out


def _ms(v):
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    return f"{v:.4f}" if v < 0.1 else f"{v:.3f}"


def render_markdown(report: dict) -> str:
    fails = failures(report)
    L = [f"# GPU check: {report['device']}", ""]
    env = report.get("env", {})
    L.append(f"Written by `make gpu-check` (`tools/gpu_check.py`) on {report.get('date', '?')}. "
             + ", ".join(f"{k} {v}" for k, v in env.items()) + ".")
    L.append("")
    L.append(f"**Result: {'PASS' if not fails else 'FAIL'}**" + ("" if not fails else f" ({len(fails)} problems)"))
    for f in fails:
        L.append(f"- {f}")
    L.append("")
    if report.get("tests") is not None:
        L.append("## Tests on the GPU")
        L.append("")
        L.append("| command | exit | summary | time |")
        L.append("|---|---|---|---|")
        for t in report["tests"]:
            L.append(f"| `{t['name']}` | {t.get('rc')} | {t.get('summary', '')} | {t.get('seconds', 0):.0f} s |")
        L.append("")
    if report.get("bench") is not None:
        L.append("## Fused ops against eager PyTorch and torch.compile")
        L.append("")
        L.append("Milliseconds per call, median of `triton.testing.do_bench` (CUDA events). Each baseline column "
                 "shows the fastest implementation of its kind (named). `match`: every output of every implementation "
                 "equals the fused Triton result (tolerance in the notes). `speed-up`: the fastest baseline's time over "
                 "the fused Triton op's.")
        L.append("")
        L.append("| op | shape | fused triton | fused cuda | eager PyTorch | torch.compile | speed-up | match |")
        L.append("|---|---|---|---|---|---|---|---|")
        for b in report["bench"]:
            t = b.get("times_ms", {})
            fused = t.get("fused triton")
            num = {k: v for k, v in t.items() if isinstance(v, (int, float))}
            eager = {k: v for k, v in num.items() if not k.startswith("fused") and not k.startswith("torch.compile")}
            comp = {k: v for k, v in num.items() if k.startswith("torch.compile")}

            def best(d):
                if not d:
                    return "–"
                k = min(d, key=d.get)
                return f"{_ms(d[k])} ({k})"

            base = list(eager.values()) + list(comp.values())
            sp = f"{min(base) / fused:.2f}x" if isinstance(fused, (int, float)) and fused > 0 and base else "–"
            m = "yes" if b.get("match") else f"**NO**: {b.get('error', '')}"
            L.append(f"| {b['op']} | {b['shape']} | {_ms(t.get('fused triton'))} | {_ms(t.get('fused cuda'))} | "
                     f"{best(eager)} | {best(comp)} | {sp} | {m} |")
        notes = [f"- {b['op']} {b['shape']}: {b['note']}" for b in report["bench"] if b.get("note")]
        if notes:
            L.append("")
            L += notes
        L.append("")
    ov = report.get("overlap")
    if ov is not None:
        L.append("## Two-branch step: does the hard branch overlap the soft one?")
        L.append("")
        if ov.get("error"):
            L.append(f"Error: {ov['error']}")
        else:
            L.append(f"{ov.get('what', '')} Profiled with `torch.profiler` over {ov.get('steps', '?')} steps after "
                     "warm-up. Hard branch = kernels on the streams other than the one with the most kernel time.")
            L.append("")
            L.append("| stream | kernels | kernel time (ms) |")
            L.append("|---|---|---|")
            for s in ov.get("streams", []):
                L.append(f"| {s['stream']}{' (main)' if s.get('main') else ''} | {s['kernels']} | {s['ms']:.3f} |")
            L.append("")
            frac = ov.get("fraction")
            L.append(f"**Overlap fraction: {'n/a' if frac is None else f'{100 * frac:.1f}%'}** "
                     f"(both streams busy {ov.get('overlap_ms', 0):.3f} ms of {ov.get('side_ms', 0):.3f} ms hard-branch "
                     f"kernel time). Step time {ov.get('step_ms', float('nan')):.3f} ms.")
            if ov.get("note"):
                L.append("")
                L.append(ov["note"])
        L.append("")
    pr = report.get("prune")
    if pr is not None:
        L.append("## One epoch of `python -m s2h prune` on digits")
        L.append("")
        L.append(f"`{pr.get('command', '')}`: exit {pr.get('rc')} in {pr.get('seconds', 0):.0f} s.")
        if pr.get("summary"):
            L.append("")
            L.append("```")
            L.append(json.dumps(pr["summary"], indent=1)[:3000])
            L.append("```")
        if pr.get("error"):
            L.append("")
            L.append(f"Error: {pr['error']}")
        L.append("")
    return "\n".join(L)


def write_report(report: dict, out_dir: str) -> str:
    path = report_path(out_dir, report["device"])
    os.makedirs(out_dir, exist_ok=True)
    with open(path, "w") as f:
        f.write(render_markdown(report))
    return path


# ----------------------------------------------------------------------------------------------
# 1. gpu-marked tests
# ----------------------------------------------------------------------------------------------


def run_tests() -> list[dict]:
    cmd = [sys.executable, "-m", "pytest", "tests", "benchmarks", "-m", "gpu", "--benchmark-disable", "-q",
           "-p", "no:cacheprovider"]
    start = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    summary = lines[-1].strip("= ") if lines else r.stderr[-300:]
    if r.returncode != 0:
        print(r.stdout[-5000:], r.stderr[-2000:])
    return [dict(name="pytest tests benchmarks -m gpu --benchmark-disable", rc=r.returncode, summary=summary,
                 seconds=time.perf_counter() - start)]


# ----------------------------------------------------------------------------------------------
# 2. benchmarks: fused vs eager vs torch.compile, each checked equal to the fused result
# ----------------------------------------------------------------------------------------------


def _close(got, ref, rtol, atol_rel):
    import torch

    got = got if isinstance(got, (tuple, list)) else (got,)
    ref = ref if isinstance(ref, (tuple, list)) else (ref,)
    if len(got) != len(ref):
        raise AssertionError(f"{len(got)} outputs, expected {len(ref)}")
    for i, (a, b) in enumerate(zip(got, ref)):
        if b.dtype in (torch.int64, torch.int32, torch.bool):
            if not torch.equal(a.cpu(), b.cpu()):
                raise AssertionError(f"output {i} (integer) differs")
            continue
        scale = float(b.detach().abs().max()) if b.numel() else 1.0
        torch.testing.assert_close(a.detach().float(), b.detach().float(), rtol=rtol, atol=atol_rel * max(scale, 1e-30),
                                   msg=lambda m, i=i: f"output {i}: {m}")


def _time_ms(fn, quick=False) -> float:
    """Median ms per call: triton.testing.do_bench (CUDA events) on a GPU; wall clock in a CPU dry run."""
    import torch

    if torch.cuda.is_available():
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100, return_mode="median")
    times = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[1]


def _bench_case(op, shape, impls: dict, rtol=2e-4, atol_rel=1e-5, quick=False) -> dict:
    """impls: name -> zero-argument callable; "fused triton" first, the reference for equality."""
    import torch

    row = dict(op=op, shape=shape, times_ms={}, match=True, error="", note=f"rtol {rtol:g}, atol {atol_rel:g} x max|ref|")
    ref = None
    for name, fn in impls.items():
        try:
            out = fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001
            row["times_ms"][name] = "error"
            msg = f"{name} raised {type(e).__name__}: {str(e)[:300]}"
            if name.startswith("fused"):
                row["match"], row["error"] = False, msg
            else:  # a baseline that cannot run (e.g. torch.compile of a Python loop) is noted, not a mismatch
                row["note"] += f"; {msg}"
            continue
        if ref is None:
            ref = out
        else:
            try:
                _close(out, ref, rtol, atol_rel)
            except AssertionError as e:
                row["match"] = False
                row["error"] += f"{name} != fused triton: {str(e)[:400]} "
        row["times_ms"][name] = _time_ms(fn, quick)
    if ref is None:
        row["match"] = False
    return row


def run_benchmarks(quick=False, dev="cuda") -> list[dict]:
    """dev="cpu" is a dry run of the plumbing (tests; the C++ kernels stand in for the fused ones)."""
    import torch
    import torch.nn.functional as F

    import s2h_kernels
    from s2h_kernels import reference

    try:
        from s2h_kernels._backend import cuda_kernels_built

        have_cuda = dev == "cuda" and cuda_kernels_built()
    except Exception:  # noqa: BLE001
        have_cuda = False
    rows = []
    g = torch.Generator(device=dev).manual_seed(0)

    def compiled(fn):
        return torch.compile(fn, dynamic=False) if dev == "cuda" else fn  # the dry run skips compiling

    # kl_gap_with_grads (the S2H gap and both gradients)
    for B, C in ([(64, 1000)] if quick else [(64, 10), (512, 1000), (4096, 32000)]):
        s = torch.randn(B, C, device=dev, generator=g) * 3
        h = torch.randn(B, C, device=dev, generator=g) * 3

        def eager_autograd(s=s, h=h):
            a, b = s.detach().requires_grad_(True), h.detach().requires_grad_(True)
            loss = reference.kl_gap(a, b, 2.0)
            gs, gh = torch.autograd.grad(loss, (a, b))
            return loss, gs, gh

        def closed_form(s, h, T=2.0):
            lp, lq = F.log_softmax(s / T, -1), F.log_softmax(h / T, -1)
            p = lp.exp()
            d = (p * (lp - lq)).sum(-1, keepdim=True)
            n = s.shape[0]
            return d.sum() / n, p * (lp - lq - d) / (T * n), (lq.exp() - p) / (T * n)

        cf = compiled(closed_form)
        impls = {"fused triton": lambda s=s, h=h: s2h_kernels.kl_gap_with_grads(s, h, 2.0)}
        if have_cuda:
            impls["fused cuda"] = lambda s=s, h=h: s2h_kernels.kl_gap_with_grads(s, h, 2.0, backend="cuda")
        impls.update({"eager (reference + autograd)": eager_autograd, "eager closed form": lambda s=s, h=h: closed_form(s, h),
                      "torch.compile closed form": lambda s=s, h=h: cf(s, h)})
        rows.append(_bench_case("kl_gap_with_grads fp32", f"B={B} C={C}", impls, quick=quick))

    # ca_kld forward + backward
    for B, C in ([(64, 1000)] if quick else [(512, 1000), (512, 32000)]):
        s = torch.randn(B, C, device=dev, generator=g)
        t = torch.randn(B, C, device=dev, generator=g)

        def fwd_bwd(fn, s=s, t=t, **kw):
            a = s.detach().requires_grad_(True)
            loss = fn(a, t, **kw)
            return loss, torch.autograd.grad(loss, a)[0]

        ref_c = compiled(lambda s, t: fwd_bwd(reference.ca_kld, s, t))
        impls = {"fused triton": lambda: fwd_bwd(s2h_kernels.ca_kld)}
        if have_cuda:
            impls["fused cuda"] = lambda: fwd_bwd(s2h_kernels.ca_kld, backend="cuda")
        impls.update({"eager (reference + autograd)": lambda: fwd_bwd(reference.ca_kld),
                      "torch.compile reference": lambda: ref_c(s, t)})
        rows.append(_bench_case("ca_kld fp32 fwd+bwd (std, gamma=None)", f"B={B} C={C}", impls, quick=quick))

    # channel_masks forward + backward over many groups (ResNet-50-like sizes)
    sizes = [64, 64, 256, 128, 128, 512, 256, 256, 1024, 512, 512, 2048] * 4 + [64] * 5
    offsets = torch.tensor([0] + list(torch.tensor(sizes).cumsum(0).tolist()), device=dev)
    offs = offsets.tolist()
    u = torch.randn(offs[-1], device=dev, generator=g)
    gw, ge = torch.randn(offs[-1], device=dev, generator=g), torch.randn(len(sizes), device=dev, generator=g)

    def masks_step(fn, **kw):
        a = u.detach().requires_grad_(True)
        w, e, k = fn(a, offsets if fn is s2h_kernels.channel_masks else offs, **kw)
        return w, e, k, torch.autograd.grad((w, e), a, (gw, ge))[0]

    ref_m = compiled(lambda: masks_step(reference.channel_masks))
    impls = {"fused triton": lambda: masks_step(s2h_kernels.channel_masks)}
    if have_cuda:
        impls["fused cuda"] = lambda: masks_step(s2h_kernels.channel_masks, backend="cuda")
    impls.update({"eager (reference, per group)": lambda: masks_step(reference.channel_masks),
                  "torch.compile reference": ref_m})
    rows.append(_bench_case("channel_masks fwd+bwd fp32", f"{len(sizes)} groups, {offs[-1]} channels", impls,
                            rtol=1e-4, atol_rel=1e-5, quick=quick))

    # dual_linear (torch's default: allow_tf32 False, so both sides in full FP32)
    M, N, K, ko, ki = 256, 1024, 1024, 397, 397
    xs, xh = torch.randn(M, K, device=dev, generator=g), torch.randn(M, ki, device=dev, generator=g)
    W, b = torch.randn(N, K, device=dev, generator=g) / 32, torch.randn(N, device=dev, generator=g)

    def two_linear(xs, xh, W, b):
        return F.linear(xs, W, b), F.linear(xh, W[:ko, :ki], b[:ko])

    tl_c = compiled(two_linear)
    with torch.no_grad():
        rows.append(_bench_case("dual_linear fp32", f"M={M} N=K={N}, hard {ko}x{ki}", {
            "fused triton": lambda: s2h_kernels.dual_linear(xs, xh, W, b, ko, ki),
            "eager (two F.linear)": lambda: two_linear(xs, xh, W, b),
            "torch.compile two F.linear": lambda: tl_c(xs, xh, W, b)}, rtol=1e-3, atol_rel=1e-4, quick=quick))

    # spmm at 90% sparsity (inference)
    gemms = {"r18.layer3.conv3x3": (256, 2304, 196), "r50.layer4.conv1x1": (2048, 512, 49), "r50.fc": (1000, 2048, 1)}
    if not quick:
        gemms["r18.layer1.conv3x3"] = (64, 576, 3136)
    for name, (m, k, n) in gemms.items():
        w = torch.randn(m, k, device=dev, generator=g)
        w = w * (torch.rand(m, k, device=dev, generator=g) >= 0.9)
        x = torch.randn(k, n, device=dev, generator=g)
        bias = torch.randn(m, device=dev, generator=g)
        sw = s2h_kernels.SparseWeight.from_dense(w)
        csr = w.to_sparse_csr()
        dense_c = compiled(lambda w, x, bias: torch.relu(torch.addmm(bias[:, None], w, x)))
        with torch.inference_mode():
            impls = {"fused triton": lambda sw=sw, x=x, bias=bias: s2h_kernels.spmm(sw, x, bias, relu=True)}
            if have_cuda:
                impls["fused cuda"] = lambda sw=sw, x=x, bias=bias: s2h_kernels.spmm(sw, x, bias, relu=True, backend="cuda")
            impls.update({
                "eager dense addmm": lambda w=w, x=x, bias=bias: torch.relu(torch.addmm(bias[:, None], w, x)),
                "eager torch CSR": lambda csr=csr, x=x, bias=bias: torch.relu(csr @ x + bias[:, None]),
                "torch.compile dense": lambda w=w, x=x, bias=bias: dense_c(w, x, bias)})
            rows.append(_bench_case("spmm fp32 90% sparse, bias+relu", f"{name} M={m} K={k} N={n}", impls,
                                    rtol=1e-4, atol_rel=1e-5, quick=quick))
    return rows


# ----------------------------------------------------------------------------------------------
# 3. the two-branch step: stream overlap from a torch.profiler trace
# ----------------------------------------------------------------------------------------------


def _union(intervals):
    out = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def _measure(iv):
    return sum(b - a for a, b in iv)


def _intersect(x, y):
    i = j = 0
    total = 0.0
    while i < len(x) and j < len(y):
        lo, hi = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        if hi > lo:
            total += hi - lo
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return total


def overlap_from_trace(trace: dict) -> dict:
    """Kernels per stream from a chrome trace (torch.profiler export); the main stream is the one with
    the most kernel time, the hard branch's the others. Times in ms."""
    per = {}
    for ev in trace.get("traceEvents", []):
        if ev.get("ph") != "X" or ev.get("cat") != "kernel":
            continue
        stream = ev.get("args", {}).get("stream", ev.get("tid"))
        per.setdefault(stream, []).append((float(ev["ts"]), float(ev["ts"]) + float(ev.get("dur", 0))))
    if not per:
        return dict(streams=[], fraction=None, overlap_ms=0.0, side_ms=0.0, note="no kernels in the trace")
    busy = {s: _measure(_union(iv)) for s, iv in per.items()}
    main = max(busy, key=busy.get)
    side = _union([iv for s, ivs in per.items() if s != main for iv in ivs])
    main_u = _union(per[main])
    side_ms, ov_ms = _measure(side) / 1e3, _intersect(main_u, side) / 1e3
    streams = [dict(stream=str(s), kernels=len(per[s]), ms=busy[s] / 1e3, main=s == main)
               for s in sorted(per, key=lambda s: -busy[s])]
    res = dict(streams=streams, side_ms=side_ms, overlap_ms=ov_ms, fraction=(ov_ms / side_ms) if side_ms else None)
    if len(per) == 1:
        res["note"] = "Every kernel ran on one stream: the hard branch did not run on a second stream, so nothing overlapped."
    return res


def run_overlap(steps=5, dev="cuda") -> dict:
    import torch

    import s2h

    try:
        model = s2h.models.resnet56(num_classes=100)
        what = "ResNet-56 (CIFAR), batch {batch} at 32x32, 100 classes, hard network at 15% FLOPs (wall time per step)."
    except Exception:  # noqa: BLE001
        import torchvision

        model = torchvision.models.resnet18(num_classes=100)
        what = "torchvision ResNet-18, batch {batch} at 32x32, 100 classes, hard network at 15% FLOPs (wall time per step)."
    cuda = dev == "cuda"
    batch = 64 if cuda else 8
    pruned = s2h.convert(model, torch.randn(1, 3, 32, 32), target_flops=0.15).to(dev)
    trainer = s2h.S2HPruner(pruned, torch.optim.SGD(pruned.weight_parameters(), lr=0.05, momentum=0.9))
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, device=dev, generator=g)
    y = torch.randint(0, 100, (batch,), device=dev, generator=g)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(5 if cuda else 1):
        trainer.step(x, y)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.step(x, y)
    sync()
    step_ms = (time.perf_counter() - t0) * 1e3 / steps
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            trainer.step(x, y)
        sync()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    res = overlap_from_trace(trace)
    res.update(what=what.format(batch=batch), steps=steps, step_ms=step_ms)
    return res


# ----------------------------------------------------------------------------------------------
# 4. one epoch of the prune command on digits
# ----------------------------------------------------------------------------------------------


def run_prune() -> dict:
    with tempfile.TemporaryDirectory(prefix="s2h-gpu-prune-") as out:
        cmd = [sys.executable, "-m", "s2h", "prune", "--data", "digits", "--model", "resnet20", "--target-flops", "0.15",
               "--epochs", "1", "--batch-size", "64", "--lr", "0.05", "--device", "cuda", "--out", out]
        start = time.perf_counter()
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        res = dict(command=" ".join(["python"] + cmd[1:-1] + ["OUT"]), rc=r.returncode, seconds=time.perf_counter() - start)
        summary = os.path.join(out, "summary.json")
        if os.path.exists(summary):
            with open(summary) as f:
                res["summary"] = json.load(f)
        elif r.returncode == 0:
            res["rc"] = -1
            res["error"] = "exited 0 but wrote no summary.json"
        if r.returncode != 0:
            res["error"] = (r.stderr or r.stdout)[-1500:]
    return res


# ----------------------------------------------------------------------------------------------


def environment() -> dict:
    import torch

    env = dict(torch=torch.__version__, cuda=torch.version.cuda)
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "not installed"
    p = torch.cuda.get_device_properties(0)
    env["compute capability"] = f"{p.major}.{p.minor}"
    env["SMs"] = p.multi_processor_count
    try:
        from s2h_kernels._backend import cuda_kernels_built

        env["s2h CUDA C++ kernels built"] = "yes" if cuda_kernels_built() else "NO (S2H_SKIP_CUDA=1 build)"
    except Exception as e:  # noqa: BLE001
        env["s2h_kernels"] = f"import failed: {e}"
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True).stdout.strip() or "?"
    except OSError:
        pass
    return env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--skip-tests", action="store_true", help="do not run pytest -m gpu")
    ap.add_argument("--skip-prune", action="store_true", help="do not run the 1-epoch prune")
    ap.add_argument("--quick", action="store_true", help="fewer shapes, shorter timing")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="(tests) run the benchmark and step plumbing on the CPU, quick shapes; the file says so")
    a = ap.parse_args(argv)

    import torch

    dev = "cuda"
    if a.cpu_dry_run:
        dev, a.quick, a.skip_tests, a.skip_prune = "cpu", True, True, True
        report = dict(device="CPU dry run", date=str(datetime.datetime.now().replace(microsecond=0)),
                      env={"torch": torch.__version__, "note": "no GPU: plumbing check only, nothing here is a GPU figure"})
    elif not torch.cuda.is_available():
        print(NO_GPU)
        return 0
    else:
        name = torch.cuda.get_device_name(0)
        report = dict(device=name, date=str(datetime.datetime.now().replace(microsecond=0)), env=environment())
    print(f"gpu-check on {report['device']}: {report['env']}", flush=True)
    steps = [("bench", lambda: run_benchmarks(a.quick, dev)), ("overlap", lambda: run_overlap(dev=dev))]
    if not a.skip_tests:
        steps.insert(0, ("tests", run_tests))
    if not a.skip_prune:
        steps.append(("prune", run_prune))
    for key, fn in steps:
        start = time.perf_counter()
        try:
            report[key] = fn()
        except Exception as e:  # noqa: BLE001  (a crash is a failure, reported in the file)
            traceback.print_exc()
            err = f"{type(e).__name__}: {e}"
            report[key] = {"tests": [dict(name="pytest -m gpu", rc=-1, summary=err)],
                           "bench": [dict(op="(benchmarks)", shape="", match=False, error=err)],
                           "overlap": dict(error=err), "prune": dict(rc=-1, error=err)}[key]
        print(f"  {key}: {time.perf_counter() - start:.0f} s", flush=True)
    path = write_report(report, a.out_dir)
    fails = failures(report)
    print(f"wrote {path}: {'PASS' if not fails else 'FAIL'}")
    for f in fails:
        print(f"  {f}")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
