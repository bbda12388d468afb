"""End-to-end sparse serving on the CPU (issue 17, part 2) -> benchmarks/results/sparse_serving.md

Every row is one model at one (batch, threads), all variants measured in ONE process, warm, in
interleaved rounds (each round runs every variant once, in a rotated order); a variant's time is
its median over rounds, a ratio is the median over rounds of the per-round ratio.  Only ratios mean
much on a shared machine; the absolute times swing with the load.

Variants:
  dense        the pruned model as it is (torch eager, zeros in dense weights)
  dense_bn     the same with BatchNorm folded into the convs (torch.fx fuse: what deployment does)
  dense_cl     dense_bn in channels-last memory format (input converted in the call): torch's fastest
               dense CPU path here (mostly its max-pool, which is a slow loop in NCHW)
  ort          onnxruntime on the dense ONNX export (optional peer: pip install onnxruntime)
  deepsparse   DeepSparse 1.8.0 on the same ONNX file (optional peer; see the results file)
  s2h          s2h.sparse.sparsify(model, example_inputs=x) (per-layer decisions + whole-model guard)

Models: torchvision ResNet-18 / ResNet-50 at 224x224, random weights (BatchNorm statistics
perturbed), pruned by ONE global magnitude threshold over every conv / linear except the first conv
and the classifier, to 90% and 95%; the small CNN student (28x28, random weights) at batch 1; and
the retrained Fashion-MNIST students of ``benchmarks/fashion_oneshot.py`` (``fashion:<method>``,
loaded from ``--fashion-runs``, default runs/fashion_oneshot/<method>-p900-s0 and -p950-s0), whose
rows also give the top-1 of every variant on the 10,000-image Fashion-MNIST test split (serving
must not change the model: s2h's top-1 equals the dense model's, and its predictions differ from
the dense model's on ``pred diff`` images).

Other models: ``bench_model(name, model, input_shape)`` returns rows for ``write_markdown``;
``global_prune`` prunes the way the rows here are pruned.

    python benchmarks/sparse_serving.py --grid quiet       # the final table (all grids, ~13 min quiet)
    python benchmarks/sparse_serving.py --grid fashion     # only the Fashion-MNIST students
    python benchmarks/sparse_serving.py --report           # rewrite the markdown from --jsonl
    python benchmarks/sparse_serving.py --list             # the grids, their rows and expected minutes

Rows are appended to ``--jsonl`` (a rerun of a case replaces its row in the markdown); the markdown
is ``--out`` followed by ``--appendix`` (default benchmarks/results/sparse_serving_notes.md, the
analysis). ``--clock cpu`` times 1-thread rows by the process's CPU time (every runtime here runs
a 1-thread call on the calling thread) so that a busy machine does not inflate them; the default
``wall`` is what to quote from a quiet machine. Per-layer analysis: sparse_serving_layers.py.
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

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
FASHION_RUNS = os.path.join(os.path.dirname(HERE), "runs", "fashion_oneshot")
VARIANTS = ["dense", "dense_bn", "dense_cl", "ort", "deepsparse", "s2h"]
MIN_ROW_SECONDS = 1.0    # a row's interleaved rounds take at least this long (more rounds for tiny models)
EVAL_CHUNK = 500          # top-1 on the test split in chunks of this many images (the function, not the latency)


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


def find_student(runs: str, method: str, sparsity: float, seed: int = 0) -> tuple[Optional[str], str]:
    """The run folder of the retrained Fashion-MNIST student ``<method>-p<permille>-s<seed>`` under
    ``runs`` (written by benchmarks/fashion_oneshot.py), and a note.  Falls back to another seed of
    the same method, then to the most accurate run of any method at that sparsity (the note says
    which); ``(None, why)`` when ``runs`` has no student at that sparsity."""
    tag = f"p{round(1000 * sparsity)}"

    def ok(key):
        return os.path.isfile(os.path.join(runs, key, "model.pt")) and os.path.isfile(os.path.join(runs, key, "masks.pt"))

    want = f"{method}-{tag}-s{seed}"
    if ok(want):
        return os.path.join(runs, want), ""
    names = sorted(os.listdir(runs)) if os.path.isdir(runs) else []
    same = [n for n in names if n.startswith(f"{method}-{tag}-s") and ok(n)]
    if same:
        return os.path.join(runs, same[0]), f"{want} missing, used {same[0]}"
    best, best_top1 = None, -1.0
    for n in names:
        if f"-{tag}-s" in n and ok(n):
            try:
                with open(os.path.join(runs, n + ".json")) as f:
                    top1 = float(json.load(f).get("top1", -1))
            except (OSError, ValueError):
                top1 = -1.0
            if top1 > best_top1:
                best, best_top1 = n, top1
    if best is not None:
        return os.path.join(runs, best), f"{want} missing, used the most accurate run at {tag}: {best}"
    return None, f"no student at {100 * sparsity:.0f}% in {runs} (run benchmarks/fashion_oneshot.py)"


def load_student(run_dir: str) -> tuple[nn.Module, tuple[int, ...], dict]:
    """A retrained student as ``s2h.unstructured.save_pruned`` wrote it (masks re-applied), eval."""
    from s2h.unstructured import load_pruned
    model, _ = load_pruned(run_dir)
    with open(os.path.join(run_dir, "model.json")) as f:
        meta = json.load(f)
    spec = meta.get("spec") or {}
    size = spec.get("image_size") or 28
    model = model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    info = {"run": os.path.basename(os.path.normpath(run_dir)), "sparsity": meta.get("sparsity")}
    res = os.path.normpath(run_dir) + ".json"
    if os.path.isfile(res):
        with open(res) as f:
            info["study_top1"] = json.load(f).get("top1")
    return model, (spec.get("in_channels", 1), size, size), info


_TEST: dict = {}


def fashion_test() -> tuple[torch.Tensor, torch.Tensor]:
    """The Fashion-MNIST test split as the one-shot study evaluates it (s2h.data, normalised)."""
    if "fashion" not in _TEST:
        from s2h.data import get_dataset
        test = get_dataset("fashion-mnist", train=False)
        _TEST["fashion"] = (test.images.contiguous(), test.targets)
    return _TEST["fashion"]


def build(arch: str, sparsity: float, runs: str = FASHION_RUNS):
    """``(model, input shape without batch, info)``: ``info`` says which run a Fashion student
    (``fashion:<method>``) came from; ``(None, None, {"missing": why})`` when ``runs`` has none."""
    torch.manual_seed(0)
    if arch.startswith("fashion:"):
        run_dir, note = find_student(runs, arch.split(":", 1)[1], sparsity)
        if run_dir is None:
            return None, None, {"missing": note}
        model, shape, info = load_student(run_dir)
        if note:
            info["note"] = note
        return model, shape, info
    if arch == "small_cnn":
        from s2h.models import small_cnn_student
        model, shape = small_cnn_student(), (1, 28, 28)
    else:
        model, shape = getattr(torchvision.models, arch)(), (3, 224, 224)
    model = global_prune(randomized_bn(model.eval()), sparsity)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, shape, {}


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


def ort_session_options(ort, threads: int):
    """onnxruntime's options for every measurement here: ``threads`` intra-op threads, full graph
    optimisation, no spinning workers (they would steal the cores from the other runtimes in this
    process)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def ort_runner(path: str, threads: int):
    try:
        import onnxruntime as ort
    except ImportError as e:
        return None, f"onnxruntime not installed ({e})"
    sess = ort.InferenceSession(path, ort_session_options(ort, threads), providers=["CPUExecutionProvider"])
    return (lambda x: sess.run(None, {"x": x.numpy()})[0]), f"onnxruntime {ort.__version__}"


def deepsparse_runner(path: str, batch: int, threads: int):
    try:
        import deepsparse
        from deepsparse import Engine
    except Exception as e:  # noqa: BLE001  (optional peer: say why it is missing)
        return None, f"deepsparse not importable: {type(e).__name__}: {e}"
    engine = Engine(path, batch_size=batch, num_cores=threads)
    return (lambda x: engine.run([x.numpy()])[0]), f"deepsparse {deepsparse.__version__}"


MALLOC = {"default": "glibc defaults", "no-mmap": "glibc mallopt(M_MMAP_MAX=0, M_TRIM_THRESHOLD=2 GiB)"}
_MALLOC = ["default"]


def set_malloc(mode: str) -> str:
    """``no-mmap``: glibc serves every allocation from its heap and keeps freed memory (mallopt, in
    this process, from now on; ``default`` changes nothing).  By default glibc gives large freed
    blocks back to the kernel (munmap above its mmap threshold, trimming of the heap top), so every
    large activation of a batch-32 forward is new memory again and page-faults on first touch: ResNet-18 at batch 32 took ~120k minor faults and ~200 ms
    of system time per forward on one thread (a third of the forward); onnxruntime (its arena) and
    DeepSparse (preallocated buffers) do not.  What jemalloc / tcmalloc (LD_PRELOAD) or
    ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0`` do for a deployment."""
    if mode == "default":
        return _MALLOC[0]
    if mode != "no-mmap":
        raise ValueError(f"set_malloc: unknown mode {mode!r} (default, no-mmap)")
    import ctypes
    import ctypes.util
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    m_mmap_max, m_trim_threshold = -4, -1
    if not (libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2 ** 31 - 1)):
        raise RuntimeError("set_malloc: mallopt refused (not glibc?)")
    _MALLOC[0] = mode
    return mode


def channels_last_runner(model: nn.Module):
    """The BN-folded model in channels-last format; the NCHW input is converted inside the call."""
    cl = bn_folded(model).to(memory_format=torch.channels_last)

    def run(x):
        with torch.no_grad():
            return cl(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x)
    return run


def torch_runner(model: nn.Module):
    def run(x):
        with torch.no_grad():
            return model(x)
    return run


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def row_clock(clock: str, threads: int) -> str:
    """The clock a row is timed by: ``cpu`` (the process's CPU time) only on one thread, where every
    runtime here runs the call on the calling thread (DeepSparse with num_cores=1 included, checked:
    its thread time equals its process time, and an idle engine uses no CPU); wall time otherwise."""
    return "cpu" if clock == "cpu" and threads == 1 else "wall"


def interleaved(runners: dict[str, Callable], x: torch.Tensor, rounds: int,
                clock: Callable[[], float] = time.perf_counter, min_seconds: float = 0.0,
                max_rounds: int = 500) -> dict[str, list[float]]:
    """Per runner, its ms in each of ``rounds`` interleaved rounds (after one warm-up), by ``clock``.

    ``min_seconds``: more rounds (up to ``max_rounds``) when ``rounds`` would take less than that by the
    warm-up round's time (sub-millisecond models: 11 rounds of 0.2 ms say little on a busy machine)."""
    names = list(runners)
    t0 = clock()
    for n in names:                      # warm-up
        runners[n](x)
    warm = clock() - t0
    if min_seconds > 0 and warm > 0:
        rounds = max(rounds, min(max_rounds, int(min_seconds / warm) + 1))
    times = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            t0 = clock()
            runners[n](x)
            times[n].append(clock() - t0)
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


def predictions(fn: Callable, x: torch.Tensor, chunk: int = EVAL_CHUNK) -> torch.Tensor:
    """Arg-max class of ``fn`` over ``x`` in chunks of ``chunk`` (the last one zero-padded: a
    DeepSparse engine has a fixed batch)."""
    out = []
    for i in range(0, len(x), chunk):
        xb = x[i:i + chunk]
        n = len(xb)
        if n < chunk:
            xb = torch.cat([xb, xb.new_zeros(chunk - n, *xb.shape[1:])])
        out.append(torch.as_tensor(fn(xb))[:n].argmax(1))
    return torch.cat(out)


def top1_table(model: nn.Module, onnx_path: Optional[str], eval_data, peers: bool) -> tuple[dict, torch.Tensor]:
    """Top-1 % of the dense forms and the peers on ``eval_data`` (1 thread), and the dense predictions."""
    x, y = eval_data
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        forms = {"dense": torch_runner(model), "dense_bn": torch_runner(bn_folded(model)),
                 "dense_cl": channels_last_runner(model)}
        if peers and onnx_path:
            for peer, (fn, _) in (("ort", ort_runner(onnx_path, 1)),
                                  ("deepsparse", deepsparse_runner(onnx_path, EVAL_CHUNK, 1))):
                if fn is not None:
                    forms[peer] = fn
        preds = {n: predictions(fn, x) for n, fn in forms.items()}
    finally:
        torch.set_num_threads(old)
    top1 = {n: 100.0 * float((p == y).float().mean()) for n, p in preds.items()}
    top1.update({f"{n} pred diff": int((p != preds["dense"]).sum()) for n, p in preds.items() if n != "dense"})
    return top1, preds["dense"]


def bench_model(name: str, model: nn.Module, input_shape: tuple[int, ...], batches=(1,), threads=(1, 2),
                rounds: int = 9, peers: bool = True, sparsify_kwargs: Optional[dict] = None,
                sparsity: Optional[float] = None, clock: str = "wall", eval_data=None,
                info: Optional[dict] = None, jsonl: Optional[str] = None) -> list[dict]:
    """Rows for ``write_markdown``: ``model`` (eval, pruned) against its dense forms and the peers.

    ``input_shape`` excludes the batch.  ``peers=False`` skips onnxruntime and DeepSparse.
    ``eval_data=(x, y)``: also the top-1 of every variant on it (s2h per row, its own decisions).
    ``info``: extra fields copied into every row (the run a student came from).  ``rounds``: an int or
    ``rounds(batch)``.  ``jsonl``: each row is appended to this file as soon as it is measured."""
    model = model.eval()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = os.path.join(tmp, "dense.onnx")
        if peers:
            export_onnx(model, torch.randn(1, *input_shape), onnx_path)
        top1, dense_pred = (top1_table(model, onnx_path if peers else None, eval_data, peers)
                            if eval_data is not None else (None, None))
        for batch in batches:
            for nt in threads:
                row = _bench_one(name, model, input_shape, batch, nt, rounds(batch) if callable(rounds) else rounds,
                                 peers, onnx_path,
                                 sparsify_kwargs or {}, sparsity, row_clock(clock, nt))
                if eval_data is not None:
                    row["top1"] = dict(top1)
                    old_nt = torch.get_num_threads()
                    torch.set_num_threads(1)
                    try:
                        s2h_pred = predictions(row.pop("_s2h_runner"), eval_data[0])
                    finally:
                        torch.set_num_threads(old_nt)
                    row["top1"]["s2h"] = 100.0 * float((s2h_pred == eval_data[1]).float().mean())
                    row["top1"]["s2h pred diff"] = int((s2h_pred != dense_pred).sum())
                row.pop("_s2h_runner", None)
                row.update(info or {})
                rows.append(row)
                print(json.dumps(row), flush=True)
                if jsonl:
                    with open(jsonl, "a") as f:
                        f.write(json.dumps(row) + "\n")
    return rows


def _bench_one(name, model, input_shape, batch, nt, rounds, peers, onnx_path, kwargs, sparsity, clock="wall") -> dict:
    old = torch.get_num_threads()
    torch.set_num_threads(nt)
    start, cpu0, load0 = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    try:
        x = torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref = model(x)
        runners = {"dense": torch_runner(model), "dense_bn": torch_runner(bn_folded(model)),
                   "dense_cl": channels_last_runner(model)}
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
        times = interleaved(runners, x, rounds, CLOCKS[clock], min_seconds=MIN_ROW_SECONDS)
        rounds = len(times["s2h"])
        layers = [r for r in report if "dense_ms" in r or r.get("choice", "").startswith("dense (")]
        guard = next((r for r in report if r.get("kind") == "guard"), {})
        return dict(kind="row", model=name, sparsity=sparsity, batch=batch, threads=nt, rounds=rounds, times=times,
                    notes=notes, calib_s=calib_s, guard=guard.get("choice", "-"),
                    n_sparse=sum(isinstance(m, (SparseConv2d, SparseLinear)) for m in s2h_model.modules()),
                    n_candidates=len(layers), machine=machine(), torch=torch.__version__, clock=clock,
                    malloc=_MALLOC[0],
                    load=[load0, os.getloadavg()[0]], row_s=time.perf_counter() - start,
                    row_cpu_s=time.process_time() - cpu0,
                    choices={r["name"]: [round(r["sparsity"], 3), r["choice"], round(r.get("speedup", 0.0), 2)]
                             for r in layers},
                    _s2h_runner=runners["s2h"])
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


def _name(r: dict) -> str:
    return r["model"] + ("" if r.get("malloc", "default") == "default" else f" ({r['malloc']})")


def _sp(r: dict) -> str:
    return "-" if r.get("sparsity") is None else f"{100 * r['sparsity']:.0f}%"


def _load(r: dict) -> str:
    load = r.get("load")
    return "-" if not load else f"{load[0]:.1f}-{load[1]:.1f}" if abs(load[0] - load[1]) >= 0.05 else f"{load[0]:.1f}"


def table(rows: list[dict]) -> list[str]:
    cols = ["model", "sparsity", "batch", "threads"] + [f"{v} ms" for v in VARIANTS] + \
        ["s2h vs dense", "s2h vs dense_bn", "s2h vs dense_cl", "s2h vs ort", "s2h vs deepsparse", "sparse layers",
         "guard", "clock",
         "malloc", "load"]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [_name(r), _sp(r), str(r["batch"]), str(r["threads"])] + [_ms(r, v) for v in VARIANTS]
        cells += [_x(paired(r["times"], v, "s2h")) for v in ("dense", "dense_bn", "dense_cl", "ort", "deepsparse")]
        cells += [f"{r['n_sparse']}/{r['n_candidates']}", r["guard"], r.get("clock", "wall"),
                  r.get("malloc", "default"), _load(r)]
        out.append("| " + " | ".join(cells) + " |")
    return out


def goals(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if r["batch"] != 1 or r.get("sparsity") is None:
            continue
        need = 2.0 if r["sparsity"] < 0.925 else 3.0
        bn, ds = paired(r["times"], "dense_bn", "s2h"), paired(r["times"], "deepsparse", "s2h")
        out.append(f"| {_name(r)} | {_sp(r)} | {r['threads']} | {bn:.2f}x (goal {need:.0f}x: "
                   f"{'met' if bn >= need else 'not met'}) | " +
                   ("-" if ds != ds else f"{ds:.2f}x ({'met' if ds >= 1 else 'not met'})") + " |")
    return ["| model | sparsity | threads | s2h vs dense_bn | s2h vs deepsparse |", "|---|---|---|---|---|"] + out


def never_slower(rows: list[dict]) -> list[str]:
    out = ["| model | sparsity | batch | threads | s2h vs dense | s2h vs dense_bn | s2h vs dense_cl | verdict |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d, bn, cl = (paired(r["times"], v, "s2h") for v in ("dense", "dense_bn", "dense_cl"))
        verdict = "not slower" if d >= 0.97 else "SLOWER"
        worse = [n for n, v in (("dense_bn", bn), ("dense_cl", cl)) if v == v and v < 0.97]
        if worse and verdict == "not slower":
            verdict += f" (slower than {' and '.join(worse)})"
        out.append(f"| {_name(r)} | {_sp(r)} | {r['batch']} | {r['threads']} | {d:.2f}x | {bn:.2f}x | {_x(cl)} | "
                   f"{verdict} |")
    return out


def students(rows: list[dict], missing: list[dict]) -> list[str]:
    """The Fashion-MNIST students: which run, per-layer sparsity and choice, top-1 of every variant."""
    rows = [r for r in rows if r.get("top1")]
    if not rows and not missing:
        return []
    out = ["", "## Fashion-MNIST students: serving does not change the model", "",
           "Top-1 % on the 10,000-image test split (chunks of "
           f"{EVAL_CHUNK}; dense forms and peers once per model, s2h once per row: each row sparsifies anew, at its "
           "batch and threads). `pred diff`: test images whose predicted class differs from the dense model's. "
           "`layers`: weight sparsity and the choice of each candidate layer in that row.", "",
           "| model | run | sparsity | batch | threads | top-1 dense | dense_bn | dense_cl | ort | deepsparse | s2h | "
           "s2h pred diff | s2h = dense | layers |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["top1"]
        f = lambda k: "-" if k not in t else f"{t[k]:.2f}"  # noqa: E731
        layers = "; ".join(f"{n} {100 * c[0]:.0f}% {c[1].split(' ')[0]}" for n, c in r.get("choices", {}).items())
        same = "yes" if abs(t["s2h"] - t["dense"]) < 1e-9 else "NO"
        run = r.get("run", "-") + (f" ({r['note']})" if r.get("note") else "")
        out.append(f"| {_name(r)} | {run} | {_sp(r)} | {r['batch']} | {r['threads']} | {f('dense')} | "
                   f"{f('dense_bn')} | {f('dense_cl')} | {f('ort')} | {f('deepsparse')} | {f('s2h')} | {t.get('s2h pred diff', '-')} | "
                   f"{same} | {layers} |")
    for m in missing:
        out.append(f"| {m['model']} | - | {_sp(m)} | - | - | - | - | - | - | - | - | - | - | {m['missing']} |")
    return out


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_markdown(rows: list[dict], path: str, preamble: str = "", appendix: str = "") -> None:
    missing = {(r["model"], r.get("sparsity")): r for r in rows if r.get("kind") == "missing"}
    rows = [r for r in rows if r.get("kind", "row") == "row"]

    def key(r):
        return r["model"], r.get("sparsity") or 0, r["batch"], r["threads"], r.get("malloc", "default")

    latest = {}
    for r in rows:           # a rerun of the same case replaces the earlier row
        latest[key(r)] = r
    rows = sorted(latest.values(), key=key)
    missing = [m for k, m in sorted(missing.items(), key=str) if not any((r["model"], r.get("sparsity")) == k
                                                                        for r in rows)]
    notes = {k: v for r in rows for k, v in r.get("notes", {}).items()}
    clocks = sorted({r.get("clock", "wall") for r in rows})
    lines = ["# Sparse serving on the CPU (issue 17, part 2)", "",
             "Written by `benchmarks/sparse_serving.py`. " + (preamble or ""), "",
             f"Machine: {rows[0]['machine'] if rows else machine()}; torch {torch.__version__}. " +
             "; ".join(f"{k}: {v}" for k, v in sorted(notes.items())), "",
             "Rule: every row is one process, all variants warm, in interleaved rounds (each round runs every "
             "variant once, rotated order); `ms` is the median over rounds, `s2h vs X` the median over rounds of "
             "t(X) / t(s2h) in the same round. `sparse layers` counts layers sparsify made sparse out of the "
             "candidates; `guard` is the whole-model guard's choice. `clock`: `wall` is elapsed time; `cpu` the "
             "process's CPU time (1-thread rows only: every runtime runs a 1-thread call on the calling thread), "
             "which a busy machine inflates less. `load`: the 1-minute load average at the start and end of the "
             "row (2 cores: above ~1 another process shared the machine). `malloc`: `no-mmap` rows ran with glibc keeping "
             "freed memory (`--malloc no-mmap`, see `set_malloc`: no page faults on every large activation of a "
             "forward); `default` is glibc as it comes." +
             (" **Rows timed by CPU time are indicative; quote wall-clock rows from a quiet machine.**"
              if "cpu" in clocks else ""), "",
             "## All rows", ""] + table(rows) + ["", "## Goals (batch 1)", ""] + goals(rows) + \
        ["", "## Never slower than dense", ""] + never_slower(rows) + students(rows, missing) + ["", appendix]
    with open(path, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")


FASHION_STUDENTS = ("gmp-ce", "grad-kd-kd")
"""gradual magnitude + CE retraining: the most accurate student at 90% and 95% in the one-shot study;
the paper's grad-kd + KD: its layers are left far less uniform (53% / 63% / 99% / 99% at 90%)."""

GRIDS = {
    "batch1": [(a, s, (1,), (1, 2)) for a in ("resnet18", "resnet50") for s in (0.9, 0.95)],
    "batch32": [(a, s, (32,), (1, 2)) for a in ("resnet18", "resnet50") for s in (0.9, 0.95)],
    "small": [("small_cnn", 0.95, (1,), (1, 2))],
    "fashion": [(f"fashion:{m}", s, (1, 32), (1, 2)) for m in FASHION_STUDENTS for s in (0.9, 0.95)],
}
GRIDS["quiet"] = GRIDS["fashion"] + GRIDS["small"] + GRIDS["batch1"] + GRIDS["batch32"]

MINUTES = {"batch1": 1.0, "batch32": 10.5, "small": 0.2, "fashion": 1.0}
"""Expected minutes of each grid on the quiet 2-core machine (see --list): the process CPU time of its
one-thread rows measured under load (7.1 min for all of them), two-thread rows taken as 0.7x those."""


def rounds_for(batch: int, override: int = 0) -> int:
    return override or (11 if batch == 1 else 5)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grid", nargs="+", default=["small", "batch1", "batch32", "fashion"], choices=sorted(GRIDS))
    ap.add_argument("--models", nargs="*", help="only these models: resnet18, resnet50, small_cnn, fashion_student "
                    "(every Fashion student) or fashion:<method> (one)")
    ap.add_argument("--threads", nargs="*", type=int, help="only these thread counts")
    ap.add_argument("--batches", nargs="*", type=int, help="only these batch sizes")
    ap.add_argument("--rounds", type=int, default=0, help="interleaved rounds (default 11 at batch 1, 5 at 32)")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="cpu: time 1-thread rows by process CPU time (a busy machine); 2-thread rows stay wall")
    ap.add_argument("--malloc", choices=sorted(MALLOC), default="default",
                    help="no-mmap: glibc keeps freed memory (no page faults per batch-32 forward; see set_malloc)")
    ap.add_argument("--fashion-runs", default=FASHION_RUNS, help="the one-shot study's run folder")
    ap.add_argument("--no-peers", action="store_true", help="skip onnxruntime and DeepSparse")
    ap.add_argument("--jsonl", default=os.path.join(tempfile.gettempdir(), "sparse_serving.jsonl"))
    ap.add_argument("--out", default=os.path.join(RESULTS, "sparse_serving.md"))
    ap.add_argument("--appendix", default=os.path.join(RESULTS, "sparse_serving_notes.md"),
                    help="a markdown file appended to the report (notes, analysis); '' for none")
    ap.add_argument("--preamble", default="", help="a sentence under the title (when and how these rows were measured)")
    ap.add_argument("--report", action="store_true", help="only rewrite the markdown from --jsonl")
    ap.add_argument("--list", action="store_true", help="print the grids' rows and expected minutes, run nothing")
    args = ap.parse_args(argv)
    os.makedirs(os.path.dirname(os.path.abspath(args.jsonl)), exist_ok=True)
    set_malloc(args.malloc)

    def wanted(arch):
        if not args.models:
            return True
        return arch in args.models or (arch.startswith("fashion:") and "fashion_student" in args.models)

    grids = list(dict.fromkeys(args.grid))
    if "quiet" in grids:
        grids = ["quiet"]
    if args.list:
        for g in sorted(GRIDS):
            mins = sum(MINUTES.get(x, 0) for x in (("fashion", "small", "batch1", "batch32") if g == "quiet" else (g,)))
            print(f"{g}: ~{mins:.1f} min quiet; " + ", ".join(
                f"{a} {100 * s:.0f}% batch {'/'.join(map(str, b))} threads {'/'.join(map(str, t))}"
                for a, s, b, t in GRIDS[g]))
        return
    if not args.report:
        t_start, c_start = time.perf_counter(), time.process_time()
        for grid in grids:
            for arch, sparsity, batches, threads in GRIDS[grid]:
                if not wanted(arch):
                    continue
                batches = [b for b in batches if not args.batches or b in args.batches]
                threads = [t for t in threads if not args.threads or t in args.threads]
                if not batches or not threads:
                    continue
                model, shape, info = build(arch, sparsity, args.fashion_runs)
                if model is None:
                    print(f"{arch} {100 * sparsity:.0f}%: {info['missing']}", flush=True)
                    with open(args.jsonl, "a") as f:
                        f.write(json.dumps(dict(kind="missing", model=arch, sparsity=sparsity, **info)) + "\n")
                    continue
                eval_data = fashion_test() if arch.startswith("fashion:") else None
                if info.get("sparsity") is not None:
                    sparsity = round(float(info.pop("sparsity")), 3)
                for row in bench_model(arch, model, shape, batches, threads, lambda b: rounds_for(b, args.rounds),
                                       peers=not args.no_peers, sparsity=sparsity, clock=args.clock,
                                       eval_data=eval_data, info=info, jsonl=args.jsonl):
                    pass
        print(f"measured in {(time.perf_counter() - t_start) / 60:.1f} min wall, "
              f"{(time.process_time() - c_start) / 60:.1f} min CPU", flush=True)
    appendix = open(args.appendix).read() if args.appendix and os.path.exists(args.appendix) else ""
    write_markdown(read_jsonl(args.jsonl), args.out, preamble=args.preamble, appendix=appendix)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
