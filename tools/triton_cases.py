"""Every Triton kernel of s2h_kernels, compiled for real GPU targets without a GPU.

Kernels are found by introspection: every module of the ``s2h_kernels`` package is imported and
every ``triton.jit`` function (or ``triton.autotune`` / ``triton.heuristics`` wrapper) in it is
collected, keyed by the kernel function's name (not its module: kernels move between files). A
``triton.jit`` function that another one calls is a helper (inlined into its caller), not a
kernel.

The compile cases come from the launchers themselves: each Triton custom op (``s2h::*_triton``,
found the same way) is called on ``meta`` tensors at the shapes in ``LAUNCHES`` below, with
``JITFunction.run`` replaced by a recorder. So the block sizes, warps and constexprs compiled are
the ones the launcher's own code picks for those shapes (nothing is copied from it), and the
argument specialisation (16-byte alignment, divisibility of integers by 16, integers equal to 1)
is Triton's own binder's. An autotuned kernel is recorded once per config. Each recorded launch is
then compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` for
sm_80 (A100) and sm_90 (H100, Triton compiles it as sm_90a), with ptxas's ``-v`` report captured.

A kernel found but never launched by any case, or a Triton op with no entry in ``LAUNCHES``, is a
coverage failure: a new kernel cannot be forgotten.

    python tools/triton_cases.py [--subset fast|full] [--arch 80,90] [--json OUT] [--extra-module FILE]

exits 1 on a coverage failure or a compile error. ``tests/kernels/test_triton_compile.py`` runs it;
``tools/gpu_resources.py`` uses it for the resource report. Must run with ``TRITON_INTERPRET=0``
(set here, before triton is imported): under the interpreter ``triton.jit`` returns objects the
compiler cannot take.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import importlib.util
import io
import json
import os
import pkgutil
import re
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

os.environ["TRITON_INTERPRET"] = "0"  # before triton (and s2h_kernels) are imported

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

ARCHS = (80, 90)
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")


# ----------------------------------------------------------------------------------------------
# The shapes each Triton op's launcher is called with. Keyed by custom-op name (stable across file
# moves). Each generator yields (dtype label, shape label, thunk); the thunk calls the launcher (the
# op's Python kernel: ``CustomOpDef._init_fn``, or the function given to ``Library.impl`` for CUDA)
# on meta tensors.
#
# The shapes are derived from each launcher's own ``launch_config`` function (s2h_kernels/_triton/
# <op>.py): candidate sizes are mapped through it and one size is kept per distinct config, so
# every config the launcher can pick is compiled and nothing is copied from its code. "full" keeps
# them all, plus the benchmark sizes; "fast" the smallest and largest config and the benchmark
# sizes, every dtype. Autotuned kernels (dual_linear) are compiled for every config their
# autotuner would benchmark for the arguments (after its dtype pruning).
# ----------------------------------------------------------------------------------------------


def _t(shape, dtype, device="meta"):
    import torch

    return torch.empty(shape, dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype, device=device)


def _distinct(config_of, candidates) -> list:
    """The first candidate of each distinct ``config_of(candidate)``, in order."""
    seen: dict = {}
    for c in candidates:
        seen.setdefault(repr(sorted(config_of(c).items())), c)
    return list(seen.values())


def _pick(sizes: list, full: bool, extra=()) -> list:
    chosen = sizes if full else sizes[:1] + sizes[-1:]
    return sorted(set(chosen) | set(extra))


def _kl_classes(config_of, full: bool) -> list[int]:
    # powers of two up to 2^16 reach every BLOCK / ROWS / warps the launcher can pick; 1000 and
    # 32000 are benchmark sizes (1000: C not a multiple of 16)
    return _pick(_distinct(config_of, [2 ** i for i in range(17)]), full, (1000, 32000))


def _launch_kl_gap(op, full):
    import torch

    from s2h_kernels._triton import kl_gap

    for dtype in FLOAT_DTYPES:
        for C in _kl_classes(lambda c: kl_gap.launch_config(c, getattr(torch, dtype)), full):
            x = _t((64, C), dtype)
            yield dtype, f"B=64 C={C}", lambda x=x: op(x, x, 1.0, 1.0)


def _launch_ca_kld(op, full):
    import torch

    from s2h_kernels._triton import ca_kld

    for dtype in FLOAT_DTYPES:
        dt = getattr(torch, dtype)
        sizes = _kl_classes(lambda c: {"ca_kld": ca_kld.launch_config(c, dt), "top1": ca_kld.launch_config(c, dt, "top1")},
                            full)
        for C in sizes:
            x = _t((64, C), dtype)
            # gamma=None launches the top-1 kernel as well; both STD variants.
            yield dtype, f"B=64 C={C} gamma=None std", lambda x=x: op(x, x, 4.0, None, True, 1e-7, 1.0)
            yield dtype, f"B=64 C={C} gamma=0.5", lambda x=x: op(x, x, 4.0, 0.5, False, 1e-7, 1.0)


def _mask_inputs(dtype, groups=53, buckets=3000):
    import torch

    u = _t((buckets,), dtype)
    offsets = _t((groups + 1,), torch.int64)
    divisors = _t((groups,), torch.int64)
    return u, offsets, divisors


def _launch_channel_masks(op, full):
    # launch_config(dtype) has one GPU config per dtype (the group sizes are on the device)
    for dtype in FLOAT_DTYPES:
        u, offsets, divisors = _mask_inputs(dtype)
        for mode in (0, 1):  # hard_width threshold / expected
            yield dtype, f"hard_mode={mode}", lambda u=u, o=offsets, d=divisors, m=mode: op(u, o, d, 1.0, m, 3000)


def _launch_channel_masks_backward(op, full):
    for dtype in FLOAT_DTYPES:
        u, offsets, divisors = _mask_inputs(dtype)
        gw, ge = _t((3000,), dtype), _t((53,), dtype)
        yield dtype, "", lambda u=u, o=offsets, d=divisors, gw=gw, ge=ge: op(gw, ge, u, o, d, 1.0)


@contextlib.contextmanager
def _allow_tf32(flag: bool):
    import torch

    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = flag
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _launch_dual_linear(op, full):
    # Autotuned: every config of the dtype's list is compiled at each shape. Row counts: one per
    # distinct launch_config (the default the interpreter runs); the benchmark's layer 1024x1024,
    # hard ~40% per side.
    import torch

    from s2h_kernels._triton import dual_linear

    for dtype in FLOAT_DTYPES + ("float32+tf32",):
        dt = dtype.split("+")[0]
        tf32 = dtype.endswith("tf32")
        prec = "tf32" if tf32 else "ieee"
        ms = _distinct(lambda m: dual_linear.launch_config(m, getattr(torch, dt), prec), [16, 256])
        for m in ms:
            for bias in ((True, False) if full else (True,)):
                xs, xh, w = _t((m, 1024), dt), _t((m, 400), dt), _t((1024, 1024), dt)
                b = _t((1024,), dt) if bias else None

                def call(xs=xs, xh=xh, w=w, b=b, tf32=tf32):
                    with _allow_tf32(tf32):
                        return op(xs, xh, w, b, 410, 400)

                yield dtype, f"M={m} N=K=1024 bias={bias}", call


def _launch_spmm(op, full):
    import torch

    from s2h_kernels._triton import spmm

    # half inputs run in float32 (spmm's _compute_dtype); N=1 and 3136 are benchmark sizes
    for dtype in ("float32", "float64"):
        ns = _pick(_distinct(lambda n: spmm.launch_config(n, getattr(torch, dtype), interpreted=False),
                             [2 ** i for i in range(13)]), full, (1, 196, 3136) if full else (1, 3136))
        for n in ns:
            for bias, relu in (((True, True), (True, False), (False, True), (False, False)) if full else ((True, True),)):
                m, k, nnz = 256, 1024, 26214
                args = (_t((nnz,), dtype), _t((m + 1,), torch.int32), _t((nnz,), torch.int32), _t((m,), torch.int32),
                        _t((k, n), dtype), _t((m,), dtype) if bias else None, relu)
                yield dtype, f"M={m} K={k} N={n} bias={bias} relu={relu}", lambda a=args: op(*a)


LAUNCHES: dict[str, Callable] = {
    "s2h::kl_gap_triton": _launch_kl_gap,
    "s2h::ca_kld_triton": _launch_ca_kld,
    "s2h::channel_masks_triton": _launch_channel_masks,
    "s2h::channel_masks_triton_backward": _launch_channel_masks_backward,
    "s2h::dual_linear_triton": _launch_dual_linear,
    "s2h::spmm_triton": _launch_spmm,
}


# ----------------------------------------------------------------------------------------------
# Discovery
# ----------------------------------------------------------------------------------------------


@dataclass
class Found:
    kernels: dict = field(default_factory=dict)  # name -> (JITFunction, wrapper or None, module)
    helpers: dict = field(default_factory=dict)  # name -> module
    ops: dict = field(default_factory=dict)  # "s2h::x_triton" -> its Python launcher (the op's CUDA kernel)


@contextlib.contextmanager
def _capturing_impls(sink: dict):
    """Records the Python kernels registered with ``torch.library.Library.impl`` for CUDA (how
    Triton ops defined with ``Library.define`` get their launcher) while s2h_kernels is imported."""
    import torch

    orig = torch.library.Library.impl

    def impl(self, op_name, fn, dispatch_key="", *args, **kwargs):
        name = op_name if isinstance(op_name, str) else getattr(op_name, "__name__", str(op_name))
        if dispatch_key == "CUDA" and "triton" in name and callable(fn):
            sink[f"{self.ns}::{name.split('.')[0]}"] = fn
        return orig(self, op_name, fn, dispatch_key, *args, **kwargs)

    torch.library.Library.impl = impl
    try:
        yield
    finally:
        torch.library.Library.impl = orig


def _modules(extra_files=(), impls=None):
    if "s2h_kernels" in sys.modules:
        raise RuntimeError("tools/triton_cases.py must import s2h_kernels itself (to see its op registrations)")
    with _capturing_impls(impls if impls is not None else {}):
        import s2h_kernels

        mods = [s2h_kernels]
        for info in pkgutil.walk_packages(s2h_kernels.__path__, "s2h_kernels."):
            if info.name.rsplit(".", 1)[-1] == "_C":
                continue
            mods.append(importlib.import_module(info.name))
    for i, path in enumerate(extra_files):
        spec = importlib.util.spec_from_file_location(f"_s2h_extra_kernels_{i}", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        mods.append(mod)
    return mods


def _base_jit(obj):
    """(JITFunction, outermost wrapper or None) for a jit function or an autotune/heuristics wrapper."""
    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.jit import JITFunction

    if isinstance(obj, JITFunction):
        return obj, None
    if isinstance(obj, (Autotuner, Heuristics)):
        inner = obj
        while not isinstance(inner, JITFunction):
            inner = getattr(inner, "fn", None)
            if inner is None:
                return None, None
        return inner, obj
    return None, None


def _called_names(jit) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(jit.src)):
        if isinstance(node, ast.Call):
            f = node.func
            names.add(f.id if isinstance(f, ast.Name) else getattr(f, "attr", ""))
    return names


def discover(extra_files=()) -> Found:
    from torch._library.custom_ops import CustomOpDef

    found = Found()
    jits = {}
    impls: dict = {}
    mods = _modules(extra_files, impls)
    found.ops.update(impls)
    for mod in mods:
        for obj in list(vars(mod).values()):
            if isinstance(obj, CustomOpDef) and "triton" in obj._name:
                found.ops[f"{obj._namespace}::{obj._name}"] = obj._init_fn
                continue
            jit, wrapper = _base_jit(obj)
            if jit is None or not (jit.module.startswith("s2h_kernels") or jit.module.startswith("_s2h_extra")):
                continue
            name = jit.fn.__name__
            prev = jits.get(name)
            if prev is None or (wrapper is not None and prev[1] is None):
                jits[name] = (jit, wrapper, jit.module)
    called = set()
    for name, (jit, _, _) in jits.items():
        g = jit.fn.__globals__
        for callee in _called_names(jit):
            if callee != name and callee in jits and _base_jit(g.get(callee))[0] is not None:
                called.add(callee)
    for name, entry in jits.items():
        if name in called and entry[1] is None:
            found.helpers[name] = entry[2]
        else:
            found.kernels[name] = entry
    return found


# ----------------------------------------------------------------------------------------------
# Recording the launchers' launches
# ----------------------------------------------------------------------------------------------


@dataclass
class Launch:
    kernel: str
    op: str
    dtype: str
    shape: str
    jit: object
    args: tuple
    kwargs: dict
    grid: object


@contextlib.contextmanager
def _recording(sink: list):
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    orig_run, orig_auto = JITFunction.run, Autotuner.run

    def run(self, *args, grid, warmup, **kwargs):
        sink.append((self, args, dict(kwargs), grid))
        return None

    def auto_run(self, *args, **kwargs):
        # every config the autotuner would benchmark for these arguments (after its own pruning,
        # e.g. by dtype) is a compile case
        self.nargs = dict(zip(self.arg_names, args))
        configs = self.prune_configs(kwargs)
        self.nargs = None
        for config in configs:
            self.fn.run(*args, **kwargs, **config.all_kwargs())

    JITFunction.run, Autotuner.run = run, auto_run
    try:
        yield
    finally:
        JITFunction.run, Autotuner.run = orig_run, orig_auto


def record(found: Found, subset: str) -> tuple[list[Launch], list[str]]:
    """Calls every Triton op's launcher at its LAUNCHES shapes; returns the launches and errors."""
    launches, errors = [], []
    for op_name, launcher in sorted(found.ops.items()):
        gen = LAUNCHES.get(op_name)
        if gen is None:
            errors.append(f"Triton op {op_name} has no entry in tools/triton_cases.py LAUNCHES")
            continue
        for dtype, shape, thunk in gen(launcher, subset == "full"):
            sink = []
            try:
                with _recording(sink):
                    thunk()
            except Exception as e:  # noqa: BLE001  (reported, the sweep goes on)
                errors.append(f"{op_name} {dtype} {shape}: launcher raised {type(e).__name__}: {e}")
                continue
            for jit, args, kwargs, grid in sink:
                launches.append(Launch(jit.fn.__name__, op_name, dtype, shape, jit, args, kwargs, grid))
    return launches, errors


# ----------------------------------------------------------------------------------------------
# Compiling
# ----------------------------------------------------------------------------------------------

_PTXAS_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


@dataclass
class Result:
    kernel: str
    op: str
    dtype: str
    arch: int
    config: str
    shapes: list
    signature: str
    ok: bool
    error: str = ""
    num_warps: int = 0
    num_stages: int = 0
    regs: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    stack: int = -1
    shared: int = -1
    ptxas_warnings: list = field(default_factory=list)
    mma: str = ""  # tensor-core instructions in the PTX: "wgmma", "mma" or "" (none: FMA only)
    cp_async: bool = False  # asynchronous global->shared copies (software pipelining) in the PTX
    grid: list = field(default_factory=list)
    seconds: float = 0.0


def _fmt_const(v) -> str:
    s = str(v)
    return s.replace("triton.language.", "").replace("tl.", "")


def _prepare(launch: Launch, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    jit = launch.jit
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    kw = dict(launch.kwargs)
    kw["debug"] = kw.get("debug", jit.debug) or triton.knobs.runtime.debug
    kw["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
    bound, spec, opts = binder(*launch.args, **kw)
    options, signature, constexprs, attrs = jit._pack_args(backend, kw, bound, spec, opts)
    declared = [p.name for p in jit.params if p.is_constexpr]
    named = {jit.arg_names[k[0]]: v for k, v in constexprs.items() if len(k) == 1}
    cfg = " ".join(f"{n}={_fmt_const(named[n])}" for n in declared if n in named)
    cfg = f"{cfg} warps={options.num_warps} stages={options.num_stages}".strip()
    key = (launch.kernel, arch, repr(sorted(signature.items())), repr(sorted((k, _fmt_const(v)) for k, v in constexprs.items())),
           repr(sorted(attrs.items())), options.num_warps, options.num_stages)
    return target, options, signature, constexprs, attrs, cfg, key


def compile_launches(launches: list[Launch], archs=ARCHS, progress=None) -> list[Result]:
    import triton

    results: dict = {}
    triton.knobs.nvidia.dump_ptxas_log = True
    for launch in launches:
        for arch in archs:
            try:
                target, options, signature, constexprs, attrs, cfg, key = _prepare(launch, arch)
            except Exception as e:  # noqa: BLE001
                r = Result(launch.kernel, launch.op, launch.dtype, arch, "?", [launch.shape], "", False,
                           f"binding failed: {type(e).__name__}: {e}")
                results[(launch.kernel, arch, launch.dtype, launch.shape)] = r
                continue
            if key in results:
                results[key].shapes.append(launch.shape)
                continue
            sig = ", ".join(f"{k}:{v}" for k, v in signature.items() if v != "constexpr")
            grid = list(launch.grid) if isinstance(launch.grid, (tuple, list)) else []
            r = Result(launch.kernel, launch.op, launch.dtype, arch, cfg, [launch.shape], sig, True,
                       num_warps=options.num_warps, num_stages=options.num_stages, grid=grid)
            buf = io.StringIO()
            start = time.perf_counter()
            try:
                with contextlib.redirect_stdout(buf):
                    k = triton.compile(triton.compiler.ASTSource(launch.jit, signature, constexprs, attrs),
                                       target=target, options=options.__dict__)
                r.shared = int(k.metadata.shared)
                ptx = k.asm.get("ptx", "")
                r.mma = "wgmma" if "wgmma." in ptx else ("mma" if re.search(r"\bmma\.sync", ptx) else "")
                r.cp_async = "cp.async" in ptx
            except Exception as e:  # noqa: BLE001
                r.ok = False
                r.error = f"{type(e).__name__}: {e}"[-4000:]
            r.seconds = time.perf_counter() - start
            log = buf.getvalue()
            if (m := _PTXAS_PROPS.search(log)) is not None:
                r.stack, r.spill_stores, r.spill_loads = map(int, m.groups())
            if (m := _PTXAS_REGS.search(log)) is not None:
                r.regs = int(m.group(1))
            r.ptxas_warnings = [ln.strip() for ln in log.splitlines() if "warning" in ln.lower()]
            results[key] = r
            if progress:
                progress(r)
    return list(results.values())


def coverage_errors(found: Found, launches: list[Launch]) -> list[str]:
    launched = {la.kernel for la in launches}
    return [f"Triton kernel {name} (module {entry[2]}) is launched by no case in tools/triton_cases.py LAUNCHES: "
            "add the op's launcher shapes there" for name, entry in sorted(found.kernels.items()) if name not in launched]


def run(subset="fast", archs=ARCHS, extra_files=(), progress=None, compile_=True):
    """(found, launches, results, errors). A fresh Triton cache so that ptxas really runs."""
    cache = tempfile.mkdtemp(prefix="s2h-triton-cases-")
    os.environ["TRITON_CACHE_DIR"] = cache
    try:
        found = discover(extra_files)
        launches, errors = record(found, subset)
        errors += coverage_errors(found, launches)
        results = compile_launches(launches, archs, progress) if compile_ else []
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return found, launches, results, errors


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subset", choices=("fast", "full"), default="fast")
    ap.add_argument("--arch", default="80,90", help="compute capabilities, e.g. 80,90")
    ap.add_argument("--json", help="write every result here")
    ap.add_argument("--extra-module", action="append", default=[], help="also scan this file (tests)")
    ap.add_argument("--list", action="store_true", help="discover and record only, no compiling")
    a = ap.parse_args(argv)
    archs = tuple(int(x) for x in a.arch.split(","))
    start = time.perf_counter()
    try:
        found, launches, results, errors = run(a.subset, archs, a.extra_module, compile_=not a.list)
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        return 2
    wall = time.perf_counter() - start
    failed = [r for r in results if not r.ok]
    print(f"kernels: {', '.join(sorted(found.kernels))}")
    print(f"helpers (inlined): {', '.join(sorted(found.helpers))}")
    print(f"triton ops: {', '.join(sorted(found.ops))}")
    print(f"{len(launches)} launches recorded; {len(results)} distinct compiles "
          f"(kernel x config x dtype x arch, subset {a.subset}, archs {archs}), {len(failed)} failed, {wall:.1f} s")
    for r in failed:
        print(f"COMPILE FAILED {r.kernel} sm_{r.arch} {r.dtype} [{r.config}] ({r.shapes[0]}): {r.error}")
    for e in errors:
        print(f"ERROR {e}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"kernels": sorted(found.kernels), "helpers": sorted(found.helpers), "ops": sorted(found.ops),
                       "errors": errors, "wall_s": wall, "results": [asdict(r) for r in results]}, f, indent=1)
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
