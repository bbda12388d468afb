"""Where a peer beats s2h, per layer: s2h's sparsified model against the BN-folded dense model,
onnxruntime and DeepSparse, in one process (issue 17, part 2; appendix of sparse_serving.md).

    python benchmarks/sparse_serving_layers.py                         # resnet18 90%, batch 32, 1 thread
    python benchmarks/sparse_serving_layers.py --model resnet18 --sparsity 0.9 --batch 1 --threads 1
    python benchmarks/sparse_serving_layers.py --clock wall            # on a quiet machine

Run it with the interpreter where DeepSparse imports (see sparse_serving.md; without DeepSparse its
columns say why).  Writes one section per case into ``--out`` (default
benchmarks/results/sparse_serving_layers.md; a rerun of a case replaces its section).

How each side is timed:

* torch (s2h and the BN-folded dense model, both torch.fx GraphModules): every graph node of one
  forward is timed by a ``torch.fx.Interpreter`` (convs, the ReLUs, the residual adds, the pools;
  the Python between nodes is outside the node times).  ``--clock cpu`` (default, 1 thread only):
  the thread's CPU time, which another process taking the core does not advance; ``wall``
  otherwise.  The median over ``--rounds`` forwards.
* onnxruntime: its own profiler (per-node kernel time, wall clock), median over the rounds.
* DeepSparse: ``DebugAnalysisEngine`` (its own per-subgraph wall-clock times, averaged over
  ``--ds-iterations``; the minimum of ``--ds-repeats`` such averages).  A wall clock on a busy
  machine: its total is printed next to the engine's CPU-time total (``inflation``).

Everything is attributed to the torch module path the ONNX node names carry (``/layer1/layer1.0/
conv1/Conv`` -> ``layer1.0.conv1``) and grouped by residual block (``layer1.0``; ``stem``,
``head``); a DeepSparse subgraph that spans blocks merges them into one group.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.fx  # noqa: E402
from torch import nn  # noqa: E402

import sparse_serving as ss  # noqa: E402
from s2h.sparse import SparseConv2d, SparseLinear  # noqa: E402

OUT = os.path.join(ss.RESULTS, "sparse_serving_layers.md")


# ---------------------------------------------------------------------------------------------
# names

def onnx_module_path(name: str) -> str:
    """``/layer2/layer2.0/downsample/downsample.0/Conv_output_0`` -> ``layer2.0.downsample.0``;
    ``/layer1/layer1.0/Add`` -> ``layer1.0``; a name without scope (a graph output) -> ``head``."""
    if not name.startswith("/"):
        return "head"
    parts = name.strip("/").split("/")[:-1]
    path: list[str] = []
    for p in parts:
        if path and p.startswith(path[-1] + "."):
            path[-1] = p
        else:
            path.append(p)
    return ".".join(path) if path else "head"


def block_of(path: str) -> str:
    """The residual block a module path belongs to (``layer3.1``), ``stem`` before the first block,
    ``head`` after the last; other models: the first path component."""
    m = re.match(r"(layer\d+\.\d+)(\.|$)", path)
    if m:
        return m.group(1)
    top = path.split(".")[0]
    if top in ("conv1", "bn1", "relu", "maxpool", "x"):
        return "stem"
    if top in ("avgpool", "flatten", "fc", "head", "output"):
        return "head"
    return top


def node_module_path(node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        return re.sub(r"@\d+$", "", list(stack)[-1])
    return {"placeholder": "x", "output": "output"}.get(node.op, node.name)


# ---------------------------------------------------------------------------------------------
# torch: per graph node

class _TimedInterpreter(torch.fx.Interpreter):
    def __init__(self, gm, clock):
        super().__init__(gm)
        self.clock, self.times = clock, defaultdict(list)

    def run_node(self, n):
        t0 = self.clock()
        out = super().run_node(n)
        self.times[n.name].append(self.clock() - t0)
        return out


def torch_node_times(model: nn.Module, x: torch.Tensor, rounds: int, clock) -> list[dict]:
    """One dict per graph node (in graph order): name, op, module path, module type, median ms."""
    if not isinstance(model, torch.fx.GraphModule):
        model = torch.fx.symbolic_trace(model)
    interp = _TimedInterpreter(model, clock)
    with torch.no_grad():
        interp.run(x)
        interp.times.clear()
        for _ in range(rounds):
            interp.run(x)
    mods = dict(model.named_modules())
    out = []
    for node in model.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        mod = mods.get(node.target) if node.op == "call_module" else None
        out.append(dict(node=node.name, op=node.op, path=node_module_path(node),
                        target=type(mod).__name__ if mod is not None else getattr(node.target, "__name__",
                                                                                   str(node.target)),
                        ms=1e3 * statistics.median(interp.times[node.name])))
    return out


# ---------------------------------------------------------------------------------------------
# onnxruntime: its profiler

def onnx_conv_of(onnx_path: str):
    """``conv_of(tensor) -> module path`` of the Conv whose output feeds ``tensor`` through Relu / Add
    nodes (onnxruntime names a fused Conv+ReLU(+Add) node after the last output it computes:
    ``/layer1/layer1.0/relu/Relu_output_0_nchwc`` is layer1.0.conv1); None when no Conv does."""
    import onnx
    graph = onnx.load(onnx_path, load_external_data=False).graph
    producer = {o: n for n in graph.node for o in n.output}

    def conv_of(tensor: str) -> Optional[str]:
        t = re.sub(r"_nchwc$", "", tensor)
        for _ in range(8):
            node = producer.get(t)
            if node is None:
                return None
            if node.op_type == "Conv":
                return onnx_module_path(node.output[0])
            if node.op_type not in ("Relu", "Add", "Clip", "Sum"):
                return None
            convs = [i for i in node.input if i in producer and producer[i].op_type == "Conv"]
            t = convs[0] if convs else node.input[0]
        return None
    return conv_of


def ort_node_times(onnx_path: str, x: torch.Tensor, threads: int, rounds: int) -> tuple[Optional[list[dict]], str]:
    try:
        import onnxruntime as ort
    except ImportError as e:
        return None, f"onnxruntime not installed ({e})"
    so = ss.ort_session_options(ort, threads)
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(tempfile.gettempdir(), f"s2h_ort_prof_{os.getpid()}")
    sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
    xn = x.numpy()
    for _ in range(2):
        sess.run(None, {"x": xn})
    t_mark = None
    for _ in range(rounds):
        sess.run(None, {"x": xn})
    prof = sess.end_profiling()
    with open(prof) as f:
        events = json.load(f)
    os.remove(prof)
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    # keep the node events of the last `rounds` runs (the first two were warm-up)
    if runs:
        t_mark = sorted(r["ts"] for r in runs)[-rounds]
    per = defaultdict(list)
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if t_mark is not None and e["ts"] < t_mark:
            continue
        per[(e["name"][:-len("_kernel_time")], e.get("args", {}).get("op_name", "?"))].append(e["dur"])
    conv_of = onnx_conv_of(onnx_path)
    out = [dict(node=n, op=op, path=onnx_module_path(n), conv=conv_of(n) if op in ("Conv", "FusedConv") else None,
                ms=1e-3 * statistics.median(d)) for (n, op), d in per.items()]
    return out, f"onnxruntime {ort.__version__}"


# ---------------------------------------------------------------------------------------------
# DeepSparse: its analysis engine

def deepsparse_subgraphs(onnx_path: str, x: torch.Tensor, threads: int, iterations: int,
                         repeats: int, clock: str = "cpu") -> tuple[Optional[list[dict]], str, dict]:
    try:
        import deepsparse
        from deepsparse import Engine
        from deepsparse.engine import DebugAnalysisEngine
    except Exception as e:  # noqa: BLE001
        return None, f"deepsparse not importable: {type(e).__name__}: {e}", {}
    batch = x.shape[0]
    xn = [x.numpy()]
    best: dict[str, dict] = {}
    totals = []
    for _ in range(repeats):
        # a fresh engine each time: a second analyze() on the same engine aborts the process on ResNet-18
        # (deepsparse 1.8.0: "Assertion at src/onnxruntime_neuralmagic/nm_execution_provider.cc:88")
        engine = DebugAnalysisEngine(onnx_path, batch_size=batch, num_cores=threads, num_iterations=iterations,
                                     num_warmup_iterations=2)
        info = engine.analyze(xn)
        del engine
        totals.append(info["average_total_time"])
        for i, li in enumerate(info["layer_info"]):
            key = f"{i}:{li['name']}"
            if key not in best or li["average_run_time_in_ms"] < best[key]["ms"]:
                best[key] = dict(name=li["name"], outputs=li["canonical_name"], ms=li["average_run_time_in_ms"],
                                 kernel_sparsity=li["kernel_sparsity"], gflop=li["required_flops"] / 1e9)
    # the plain engine by the torch side's clock (1 thread, cpu: process CPU time; the engine runs on the
    # calling thread) against the analysis' wall-clock layers: their sum is scaled to it
    use_cpu = clock == "cpu" and threads == 1
    tick = time.process_time if use_cpu else time.perf_counter
    plain = Engine(onnx_path, batch_size=batch, num_cores=threads)
    plain.run(xn)
    ts = []
    for _ in range(max(3, iterations // 2)):
        t0 = tick()
        plain.run(xn)
        ts.append(1e3 * (tick() - t0))
    del plain
    subs = list(best.values())
    for s in subs:
        outs = [o for o in s["outputs"].split(",") if o and o != "<none>"]
        s["paths"] = [onnx_module_path(o) for o in outs]
    layer_sum = sum(s["ms"] for s in subs)
    engine_ms = statistics.median(ts)
    for s in subs:
        s["ms_raw"] = s["ms"]
        s["ms"] = s["ms"] * engine_ms / max(layer_sum, 1e-9)
    return subs, f"deepsparse {deepsparse.__version__}", dict(analysis_total_ms=min(totals), layer_sum_ms=layer_sum,
                                                              engine_ms=engine_ms,
                                                              engine_clock="cpu" if use_cpu else "wall")


# ---------------------------------------------------------------------------------------------
# the case

def conv_gflop(mod: nn.Module, in_shape, out_shape) -> float:
    """Dense GFLOP (2 x MACs) of a conv / linear call."""
    w = mod.weight
    if w.dim() == 4:
        return 2e-9 * out_shape[0] * out_shape[2] * out_shape[3] * w.shape[0] * w.shape[1] * w.shape[2] * w.shape[3]
    return 2e-9 * in_shape[0] * w.shape[0] * w.shape[1]


def layer_shapes(model: nn.Module, x: torch.Tensor) -> dict[str, tuple]:
    shapes, hooks = {}, []
    for n, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(
                lambda mod, a, o, n=n: shapes.__setitem__(n, (tuple(a[0].shape), tuple(o.shape)))))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return shapes


def page_faults(model: nn.Module, x: torch.Tensor, n: int = 2) -> dict:
    """Minor page faults and system-time ms per forward (this thread; Linux), after one warm-up."""
    import resource
    who = getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)
    with torch.no_grad():
        model(x)
        r0 = resource.getrusage(who)
        for _ in range(n):
            model(x)
        r1 = resource.getrusage(who)
    return dict(minflt=(r1.ru_minflt - r0.ru_minflt) / n, sys_ms=1e3 * (r1.ru_stime - r0.ru_stime) / n,
                user_ms=1e3 * (r1.ru_utime - r0.ru_utime) / n)


def isolated_layers(model: nn.Module, x: torch.Tensor, names: list[str], rounds: int, threads: int,
                    clock_fn) -> list[dict]:
    """Single layers in isolation, every runtime in interleaved rounds by the same clock: the kernel
    comparison that DeepSparse's wall-clock analysis cannot give on a busy machine.

    Per conv in ``names`` (BN folded, + ReLU): torch dense, s2h's SparseConv2d (ReLU fused; sparse even
    where sparsify kept the layer dense), onnxruntime and DeepSparse on the ONNX export of that conv +
    ReLU.  ``stem``: conv1 + ReLU + max-pool with torch's pool, with s2h's oneDNN pool, onnxruntime and
    DeepSparse (which fuses the three).  Inputs: ReLU of Gaussian noise of the layer's real shape."""
    from s2h.sparse import FastMaxPool2d
    bn = ss.bn_folded(model)
    ins = {}
    def grab(n):
        def hook(mod, args):
            ins.setdefault(n, tuple(args[0].shape))   # returns None: the arguments stay as they are
        return hook
    hooks = [m.register_forward_pre_hook(grab(n)) for n, m in model.named_modules() if n in names or n == "conv1"]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    rows = []
    gen = torch.Generator().manual_seed(5)
    for name in names:
        if name == "stem":
            conv = bn.get_submodule("conv1")
            pool = model.get_submodule("maxpool")
            layer = nn.Sequential(conv, nn.ReLU(), pool).eval()
            variants = {"torch dense": layer, "torch channels-last": layer,
                        "s2h": nn.Sequential(conv, nn.ReLU(), FastMaxPool2d.from_module(pool)).eval()}
            xin = torch.randn(ins["conv1"], generator=gen)
            sparsity, gf = 0.0, None
        else:
            conv = bn.get_submodule(name)
            layer = nn.Sequential(conv, nn.ReLU()).eval()
            variants = {"torch dense": layer, "torch channels-last": layer,
                        "s2h": SparseConv2d.from_dense(conv, relu=True).eval()}
            xin = torch.relu(torch.randn(ins[name], generator=gen))
            sparsity = float((conv.weight == 0).float().mean())
            gf = None
        with torch.no_grad():
            out = layer(xin)
        if name != "stem":
            gf = conv_gflop(conv, xin.shape, out.shape)
        else:
            gf = conv_gflop(conv, xin.shape, conv(xin).shape)
        runners = {k: ss.torch_runner(m) for k, m in variants.items() if k != "torch channels-last"}
        runners["torch channels-last"] = _channels_last(layer)
        notes = {}
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "layer.onnx")
            ss.export_onnx(layer, xin[:1], path)
            for peer, (fn, what) in (("onnxruntime", ss.ort_runner(path, threads)),
                                     ("DeepSparse", ss.deepsparse_runner(path, xin.shape[0], threads))):
                notes[peer] = what
                if fn is not None:
                    runners[peer] = fn
            for k, fn in runners.items():
                ss.check_close(f"{name} {k}", fn(xin), out)
            times = ss.interleaved(runners, xin, rounds, clock_fn)
            del runners
        rows.append(dict(name=name, sparsity=sparsity, gflop=gf, input=list(xin.shape),
                         ms={k: statistics.median(v) for k, v in times.items()}))
    return rows


def _channels_last(layer: nn.Module):
    import copy
    cl = copy.deepcopy(layer).to(memory_format=torch.channels_last)

    def run(x):
        with torch.no_grad():
            return cl(x.contiguous(memory_format=torch.channels_last))
    return run


def default_isolated(model: nn.Module, gflop: dict) -> list[str]:
    """``stem`` (a torchvision ResNet) and, per stage ``layerN``, its conv with the most FLOPs."""
    names = ["stem"] if hasattr(model, "maxpool") and hasattr(model, "conv1") else []
    best: dict[str, str] = {}
    for n, g in gflop.items():
        m = re.match(r"(layer\d+)\.", n)
        if m and (m.group(1) not in best or g > gflop[best[m.group(1)]] + 1e-9):
            best[m.group(1)] = n
    return names + [best[k] for k in sorted(best)]


def analyse(arch: str, sparsity: float, batch: int, threads: int, rounds: int, clock: str, ds_iterations: int,
            ds_repeats: int, malloc: str = "default", isolate: Optional[list[str]] = None) -> dict:
    torch.set_num_threads(threads)
    ss.set_malloc(malloc)
    model, shape, _ = ss.build(arch, sparsity)
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(1))
    clock_fn = time.thread_time if clock == "cpu" and threads == 1 else time.perf_counter
    clock = "cpu" if clock_fn is time.thread_time else "wall"
    report: list = []
    t0 = time.perf_counter()
    s2h = ss.sparsify(model, example_inputs=x, report=report)
    calib_s = time.perf_counter() - t0
    bn = ss.bn_folded(model)
    kinds = {n: ("sparse" if isinstance(m, (SparseConv2d, SparseLinear)) else "dense")
             for n, m in s2h.named_modules() if isinstance(m, (SparseConv2d, SparseLinear, nn.Conv2d, nn.Linear))}
    decisions = {r["name"]: r for r in report if "name" in r and r.get("kind") != "guard"}
    guard = next((r for r in report if r.get("kind") == "guard"), {})
    shapes = layer_shapes(model, x)
    gflop = {n: conv_gflop(model.get_submodule(n), *shapes[n]) for n in shapes}
    # the whole models too, CPU time / wall time as the nodes (interleaved rounds)
    whole = ss.interleaved({"dense_bn": ss.torch_runner(bn), "dense_cl": ss.channels_last_runner(model),
                            "s2h": ss.torch_runner(s2h)}, x, rounds,
                           clock_fn if clock == "cpu" else time.perf_counter)
    faults = {"dense_bn": page_faults(bn, x), "s2h": page_faults(s2h, x)}
    t_s2h = torch_node_times(s2h, x, rounds, clock_fn)
    t_bn = torch_node_times(bn, x, rounds, clock_fn)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "dense.onnx")
        ss.export_onnx(model, x[:1], path)
        t_ort, ort_what = ort_node_times(path, x, threads, rounds)
        t_ds, ds_what, ds_tot = deepsparse_subgraphs(path, x, threads, ds_iterations, ds_repeats, clock)
    iso_names = default_isolated(model, gflop) if isolate is None else isolate
    iso = isolated_layers(model, x, iso_names, max(rounds, 5), threads, clock_fn) if iso_names else []
    return dict(arch=arch, sparsity=sparsity, batch=batch, threads=threads, rounds=rounds, clock=clock, malloc=malloc,
                isolated=iso,
                calib_s=calib_s, guard=guard.get("choice", "-"), kinds=kinds,
                decisions={n: dict(sparsity=r.get("sparsity"), choice=r.get("choice"), speedup=r.get("speedup"))
                           for n, r in decisions.items()},
                gflop=gflop, whole={k: statistics.median(v) for k, v in whole.items()}, faults=faults,
                s2h=t_s2h, bn=t_bn, ort=t_ort, ort_what=ort_what, ds=t_ds, ds_what=ds_what, ds_totals=ds_tot,
                load=os.getloadavg()[0], machine=ss.machine(), torch=torch.__version__)


# ---------------------------------------------------------------------------------------------
# markdown

def _groups(case: dict) -> tuple[dict[str, str], list[str]]:
    """block -> group name (blocks a DeepSparse subgraph spans are merged), groups in model order."""
    order = []
    for n in case["bn"]:
        b = block_of(n["path"])
        if b not in order:
            order.append(b)
    parent = {b: b for b in order}

    def find(b):
        while parent[b] != b:
            b = parent[b]
        return b
    for s in case["ds"] or []:
        blocks = [block_of(p) for p in s["paths"] if block_of(p) in parent]
        for b in blocks[1:]:
            ra, rb = find(blocks[0]), find(b)
            if ra != rb:
                parent[max(ra, rb, key=order.index)] = min(ra, rb, key=order.index)
    members = defaultdict(list)
    for b in order:
        members[find(b)].append(b)
    name = {b: "+".join(members[find(b)]) for b in order}
    return name, list(dict.fromkeys(name[b] for b in order))


def _f(v, fmt="{:.2f}"):
    return "-" if v is None else fmt.format(v)


CONV_TYPES = ("Conv2d", "SparseConv2d", "Linear", "SparseLinear")


def case_markdown(case: dict) -> str:
    group, groups = _groups(case)
    by = {k: defaultdict(float) for k in ("bn", "s2h", "ort", "ds", "s2h_other")}
    for k in ("bn", "s2h", "ort"):
        for n in case[k] or []:
            g = group.get(block_of(n["path"]), block_of(n["path"]))
            by[k][g] += n["ms"]
            if k == "s2h" and n["target"] not in CONV_TYPES:
                by["s2h_other"][g] += n["ms"]
    ds_kernels = defaultdict(list)
    other_ds = 0.0
    for s in case["ds"] or []:
        blocks = [block_of(p) for p in s["paths"]]
        g = group.get(blocks[0]) if blocks else None
        if g is None:
            other_ds += s["ms"]
            continue
        by["ds"][g] += s["ms"]
        ds_kernels[g].append(re.sub(r"_\d+$", "", s["name"]))
    dec = case["decisions"]
    convs_in = defaultdict(list)
    for n in case["bn"]:
        if n["op"] == "call_module" and n["path"] in case["gflop"]:
            convs_in[group[block_of(n["path"])]].append(n["path"])

    def choice(p):
        sp = dec.get(p, {}).get("sparsity")
        return f"{p.rsplit('.', 1)[-1]} {'-' if sp is None else f'{100 * sp:.0f}%'} {case['kinds'].get(p, 'dense')}"

    malloc = case.get("malloc", "default")
    title = (f"## {case['arch']} {100 * case['sparsity']:.0f}%, batch {case['batch']}, {case['threads']} "
             f"thread{'s' if case['threads'] > 1 else ''}" + ("" if malloc == "default" else f", malloc {malloc}"))
    tot = case.get("ds_totals") or {}
    clock_words = "thread CPU time" if case["clock"] == "cpu" else "wall clock"
    faults = case.get("faults") or {}
    fault_text = "; ".join(f"{k} {v['minflt']:.0f} minor page faults and {v['sys_ms']:.0f} ms system time per forward "
                           f"(user {v['user_ms']:.0f} ms)" for k, v in faults.items())
    ds_text = ("-" if not case["ds"] else
               f"{sum(s['ms'] for s in case['ds']):.1f} ms (the plain engine, {tot.get('engine_clock', '?')} clock; "
               f"its analysis engine's layers sum to {tot.get('layer_sum_ms', float('nan')):.1f} ms of wall clock and "
               f"are scaled by x{tot.get('engine_ms', 0) / max(tot.get('layer_sum_ms', 1), 1e-9):.2f} to it)")
    lines = [title, "",
             f"Machine: {case['machine']}; torch {case['torch']}; {case.get('ort_what', '-')}; "
             f"{case.get('ds_what', '-')}; malloc: {ss.MALLOC.get(malloc, malloc)}. Load average {case['load']:.1f} at "
             f"the end. torch nodes timed by {clock_words}, median of {case['rounds']} forwards; sparsify took "
             f"{case['calib_s']:.0f} s (guard: {case['guard']}).", "",
             f"Whole model ({case['clock']} clock, interleaved): BN-folded dense {case['whole']['dense_bn']:.1f} ms, "
             + (f"the same in channels-last {case['whole']['dense_cl']:.1f} ms, " if "dense_cl" in case["whole"] else "")
             + f"s2h {case['whole']['s2h']:.1f} ms. Sums of the per-node times: dense_bn "
             f"{sum(n['ms'] for n in case['bn']):.1f} ms, s2h {sum(n['ms'] for n in case['s2h']):.1f} ms, onnxruntime "
             + (f"{sum(n['ms'] for n in case['ort']):.1f} ms (its profiler, wall clock)" if case["ort"] else "-") +
             f", DeepSparse {ds_text}." + (f" Allocator: {fault_text}." if fault_text else ""), "",
             "### Per block", "",
             "`ms` per block: every node attributed to the block (convs, ReLUs, the residual add, pools); `s2h other`: "
             "the part of s2h's that is not a conv (what DeepSparse fuses into its kernels). DeepSparse: scaled as "
             "above. `s2h/DS`: how many times longer s2h takes there.", "",
             "| block | convs (sparsity, s2h choice) | dense GFLOP | dense_bn ms | s2h ms | s2h other ms | ort ms | "
             "DeepSparse ms | DeepSparse kernels | s2h/DS | s2h - DS ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for g in groups:
        convs = convs_in.get(g, [])
        gf = sum(case["gflop"][p] for p in convs)
        s_, d = by["s2h"].get(g), by["ds"].get(g)
        lines.append(f"| {g} | {', '.join(choice(p) for p in convs) or '-'} | {gf:.2f} | {_f(by['bn'].get(g))} | "
                     f"{_f(s_)} | {_f(by['s2h_other'].get(g, 0.0))} | "
                     f"{_f(by['ort'].get(g)) if case['ort'] else '-'} | {_f(d) if case['ds'] else '-'} | "
                     f"{', '.join(ds_kernels.get(g, [])) or '-'} | "
                     f"{'-' if not (s_ and d) else f'{s_ / d:.2f}'} | "
                     f"{'-' if s_ is None or d is None else f'{s_ - d:+.1f}'} |")
    if other_ds:
        lines.append(f"| (DeepSparse glue: naive subgraphs, shuffles) | | | | | | | {other_ds:.2f} | | | |")
    tb, ts = sum(by["bn"].values()), sum(by["s2h"].values())
    td = sum(by["ds"].values()) + other_ds
    lines.append(f"| **total** | | {sum(case['gflop'].values()):.2f} | {tb:.1f} | {ts:.1f} | "
                 f"{sum(by['s2h_other'].values()):.1f} | "
                 f"{_f(sum(by['ort'].values()), '{:.1f}') if case['ort'] else '-'} | "
                 f"{_f(td, '{:.1f}') if case['ds'] else '-'} | | {'-' if not td else f'{ts / td:.2f}'} | "
                 f"{'-' if not td else f'{ts - td:+.1f}'} |")
    # per conv
    ort_by = defaultdict(float)
    for n in case["ort"] or []:
        if n.get("conv"):
            ort_by[n["conv"]] += n["ms"]
        elif n["op"] in ("Gemm", "MatMul"):
            ort_by[n["path"]] += n["ms"]
    ds_single = {s["paths"][0]: s for s in case["ds"] or [] if len(s["paths"]) == 1}
    ds_multi = {p: s for s in case["ds"] or [] if len(s["paths"]) > 1 for p in s["paths"]}
    bn_ms = {n["path"]: n["ms"] for n in case["bn"] if n["op"] == "call_module"}
    s2h_ms = {n["path"]: n["ms"] for n in case["s2h"] if n["op"] == "call_module"}
    lines += ["", "### Per conv", "",
              "torch times are the conv node alone (s2h: its ReLU fused into sparse layers; dense layers: the ReLU "
              "is a separate node, in the block table). onnxruntime: the Conv node (bias, ReLU and residual add "
              "fused into it). DeepSparse: only where one subgraph computes that conv alone (else the subgraph's "
              "name), scaled as above. `GFLOP/s`: the dense FLOPs over the time (a sparse kernel's effective rate).",
              "",
              "| conv | sparsity | s2h | dense GFLOP | dense_bn ms | s2h ms | ort ms | DeepSparse ms | DS kernel | "
              "dense_bn GFLOP/s | s2h GFLOP/s | ort GFLOP/s | DS GFLOP/s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p, gf in case["gflop"].items():
        sp = dec.get(p, {}).get("sparsity")
        ds = ds_single.get(p)
        dms = ds["ms"] if ds else None
        dname = re.sub(r"_\d+$", "", ds["name"]) if ds else (f"in {ds_multi[p]['name']}" if p in ds_multi else "-")
        o = ort_by.get(p) or None

        def rate(ms):
            return "-" if not ms else f"{gf / ms * 1e3:.0f}"
        lines.append(f"| {p} | {'-' if sp is None else f'{100 * sp:.0f}%'} | {case['kinds'].get(p, '-')} | {gf:.3f} | "
                     f"{_f(bn_ms.get(p))} | {_f(s2h_ms.get(p))} | {_f(o)} | {_f(dms)} | {dname} | "
                     f"{rate(bn_ms.get(p))} | {rate(s2h_ms.get(p))} | {rate(o)} | {rate(dms)} |")
    iso = case.get("isolated") or []
    if iso:
        cols = list(dict.fromkeys(k for r in iso for k in r["ms"]))
        lines += ["", "### Single layers in isolation (every runtime by the same clock)", "",
                  f"Each layer alone (BN folded, + ReLU; `stem`: conv1 + ReLU + max-pool), all runtimes in "
                  f"interleaved rounds by {clock_words}, median ms (`GFLOP/s` from the dense FLOPs). s2h runs the "
                  "layer sparse even where sparsify kept it dense (the kernel comparison). Inputs: ReLU of noise.", "",
                  "| layer | sparsity | input | dense GFLOP | " + " | ".join(f"{c} ms" for c in cols) + " | " +
                  " | ".join(f"{c} GFLOP/s" for c in cols) + " |",
                  "|" + "---|" * (4 + 2 * len(cols))]
        for r in iso:
            ms = [r["ms"].get(c) for c in cols]
            lines.append(f"| {r['name']} | {100 * r['sparsity']:.0f}% | {'x'.join(map(str, r['input']))} | "
                         f"{r['gflop']:.2f} | " + " | ".join(_f(v) for v in ms) + " | " +
                         " | ".join("-" if not v else f"{r['gflop'] / v * 1e3:.0f}" for v in ms) + " |")
    return "\n".join(lines) + "\n"


def write(case: dict, out: str) -> None:
    """Replace (or add) this case's section in ``out``."""
    head = "# Per-layer times: s2h against the dense model, onnxruntime and DeepSparse\n\n" \
           "Written by `benchmarks/sparse_serving_layers.py` (how each side is timed: its docstring). " \
           "The findings are in sparse_serving.md (appendix).\n"
    sections: dict[str, str] = {}
    if os.path.exists(out):
        text = open(out).read()
        for part in re.split(r"(?m)^(?=## )", text)[1:]:
            sections[part.splitlines()[0]] = part.rstrip() + "\n"
    md = case_markdown(case)
    sections[md.splitlines()[0]] = md
    with open(out, "w") as f:
        f.write(head + "\n" + "\n".join(sections[k] for k in sections))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    ap.add_argument("--malloc", choices=sorted(ss.MALLOC), default="default", help="see sparse_serving.set_malloc")
    ap.add_argument("--ds-iterations", type=int, default=5)
    ap.add_argument("--ds-repeats", type=int, default=2)
    ap.add_argument("--isolate", nargs="*", help="layers timed alone against every runtime (default: stem and the "
                    "largest conv of each stage; none: --isolate with no names)")
    ap.add_argument("--json", default="", help="also dump the raw case here")
    ap.add_argument("--from-json", default="", help="only rewrite the markdown from a --json dump")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            case = json.load(f)
    else:
        case = analyse(args.model, args.sparsity, args.batch, args.threads, args.rounds, args.clock,
                       args.ds_iterations, args.ds_repeats, args.malloc, args.isolate)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(case, f)
    write(case, args.out)
    print(case_markdown(case))


if __name__ == "__main__":
    main()
