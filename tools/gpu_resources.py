"""Static GPU resource report, no GPU needed: writes benchmarks/results/gpu_static.md.

* Triton kernels: every kernel x launcher config x dtype, compiled for sm_80 and sm_90 by
  tools/triton_cases.py (the launchers' own choices, "full" sweep). Registers per thread, spills and
  stack from ptxas's ``-v`` report of that compile; shared memory from Triton's metadata.
* CUDA C++ kernels: every csrc/cuda/*.cu compiled with the flags of setup.py (plus
  ``-Xptxas -v --keep``) for sm_80 and sm_90; registers, spills, static shared memory from
  ptxas, threads per block from the ``.maxntid`` (``__launch_bounds__``) of the kept PTX.
* Theoretical occupancy on A100 and H100 from the published per-SM limits (LIMITS below).
* Per op at the benchmark shapes: bytes moved, FLOPs, and the H100 SXM roofline time: ESTIMATES.

    python tools/gpu_resources.py [--out benchmarks/results/gpu_static.md] [--no-cuda] [--subset full|fast]
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import math
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import triton_cases  # noqa: E402  (sets TRITON_INTERPRET=0 before triton is imported)

# ----------------------------------------------------------------------------------------------
# Published per-SM limits (CUDA C Programming Guide, "Technical Specifications per Compute
# Capability"; NVIDIA A100 and H100 architecture whitepapers).
# ----------------------------------------------------------------------------------------------
LIMITS = {
    80: dict(gpu="A100", regs=65536, max_threads=2048, max_warps=64, max_blocks=32, smem=164 * 1024,
             smem_per_block=163 * 1024, reserved_smem=1024, reg_unit=256, max_regs_thread=255, sms=108),
    90: dict(gpu="H100", regs=65536, max_threads=2048, max_warps=64, max_blocks=32, smem=228 * 1024,
             smem_per_block=227 * 1024, reserved_smem=1024, reg_unit=256, max_regs_thread=255, sms=132),
}
# H100 SXM5 peaks (NVIDIA H100 datasheet): dense, no sparsity.
H100_HBM_BPS = 3.35e12
H100_FP32 = 67e12
H100_TF32 = 495e12
H100_FP64 = 34e12


def occupancy(regs: int, smem: int, threads: int, arch: int) -> tuple[float, int, str]:
    """(theoretical occupancy, resident blocks per SM, the limiting resource)."""
    L = LIMITS[arch]
    warps = max(1, math.ceil(threads / 32))
    limits = {"blocks/SM": L["max_blocks"], "warps": L["max_warps"] // warps}
    if regs > 0:
        per_warp = math.ceil(regs * 32 / L["reg_unit"]) * L["reg_unit"]
        limits["registers"] = (L["regs"] // per_warp) // warps
    limits["shared memory"] = L["smem"] // (max(smem, 0) + L["reserved_smem"])
    blocks = min(limits.values())
    if blocks * warps >= L["max_warps"]:
        return 1.0, blocks, "–"
    # the first binding limit in a stable order (blocks/SM before warps: 1-warp programs)
    limiter = next(k for k in ("registers", "shared memory", "blocks/SM", "warps") if limits.get(k) == blocks)
    return blocks * warps / L["max_warps"], blocks, limiter


# ----------------------------------------------------------------------------------------------
# CUDA C++: nvcc -Xptxas -v per .cu file
# ----------------------------------------------------------------------------------------------

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)a?'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:, used \d+ barriers)?(?:, (\d+) bytes smem)?")


def _demangle(names: list[str]) -> dict[str, str]:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
        dem = out.splitlines()
    except (OSError, subprocess.CalledProcessError):
        dem = names
    short = {}
    for n, d in zip(names, dem):
        d = re.sub(r"\(anonymous namespace\)::", "", d).replace("s2h::", "")
        d = re.sub(r"^void ", "", d)
        short[n] = d.split("(")[0] if "(" in d else d  # drop the parameter list
    return short


def cuda_resources(archs=(80, 90), files=None) -> tuple[list[dict], list[str], float]:
    """Compiles csrc/cuda/*.cu (one nvcc process at a time); returns rows, errors, wall seconds."""
    from torch.utils.cpp_extension import include_paths

    nvcc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    files = files or sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    rows, errors = [], []
    start = time.perf_counter()
    for src in files:
        with tempfile.TemporaryDirectory(prefix="s2h-ptxas-") as keep:
            cmd = [nvcc, "-c", src, "-o", os.path.join(keep, "out.o"), "-std=c++20", "-O3", "--expt-relaxed-constexpr",
                   "-lineinfo", "-Xcompiler", "-fPIC", "-DS2H_WITH_CUDA=1", f"-I{os.path.join(ROOT, 'csrc')}",
                   f"-I{sysconfig.get_paths()['include']}", "-Xptxas", "-v", "--keep", "--keep-dir", keep]
            cmd += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs] + [f"-I{p}" for p in include_paths()]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                errors.append(f"{os.path.relpath(src, ROOT)}: nvcc failed: {r.stderr[-2000:]}")
                continue
            maxntid = {}
            for ptx in glob.glob(os.path.join(keep, "*.ptx")):
                text = open(ptx).read()
                for m in re.finditer(r"\.entry\s+(\S+)\(", text):
                    tail = text[m.end():m.end() + 4000]
                    body = tail.split("{", 1)[0]
                    if (t := re.search(r"\.maxntid\s+(\d+),\s*(\d+),\s*(\d+)", body)) is not None:
                        maxntid[m.group(1)] = int(t.group(1)) * int(t.group(2)) * int(t.group(3))
        cur = None
        for line in r.stderr.splitlines():
            if (m := _ENTRY.search(line)) is not None:
                cur = dict(file=os.path.relpath(src, ROOT), mangled=m.group(1), arch=int(m.group(2)[3:]), regs=-1,
                           spill_stores=-1, spill_loads=-1, stack=-1, shared=0, threads=maxntid.get(m.group(1)))
                rows.append(cur)
            elif cur is not None and (m := _PROPS.search(line)) is not None:
                cur["stack"], cur["spill_stores"], cur["spill_loads"] = map(int, m.groups())
            elif cur is not None and (m := _USED.search(line)) is not None:
                cur["regs"] = int(m.group(1))
                cur["shared"] = int(m.group(2) or 0)
    names = _demangle([r["mangled"] for r in rows])
    for r in rows:
        r["kernel"] = names[r["mangled"]]
    return rows, errors, time.perf_counter() - start


def _cuda_labels(rows):
    """group: the kernel without template arguments, marked CUDA C++; config: the template arguments."""
    for r in rows:
        base = r["kernel"].split("<")[0]
        r["group"] = f"{base} (CUDA C++)"
        r["config"] = r["kernel"][len(base):]
        r.setdefault("dtype", "")


# ----------------------------------------------------------------------------------------------
# Roofline estimates at the benchmark shapes
# ----------------------------------------------------------------------------------------------


def _roof(bytes_, flops, peak=H100_FP32):
    return max(bytes_ / H100_HBM_BPS, flops / peak)


def roofline_rows() -> list[dict]:
    """Bytes (compulsory: every input read once, every output written once), FLOPs (exp, log, max
    and compares counted as one each), and max(bytes / HBM, FLOPs / peak) on H100 SXM."""
    rows = []
    # kl_gap_with_grads, fp32: benchmarks/test_bench_kl_gap.py SHAPES.
    # Reads s, h; writes gs, gh, per-row loss.
    for B, C in [(B, C) for B in (64, 512, 4096) for C in (10, 100, 1000, 32000)]:
        n = B * C
        byt = 4 * (2 * n) + 4 * (2 * n) + 4 * B
        issued = 4 * (4 * n) + 4 * (2 * n) + 4 * B  # the kernel reads both rows twice (two passes)
        fl = 26 * n
        rows.append(dict(op="kl_gap_with_grads fp32", shape=f"B={B} C={C}", bytes=byt, issued=issued, flops=fl,
                         peak="FP32", programs=B, t=_roof(byt, fl)))
    # ca_kld, fp32, standardize=True, gamma=None: benchmarks/test_bench_ca_kld.py CA_SHAPES.
    # Reads zs, zt; writes g, loss.
    for B, C in [(512, 100), (512, 1000), (512, 32000)]:
        n = B * C
        byt = 4 * (2 * n) + 4 * n + 4 * B
        issued = 4 * (7 * n) + 4 * n + 4 * B  # top1 pass + 2 standardisation passes + 2 + 2 passes
        fl = 45 * n
        rows.append(dict(op="ca_kld fp32 (std, gamma=None)", shape=f"B={B} C={C}", bytes=byt, issued=issued, flops=fl,
                         peak="FP32", programs=B, t=_roof(byt, fl)))
    # channel_masks forward + backward, ResNet-50's groups (benchmarks/test_bench_channel_masks.py).
    try:
        sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
        from test_bench_channel_masks import resnet50_group_sizes

        sizes = resnet50_group_sizes()
    except Exception:  # noqa: BLE001  (torch_pruning missing: ResNet-50's group count and size from the last run)
        sizes = None
    if sizes:
        G, n = len(sizes), sum(sizes)
        # fwd: read u (+ offsets, divisors), write w, E, keep; bwd: read u, grad_w, grad_E, write grad_u.
        byt = 4 * n + 8 * (2 * G + 1) + 4 * n + 4 * G + 8 * G + 4 * n + 4 * n + 4 * G + 8 * (2 * G + 1) + 4 * n
        fl = 30 * n
        rows.append(dict(op="channel_masks fwd+bwd fp32", shape=f"ResNet-50: {G} groups, {n} channels", bytes=byt,
                         issued=byt, flops=fl, peak="FP32", programs=G, t=_roof(byt, fl)))
    # dual_linear: benchmarks/test_bench_layers.py, S2HLinear 1024x1024 at batch 256, hard branch at
    # ~15% FLOPs (k_out = k_in = 397 = 1024 * sqrt(0.15): an assumption, the benchmark bisects it).
    M, N, K, ko, ki = 256, 1024, 1024, 397, 397
    byt = 4 * (M * K + M * ki + N * K + N + M * N + M * ko)
    fl = 2 * M * N * K + 2 * M * ko * ki
    grid = math.ceil(M / 64) * math.ceil(N / 64)
    for peak, p in (("FP32", H100_FP32), ("TF32", H100_TF32)):
        rows.append(dict(op=f"dual_linear fp32 ({'allow_tf32' if peak == 'TF32' else 'default: no TF32'})",
                         shape=f"M={M} N=K={N}, hard {ko}x{ki}", bytes=byt, issued=byt, flops=fl, peak=peak,
                         programs=grid, t=_roof(byt, fl, p)))
    # spmm (CSR, fp32) at 90% sparsity: benchmarks/test_bench_spmm.py GEMMS and CONVS (batch 1).
    gemms = {"r18.layer1.conv3x3": (64, 576, 3136), "r18.layer3.conv3x3": (256, 2304, 196),
             "r18.layer4.conv3x3": (512, 4608, 49), "r50.layer3.conv1x1": (256, 1024, 196),
             "r50.layer4.conv1x1": (2048, 512, 49), "r18.fc": (1000, 512, 1), "r50.fc": (1000, 2048, 1)}
    for name, (m, k, n) in gemms.items():
        nnz = round(0.1 * m * k)
        byt = 8 * nnz + 4 * (m + 1) + 4 * m + 4 * k * n + 4 * m * n
        issued = 8 * nnz + 4 * nnz * n + 4 * m * n  # one X row segment gathered per nonzero (L2 if reused)
        fl = 2 * nnz * n
        bn = max(16, min(128, 1 << (n - 1).bit_length()))
        rows.append(dict(op="spmm fp32, 90% sparse", shape=f"{name} M={m} K={k} N={n}", bytes=byt, issued=issued,
                         flops=fl, peak="FP32", programs=m * math.ceil(n / bn), t=_roof(byt, fl)))
    convs = {"r18.layer1.conv3x3": (64, 64, 56, 3, 1), "r18.layer2.0.conv1.s2": (64, 128, 56, 3, 2),
             "r18.layer3.conv3x3": (256, 256, 14, 3, 1), "r18.layer4.conv3x3": (512, 512, 7, 3, 1),
             "r50.layer1.conv1x1": (64, 256, 56, 1, 1)}
    for name, (ci, co, h, kk, s) in convs.items():
        ho = (h + 2 * (kk // 2) - kk) // s + 1
        k, n, m = ci * kk * kk, ho * ho, co
        nnz = round(0.1 * m * k)
        direct = 8 * nnz + 4 * ci * h * h + 4 * m * n
        unfold = 2 * 4 * k * n  # F.unfold writes the (K, N) columns, spmm reads them back
        fl = 2 * nnz * n
        rows.append(dict(op="spmm_conv2d fp32, 90% sparse (unfold + spmm)", shape=f"{name} batch 1",
                         bytes=direct + unfold, issued=direct + unfold + 4 * nnz * n, flops=fl, peak="FP32",
                         programs=m * math.ceil(n / 128), t=_roof(direct + unfold, fl),
                         note=f"direct conv would move {direct / 1e6:.2f} MB"))
    return rows


# ----------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------


def _kb(b):
    return f"{b / 1024:.1f} KB" if b >= 1024 else f"{b} B"


def _fmt_bytes(b):
    return f"{b / 1e6:.2f} MB" if b >= 1e5 else f"{b / 1e3:.1f} kB"


def _fmt_t(t):
    return f"{t * 1e6:.2f} us" if t < 1e-3 else f"{t * 1e3:.3f} ms"


def annotate(rows: list[dict], threads_of) -> None:
    for r in rows:
        threads = threads_of(r)
        r["threads"] = threads
        if threads and r.get("regs", -1) >= 0:
            occ, blocks, lim = occupancy(r["regs"], max(r.get("shared", 0), 0), threads, r["arch"])
            r.update(occ=occ, blocks=blocks, limiter=lim)
        else:
            r.update(occ=None, blocks=None, limiter="")


def _reason(r) -> str:
    lim, w = r["limiter"], r["threads"] // 32
    if lim == "blocks/SM":
        return f"{w}-warp programs: 32 resident blocks x {w} warps = {32 * w} of 64 warps"
    if lim == "registers":
        return f"{r['regs']} registers/thread x {r['threads']} threads: {r['blocks']} block(s) fit in 64K registers"
    if lim == "shared memory":
        return f"{_kb(r['shared'])} shared memory per block: {r['blocks']} block(s) fit"
    return f"{w} warps per block: {r['blocks']} block(s)"


def _range(vals, fmt="{}"):
    vals = sorted(vals)
    if not vals:
        return "–"
    return fmt.format(vals[0]) if vals[0] == vals[-1] else f"{fmt.format(vals[0])}–{fmt.format(vals[-1])}"


def kernel_summary(rows, key, triton: bool) -> list[str]:
    """One line per kernel: compiles, registers, spills, H100 occupancy (and, for Triton, tensor cores / cp.async)."""
    head = "| kernel | compiles | registers | spilling compiles | occupancy A100 | occupancy H100 | H100 limited by |"
    sep = "|---|---|---|---|---|---|---|"
    if triton:
        head += " tensor-core instructions | cp.async |"
        sep += "---|---|"
    out = [head, sep]
    groups = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    for name, rs in sorted(groups.items()):
        ok = [r for r in rs if r.get("regs", -1) >= 0]
        spill = sum(1 for r in ok if r["spill_stores"] > 0 or r["spill_loads"] > 0)
        occ = {a: [round(100 * r["occ"]) for r in ok if r["arch"] == a and r["occ"] is not None] for a in (80, 90)}
        lims = sorted({r["limiter"] for r in ok if r["arch"] == 90 and r["limiter"] not in ("", "–")})
        line = (f"| `{name}` | {len(rs)} | {_range([r['regs'] for r in ok])} | {spill or ''} | "
                f"{_range(occ[80], '{}%')} | {_range(occ[90], '{}%')} | {', '.join(lims) or '–'} |")
        if triton:
            tc = {}
            for r in ok:
                if r.get("mma"):
                    tc.setdefault(r["mma"], set()).add(r["dtype"] + ("" if "PRECISION=ieee" not in r["config"] else " ieee"))
            no_tc = sorted({r["dtype"] for r in ok if not r.get("mma")})
            if tc:
                desc = "; ".join(f"{k}: {', '.join(sorted(v))}" for k, v in sorted(tc.items()))
                desc += f"; none (FMA): {', '.join(no_tc)}" if no_tc else ""
            else:
                desc = "none"
            cpa = {r.get("cp_async") for r in ok}
            line += f" {desc} | {'yes' if cpa == {True} else 'no' if cpa == {False} else 'some configs'} |"
        out.append(line)
    return out


def findings(triton_rows, cuda_rows) -> list[str]:
    out = ["Per kernel (every config, dtype and arch compiled; ranges over them):", ""]
    out += kernel_summary(triton_rows, lambda r: r["kernel"], True)
    out.append("")
    if cuda_rows:
        out += kernel_summary(cuda_rows, lambda r: r["group"], False)
        out.append("")
    dots = {r["kernel"] for r in triton_rows if r.get("mma")}
    for k in sorted(dots):
        fma = sorted({f"{r['dtype']} [{r['config']}]" for r in triton_rows if r["kernel"] == k and not r.get("mma")})
        if fma:
            out.append(f"**`{k}` without tensor cores**: {len(fma)} configs compile to FMA loops, no `mma`/`wgmma` in "
                       f"the PTX: {', '.join(sorted({f.split(' [')[0] for f in fma}))} (e.g. {fma[0]}). "
                       "fp32 with `PRECISION=ieee` is what torch's default (`allow_tf32 = False`) selects.")
            out.append("")
        if not any(r.get("cp_async") for r in triton_rows if r["kernel"] == k):
            out.append(f"**`{k}` loads are not software-pipelined**: no `cp.async` in any config's PTX "
                       "(`num_stages` has no effect).")
            out.append("")
    out.append("")
    spills = [r for r in triton_rows + cuda_rows if r.get("spill_stores", 0) > 0 or r.get("spill_loads", 0) > 0]
    if spills:
        out.append("**Spills** (ptxas `-v`; bytes of spill stores / loads per thread):")
        for r in spills:
            label = " ".join(x for x in (f"`{r.get('group', r['kernel'])}`", r.get("dtype", ""), f"sm_{r['arch']}") if x)
            out.append(f"- {label} [{r.get('config', '')}]: "
                       f"{r['regs']} registers, {r['spill_stores']} B stores / {r['spill_loads']} B loads")
    else:
        out.append("**Spills**: none, in any kernel, config, dtype or arch.")
    low = [r for r in triton_rows + cuda_rows if r["arch"] == 90 and r["occ"] is not None and r["occ"] < 0.5]
    out.append("")
    out.append(f"**Under 50% theoretical occupancy on H100** ({len(low)} of "
               f"{sum(1 for r in triton_rows + cuda_rows if r['arch'] == 90 and r['occ'] is not None)} sm_90 compiles), "
               "grouped by kernel and cause:")
    groups = {}
    for r in low:
        groups.setdefault((r.get("group", r["kernel"]), r["limiter"]), []).append(r)
    for (kernel, lim), rs in sorted(groups.items()):
        occs = sorted({round(100 * r["occ"]) for r in rs})
        cfgs = sorted({(r.get("dtype", ""), r.get("config", "")) for r in rs})
        sample = max(rs, key=lambda r: r.get("regs", 0))
        what = "; ".join(f"{d} {c}".strip() for d, c in cfgs[:6]) + (f"; ... ({len(cfgs)} configs)" if len(cfgs) > 6 else "")
        out.append(f"- `{kernel}`: {occs[0]}–{occs[-1]}% limited by {lim} (e.g. {_reason(sample)}). Configs: {what}")
    if not low:
        out.append("- none")
    return out


def render(triton_rows, triton_meta, cuda_rows, cuda_meta, roof) -> str:
    import torch
    import triton

    L = []
    L.append("# GPU static report: compiler resources and roofline estimates")
    L.append("")
    L.append(f"Written by `python tools/gpu_resources.py` on {datetime.date.today()} (torch {torch.__version__}, "
             f"triton {triton.__version__}). **No GPU was used**: everything here comes from the compilers "
             "(Triton + its ptxas for sm_80 / sm_90a; nvcc for the CUDA C++ kernels) and from arithmetic. "
             "Occupancy is *theoretical* (resources only; the grid size at a shape decides how much of it is used); "
             "the roofline times are **estimates, not measurements**.")
    L.append("")
    L.append("## Findings")
    L.append("")
    L += findings(triton_rows, cuda_rows)
    warn = sorted({w for r in triton_rows for w in r.get("ptxas_warnings", [])})
    L.append("")
    L.append(f"**ptxas warnings**: {'none' if not warn else '; '.join(warn)}.")
    L.append("")
    L.append("**Not covered**: the kernels were compiled, never run; spills and occupancy say nothing about "
             "correctness or achieved bandwidth. Register counts can change with the Triton/ptxas version.")
    L.append("")
    L.append("## Limits used")
    L.append("")
    L.append("| | A100 (sm_80) | H100 (sm_90) |")
    L.append("|---|---|---|")
    a, h = LIMITS[80], LIMITS[90]
    for key, label in (("regs", "32-bit registers per SM"), ("max_threads", "threads per SM"),
                       ("max_warps", "warps per SM"), ("max_blocks", "resident blocks per SM"),
                       ("reg_unit", "register allocation unit (per warp)"), ("max_regs_thread", "registers per thread, max"),
                       ("smem", "shared memory per SM (bytes)"), ("smem_per_block", "shared memory per block, max"),
                       ("reserved_smem", "shared memory reserved per block by CUDA"), ("sms", "SMs (A100 SXM / H100 SXM)")):
        L.append(f"| {label} | {a[key]} | {h[key]} |")
    L.append("")
    L.append("Occupancy = resident warps / 64, resident blocks = min(32, 64 // warps per block, "
             "(65536 // (ceil(regs x 32 / 256) x 256)) // warps per block, smem per SM // (smem per block + 1 KB)). "
             f"Roofline: H100 SXM HBM3 {H100_HBM_BPS / 1e12:.2f} TB/s, FP32 {H100_FP32 / 1e12:.0f} TFLOP/s, "
             f"TF32 dense {H100_TF32 / 1e12:.0f} TFLOP/s.")
    L.append("")
    L.append(f"## Triton kernels ({len(triton_rows)} compiles: kernel x launcher config x dtype x arch, "
             f"{triton_meta['wall']:.0f} s)")
    L.append("")
    L.append(f"Kernels found by introspection: {', '.join(f'`{k}`' for k in triton_meta['kernels'])}; "
             f"helpers inlined into them: {', '.join(f'`{k}`' for k in triton_meta['helpers'])}. Configs are the "
             "ones the launchers pick at the shapes in `tools/triton_cases.py` (`LAUNCHES`), Triton's own argument "
             "specialisation included. The config column is the kernel's constexprs, `warps` and `stages`; `mma`: "
             "tensor-core instructions in the PTX; `cp.async`: asynchronous copies (what Triton's software "
             "pipeliner emits when it pipelines loads).")
    if triton_meta["errors"]:
        L.append("")
        L.append("Errors: " + "; ".join(triton_meta["errors"]))
    L.append("")
    L.append("| kernel | dtype | config | arch | regs | spill st/ld | stack | smem | threads | blocks/SM | occupancy | limited by | mma | cp.async |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(triton_rows, key=lambda r: (r["kernel"], r["dtype"], r["config"], r["arch"])):
        if not r["ok"]:
            L.append(f"| `{r['kernel']}` | {r['dtype']} | {r['config']} | sm_{r['arch']} | COMPILE FAILED: "
                     f"{r['error'][:200]} |||||||||")
            continue
        occ = f"{100 * r['occ']:.0f}%" if r["occ"] is not None else "?"
        L.append(f"| `{r['kernel']}` | {r['dtype']} | {r['config']} | sm_{r['arch']} | {r['regs']} | "
                 f"{r['spill_stores']}/{r['spill_loads']} | {r['stack']} | {_kb(r['shared'])} | {r['threads']} | "
                 f"{r['blocks']} | {occ} | {r['limiter']} | {r.get('mma') or '–'} | {'yes' if r.get('cp_async') else 'no'} |")
    L.append("")
    L.append(f"## CUDA C++ kernels ({len(cuda_rows)} kernel x arch, csrc/cuda/*.cu, {cuda_meta['wall']:.0f} s of nvcc)")
    L.append("")
    L.append("Compiled per file with setup.py's nvcc flags plus `-Xptxas -v --keep` for sm_80 and sm_90. Threads "
             "per block: the kernel's `__launch_bounds__` (`.maxntid` in the PTX); a kernel without them has no "
             "occupancy here (see its launch site). Shared memory: static (`__shared__`), including CUB's temp storage.")
    if cuda_meta["errors"]:
        L.append("")
        L.append("Errors: " + "; ".join(cuda_meta["errors"]))
    if cuda_meta.get("skipped"):
        L.append("")
        L.append(f"Skipped: {cuda_meta['skipped']}")
    L.append("")
    L.append("| kernel | file | arch | regs | spill st/ld | stack | smem | threads | blocks/SM | occupancy | limited by |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(cuda_rows, key=lambda r: (r["file"], r["kernel"], r["arch"])):
        occ = f"{100 * r['occ']:.0f}%" if r["occ"] is not None else "n/a"
        L.append(f"| `{r['kernel']}` | {r['file']} | sm_{r['arch']} | {r['regs']} | {r['spill_stores']}/{r['spill_loads']} | "
                 f"{r['stack']} | {_kb(r['shared'])} | {r['threads'] or 'none'} | {r['blocks'] or ''} | {occ} | {r['limiter']} |")
    L.append("")
    L.append("## Roofline per op at the benchmark shapes: ESTIMATES, not measurements")
    L.append("")
    L.append("Bytes: compulsory traffic (each input read once, each output written once); `as written`: what the "
             "kernel's passes load and store (re-reads may hit L2). FLOPs count exp/log/max as one each. "
             "Time = max(bytes / 3.35 TB/s, FLOPs / peak) on H100 SXM, the least the kernel can take; a launch "
             "costs ~2–5 us on top, which dominates every op below ~5 us. `programs`: the Triton grid at that "
             "shape (H100 SXM has 132 SMs).")
    L.append("")
    L.append("| op | shape | bytes | bytes as written | FLOPs | FLOP/byte | peak | roofline time | programs |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for r in roof:
        note = f" ({r['note']})" if r.get("note") else ""
        L.append(f"| {r['op']} | {r['shape']}{note} | {_fmt_bytes(r['bytes'])} | {_fmt_bytes(r['issued'])} | "
                 f"{r['flops'] / 1e6:.2f} M | {r['flops'] / r['bytes']:.1f} | {r['peak']} | {_fmt_t(r['t'])} | {r['programs']} |")
    L.append("")
    L.append(f"Ridge point on H100 SXM: {H100_FP32 / H100_HBM_BPS:.0f} FLOP/byte (FP32), "
             f"{H100_TF32 / H100_HBM_BPS:.0f} (TF32). Every op but `dual_linear` sits far below it: memory-bound, "
             "so their target is bandwidth, for which occupancy (enough loads in flight) and enough programs "
             "to fill 132 SMs matter.")
    L.append("")
    return "\n".join(L)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "gpu_static.md"))
    ap.add_argument("--subset", choices=("fast", "full"), default="full")
    ap.add_argument("--no-cuda", action="store_true", help="skip the CUDA C++ compile")
    ap.add_argument("--triton-json", help="reuse the output of `tools/triton_cases.py --subset full --json FILE`")
    ap.add_argument("--cuda-json", help="reuse the CUDA C++ rows written by --dump-cuda-json")
    ap.add_argument("--dump-cuda-json", help="write the CUDA C++ rows here")
    a = ap.parse_args(argv)
    start = time.perf_counter()
    if a.triton_json:
        with open(a.triton_json) as f:
            data = json.load(f)
        trows, errors = data["results"], data["errors"]
        tmeta = dict(wall=data["wall_s"], kernels=data["kernels"], helpers=data["helpers"], errors=errors)
    else:
        found, launches, results, errors = triton_cases.run(a.subset, (80, 90))
        tmeta = dict(wall=time.perf_counter() - start, kernels=sorted(found.kernels), helpers=sorted(found.helpers),
                     errors=errors)
        trows = [dict(vars(r)) for r in results]
    annotate(trows, lambda r: 32 * r["num_warps"])
    print(f"triton: {len(trows)} compiles in {tmeta['wall']:.0f} s, {sum(not r['ok'] for r in trows)} failed", flush=True)
    if a.no_cuda:
        crows, cmeta = [], dict(wall=0, errors=[], skipped="--no-cuda")
    elif a.cuda_json:
        with open(a.cuda_json) as f:
            cmeta = json.load(f)
        crows = cmeta.pop("rows")
    else:
        crows, cerr, cwall = cuda_resources()
        cmeta = dict(wall=cwall, errors=cerr)
        print(f"cuda: {len(crows)} kernel x arch in {cwall:.0f} s, {len(cerr)} errors", flush=True)
        if a.dump_cuda_json:
            with open(a.dump_cuda_json, "w") as f:
                json.dump(dict(cmeta, rows=crows), f)
    _cuda_labels(crows)
    annotate(crows, lambda r: r["threads"])
    md = render(trows, tmeta, crows, cmeta, roofline_rows())
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        f.write(md)
    print(f"wrote {a.out}")
    return 1 if errors or any(not r["ok"] for r in trows) or cmeta["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
