"""End-to-end sparse serving on the CPU (issue 17, part 2) -> benchmarks/results/sparse_serving.md

Every row is one model at one (batch, threads), all variants measured in ONE process, warm, in
interleaved rounds (each round runs every variant once, in a rotated order); a variant's time is
its median over rounds, a ratio is the median over rounds of the per-round ratio.  Only ratios mean
much on a shared machine; the absolute times swing with the load.

Variants:
  dense        the pruned model as it is (torch eager, zeros in dense weights)
  dense_bn     the same with BatchNorm folded into the convs (torch.fx fuse: what deployment does)
  ort          onnxruntime on the dense ONNX export (optional peer: pip install onnxruntime)
  deepsparse   DeepSparse 1.8.0 on the same ONNX file (optional peer; see the results file)
  s2h          s2h.sparse.sparsify(model, example_inputs=x) (per-layer decisions + whole-model guard)

Models: torchvision ResNet-18 / ResNet-50 at 224x224, random weights (BatchNorm statistics
perturbed), pruned by ONE global magnitude threshold over every conv / linear except the first conv
and the classifier, to 90% and 95%; the small CNN student (28x28) at batch 1.

Other models (e.g. the retrained Fashion-MNIST students): ``bench_model(name, model, input_shape)``
returns rows for ``write_markdown``; ``global_prune`` prunes the way the rows here are pruned.

    python benchmarks/sparse_serving.py                    # the default grid, appends rows to --jsonl
    python benchmarks/sparse_serving.py --report           # rewrite the markdown from --jsonl
DeepSparse 1.8.0 needs numpy<2 and onnx<1.15: run this script with an interpreter where it imports
(see the results file for the side venv used here); without it the column says why.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from typing import Callable, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torchvision  # noqa: E402
from torch import nn  # noqa: E402

from s2h.sparse import SparseConv2d, SparseLinear, sparsify  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
VARIANTS = ["dense", "dense_bn", "ort", "deepsparse", "s2h"]


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

def prunable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every Conv2d / Linear except the first conv and the last linear (the classifier)."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    convs = [n for n, m in layers if isinstance(m, nn.Conv2d)]
    linears = [n for n, m in layers if isinstance(m, nn.Linear)]
    skip = {convs[0] if convs else None, linears[-1] if linears else None}
    return [(n, m) for n, m in layers if n not in skip]


def global_prune(model: nn.Module, sparsity: float) -> nn.Module:
    """One global magnitude threshold over :func:`prunable` layers, in place."""
    layers = prunable(model)
    with torch.no_grad():
        mags = torch.cat([m.weight.abs().flatten() for _, m in layers])
        k = int(mags.numel() * sparsity)
        thr = mags.kthvalue(k).values if k > 0 else mags.new_tensor(-1.0)
        for _, m in layers:
            m.weight.mul_(m.weight.abs() > thr)
    return model


def randomized_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def build(arch: str, sparsity: float) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    if arch == "small_cnn":
        from s2h.models import small_cnn_student
        model, shape = small_cnn_student(), (1, 28, 28)
    else:
        model, shape = getattr(torchvision.models, arch)(), (3, 224, 224)
    model = global_prune(randomized_bn(model.eval()), sparsity)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, shape


def layer_sparsities(model: nn.Module) -> list[float]:
    return [float((m.weight == 0).float().mean()) for _, m in prunable(model)]


# ---------------------------------------------------------------------------------------------
# Runners: name -> callable(x) -> output
# ---------------------------------------------------------------------------------------------

def bn_folded(model: nn.Module) -> nn.Module:
    from torch.fx.experimental.optimization import fuse
    return fuse(copy.deepcopy(model))


def export_onnx(model: nn.Module, x: torch.Tensor, path: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})


def ort_runner(path: str, threads: int):
    try:
        import onnxruntime as ort
    except ImportError as e:
        return None, f"onnxruntime not installed ({e})"
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # No spinning workers: they would steal the cores from the other runtimes in this process.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return (lambda x: sess.run(None, {"x": x.numpy()})[0]), f"onnxruntime {ort.__version__}"


def deepsparse_runner(path: str, batch: int, threads: int):
    try:
        import deepsparse
        from deepsparse import Engine
    except Exception as e:  # noqa: BLE001  (optional peer: say why it is missing)
        return None, f"deepsparse not importable: {type(e).__name__}: {e}"
    engine = Engine(path, batch_size=batch, num_cores=threads)
    return (lambda x: engine.run([x.numpy()])[0]), f"deepsparse {deepsparse.__version__}"


def torch_runner(model: nn.Module):
    def run(x):
        with torch.no_grad():
            return model(x)
    return run


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

def interleaved(runners: dict[str, Callable], x: torch.Tensor, rounds: int) -> dict[str, list[float]]:
    """Per runner, its wall-clock ms in each of ``rounds`` interleaved rounds (after one warm-up)."""
    names = list(runners)
    for n in names:                      # warm-up
        runners[n](x)
    times = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            t0 = time.perf_counter()
            runners[n](x)
            times[n].append(time.perf_counter() - t0)
    return {n: [1e3 * v for v in t] for n, t in times.items()}


def paired(times: dict[str, list[float]], slow: str, fast: str) -> float:
    """Median over rounds of t(slow) / t(fast): how many times faster ``fast`` is."""
    if slow not in times or fast not in times:
        return float("nan")
    return statistics.median(a / max(b, 1e-12) for a, b in zip(times[slow], times[fast]))


def check_close(name: str, out, ref: torch.Tensor) -> None:
    out = torch.as_tensor(out)
    tol = 1e-3 * float(ref.abs().max().clamp_min(1.0))
    if not torch.allclose(out.float(), ref.float(), rtol=0, atol=tol):
        raise AssertionError(f"{name}: output differs from dense by {float((out - ref).abs().max()):.3g}")


def bench_model(name: str, model: nn.Module, input_shape: tuple[int, ...], batches=(1,), threads=(1, 2),
                rounds: int = 9, peers: bool = True, sparsify_kwargs: Optional[dict] = None,
                sparsity: Optional[float] = None) -> list[dict]:
    """Rows for ``write_markdown``: ``model`` (eval, pruned) against its dense forms and the peers.

    ``input_shape`` excludes the batch.  ``peers=False`` skips onnxruntime and DeepSparse."""
    model = model.eval()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = os.path.join(tmp, "dense.onnx")
        if peers:
            export_onnx(model, torch.randn(1, *input_shape), onnx_path)
        for batch in batches:
            for nt in threads:
                rows.append(_bench_one(name, model, input_shape, batch, nt, rounds, peers, onnx_path,
                                       sparsify_kwargs or {}, sparsity))
                print(json.dumps(rows[-1]), flush=True)
    return rows


def _bench_one(name, model, input_shape, batch, nt, rounds, peers, onnx_path, kwargs, sparsity) -> dict:
    old = torch.get_num_threads()
    torch.set_num_threads(nt)
    try:
        x = torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref = model(x)
        runners = {"dense": torch_runner(model), "dense_bn": torch_runner(bn_folded(model))}
        notes = {}
        if peers:
            for peer, (fn, what) in (("ort", ort_runner(onnx_path, nt)),
                                     ("deepsparse", deepsparse_runner(onnx_path, batch, nt))):
                notes[peer] = what
                if fn is not None:
                    runners[peer] = fn
        report: list = []
        t0 = time.perf_counter()
        s2h_model = sparsify(model, example_inputs=x, report=report, **kwargs)
        calib_s = time.perf_counter() - t0
        runners["s2h"] = torch_runner(s2h_model)
        for n, fn in runners.items():
            check_close(n, fn(x), ref)
        times = interleaved(runners, x, rounds)
        layers = [r for r in report if "dense_ms" in r or r.get("choice", "").startswith("dense (")]
        guard = next((r for r in report if r.get("kind") == "guard"), {})
        return dict(kind="row", model=name, sparsity=sparsity, batch=batch, threads=nt, rounds=rounds, times=times,
                    notes=notes, calib_s=calib_s, guard=guard.get("choice", "-"),
                    n_sparse=sum(isinstance(m, (SparseConv2d, SparseLinear)) for m in s2h_model.modules()),
                    n_candidates=len(layers), machine=machine(), torch=torch.__version__)
    finally:
        torch.set_num_threads(old)


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cpus"


# ---------------------------------------------------------------------------------------------
# Per-layer times (where a peer wins: why)
# ---------------------------------------------------------------------------------------------

def layer_times(model: nn.Module, x: torch.Tensor, rounds: int = 9) -> dict[str, float]:
    """Median ms per leaf module in a forward of ``model`` (hooks around each call)."""
    starts, times = {}, {}
    hooks = []
    for n, m in model.named_modules():
        if n and not list(m.children()):
            hooks.append(m.register_forward_pre_hook(lambda mod, a, n=n: starts.__setitem__(n, time.perf_counter())))
            hooks.append(m.register_forward_hook(
                lambda mod, a, o, n=n: times.setdefault(n, []).append(time.perf_counter() - starts[n])))
    try:
        with torch.no_grad():
            model(x)
            times.clear()
            for _ in range(rounds):
                model(x)
    finally:
        for h in hooks:
            h.remove()
    return {n: 1e3 * statistics.median(t) for n, t in times.items()}


def deepsparse_layer_times(onnx_path: str, batch: int, threads: int, x: torch.Tensor) -> dict:
    from deepsparse.engine import DebugAnalysisEngine
    engine = DebugAnalysisEngine(onnx_path, batch_size=batch, num_cores=threads, num_iterations=20,
                                 num_warmup_iterations=5)
    return engine.analyze([x.numpy()])


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def _ms(row: dict, n: str) -> str:
    t = row["times"].get(n)
    return f"{statistics.median(t):.2f}" if t else "-"


def _x(v: float) -> str:
    return "-" if v != v else f"{v:.2f}x"


def table(rows: list[dict]) -> list[str]:
    cols = ["model", "sparsity", "batch", "threads"] + [f"{v} ms" for v in VARIANTS] + \
        ["s2h vs dense", "s2h vs dense_bn", "s2h vs ort", "s2h vs deepsparse", "sparse layers", "guard"]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        sp = "-" if r.get("sparsity") is None else f"{100 * r['sparsity']:.0f}%"
        cells = [r["model"], sp, str(r["batch"]), str(r["threads"])] + [_ms(r, v) for v in VARIANTS]
        cells += [_x(paired(r["times"], v, "s2h")) for v in ("dense", "dense_bn", "ort", "deepsparse")]
        cells += [f"{r['n_sparse']}/{r['n_candidates']}", r["guard"]]
        out.append("| " + " | ".join(cells) + " |")
    return out


def goals(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if not r["model"].startswith("resnet") or r["batch"] != 1:
            continue
        need = 2.0 if r["sparsity"] < 0.925 else 3.0
        bn, ds = paired(r["times"], "dense_bn", "s2h"), paired(r["times"], "deepsparse", "s2h")
        out.append(f"| {r['model']} | {100 * r['sparsity']:.0f}% | {r['threads']} | {bn:.2f}x (goal {need:.0f}x: "
                   f"{'met' if bn >= need else 'not met'}) | " +
                   ("-" if ds != ds else f"{ds:.2f}x ({'met' if ds >= 1 else 'not met'})") + " |")
    return ["| model | sparsity | threads | s2h vs dense_bn | s2h vs deepsparse |", "|---|---|---|---|---|"] + out


def never_slower(rows: list[dict]) -> list[str]:
    out = ["| model | sparsity | batch | threads | s2h vs dense | s2h vs dense_bn | verdict |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        d, bn = paired(r["times"], "dense", "s2h"), paired(r["times"], "dense_bn", "s2h")
        sp = "-" if r.get("sparsity") is None else f"{100 * r['sparsity']:.0f}%"
        verdict = "not slower" if d >= 0.97 else "SLOWER"
        out.append(f"| {r['model']} | {sp} | {r['batch']} | {r['threads']} | {d:.2f}x | {bn:.2f}x | {verdict} |")
    return out


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_markdown(rows: list[dict], path: str, preamble: str = "", appendix: str = "") -> None:
    rows = [r for r in rows if r.get("kind", "row") == "row"]
    key = lambda r: (r["model"], r.get("sparsity") or 0, r["batch"], r["threads"])  # noqa: E731
    latest = {}
    for r in rows:           # a rerun of the same case replaces the earlier row
        latest[key(r)] = r
    rows = sorted(latest.values(), key=key)
    notes = {k: v for r in rows for k, v in r.get("notes", {}).items()}
    lines = ["# Sparse serving on the CPU (issue 17, part 2)", "",
             "Written by `benchmarks/sparse_serving.py`. " + (preamble or ""), "",
             f"Machine: {rows[0]['machine'] if rows else machine()}; torch {torch.__version__}. " +
             "; ".join(f"{k}: {v}" for k, v in sorted(notes.items())), "",
             "Rule: every row is one process, all variants warm, in interleaved rounds (each round runs every "
             "variant once, rotated order); `ms` is the median over rounds, `s2h vs X` the median over rounds of "
             "t(X) / t(s2h) in the same round. `sparse layers` counts layers sparsify made sparse out of the "
             "candidates; `guard` is the whole-model guard's choice.", "",
             "## All rows", ""] + table(rows) + ["", "## Goals (batch 1)", ""] + goals(rows) + \
        ["", "## Never slower than dense", ""] + never_slower(rows) + ["", appendix]
    with open(path, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")


GRIDS = {
    "batch1": [(a, s, (1,), (1, 2)) for a in ("resnet18", "resnet50") for s in (0.9, 0.95)],
    "batch32": [(a, s, (32,), (1, 2)) for a in ("resnet18", "resnet50") for s in (0.9, 0.95)],
    "small": [("small_cnn", 0.95, (1,), (1, 2))],
}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grid", nargs="+", default=["small", "batch1", "batch32"], choices=sorted(GRIDS))
    ap.add_argument("--models", nargs="*", help="only these archs (resnet18, resnet50, small_cnn)")
    ap.add_argument("--rounds", type=int, default=0, help="interleaved rounds (default 11 at batch 1, 5 at 32)")
    ap.add_argument("--jsonl", default=os.path.join(tempfile.gettempdir(), "sparse_serving.jsonl"))
    ap.add_argument("--out", default=os.path.join(RESULTS, "sparse_serving.md"))
    ap.add_argument("--appendix", default="", help="a markdown file appended to the report (notes, analysis)")
    ap.add_argument("--report", action="store_true", help="only rewrite the markdown from --jsonl")
    args = ap.parse_args(argv)
    if not args.report:
        for grid in args.grid:
            for arch, sparsity, batches, threads in GRIDS[grid]:
                if args.models and arch not in args.models:
                    continue
                model, shape = build(arch, sparsity)
                rounds = args.rounds or (11 if max(batches) == 1 else 5)
                for row in bench_model(arch, model, shape, batches, threads, rounds, sparsity=sparsity):
                    with open(args.jsonl, "a") as f:
                        f.write(json.dumps(row) + "\n")
    appendix = open(args.appendix).read() if args.appendix else ""
    write_markdown(read_jsonl(args.jsonl), args.out, appendix=appendix)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
