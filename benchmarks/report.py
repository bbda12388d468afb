"""Ratios of every fused test against every baseline of its group, from pytest-benchmark JSON.

    python benchmarks/report.py benchmarks/results/cpu.json

In each group, tests whose ``impl`` parameter (or name) starts with ``fused`` are the fused ops; every
other test is a baseline. ``best eager`` is the fastest test whose impl starts with ``best_eager``,
``compiled best eager`` the fastest starting with ``compiled_best_eager``. The ratio is
baseline / fused (above 1: the fused op is faster), from the **minimum** time over rounds: one rule
for every table (the minimum is the least disturbed by the other jobs of a shared machine; the
median / minimum of each fused test is printed as the noise of its run). Groups without a
``fused`` test (the spmm suites, whose own table mode prints their ratios) list their times only.
Compile seconds (``extra_info["compile_s"]``, excluded from the times) are printed where present.
"""
import json
import sys
from collections import defaultdict


def impl_of(b: dict) -> str:
    params = b.get("params") or {}
    for key in ("impl", "method"):
        if key in params:
            return str(params[key])
    return b["name"]


def baselines_of(rows: list) -> dict:
    """role -> min seconds; the per-test baselines plus best eager / compiled best eager."""
    out = {impl_of(r): r["stats"]["min"] for r in rows if not impl_of(r).startswith("fused")}
    for role, prefix in (("best eager", "best_eager"), ("compiled best eager", "compiled_best_eager")):
        ks = [k for k in out if k.startswith(prefix)]
        if ks:
            best = min(ks, key=out.get)
            out[f"{role} ({best})"] = out[best]
    return out


def main(path: str) -> None:
    data = json.load(open(path))
    groups = defaultdict(list)
    for b in data["benchmarks"]:
        groups[b["group"]].append(b)
    cpu = data["machine_info"].get("cpu", {})
    print(f"machine: {cpu.get('brand_raw', '?')}, {cpu.get('count', '?')} cores; rule: minimum over rounds; "
          "ratio = baseline / fused")
    print()
    print("| group | fused test | min | noise (median/min) | baseline | baseline min | ratio |")
    print("|---|---|---|---|---|---|---|")
    compile_rows = []
    for group, rows in sorted(groups.items()):
        fused = sorted((r for r in rows if impl_of(r).startswith("fused")), key=impl_of)
        for r in rows:
            if "compile_s" in r.get("extra_info", {}):
                compile_rows.append(f"| {group} | {impl_of(r)} | {r['extra_info']['compile_s']:.1f} s |")
        if not fused:
            for r in sorted(rows, key=impl_of):
                print(f"| {group} | - | - | - | {impl_of(r)} | {r['stats']['min'] * 1e3:.3f} ms | - |")
            continue
        base = baselines_of(rows)
        for f in fused:
            fm = f["stats"]["min"]
            noise = f["stats"]["median"] / fm
            items = sorted(base.items(), key=lambda kv: kv[1])
            for name, t in items:
                print(f"| {group} | {impl_of(f)} | {fm * 1e3:.3f} ms | {noise:.2f} | {name} | {t * 1e3:.3f} ms | "
                      f"{t / fm:.2f}x |")
            if items:
                name, t = items[0]
                print(f"| {group} | {impl_of(f)} | | | **fastest: {name}** | | **{t / fm:.2f}x** |")
    if compile_rows:
        print()
        print("| group | compiled test | compile time (first call, excluded) |")
        print("|---|---|---|")
        print("\n".join(compile_rows))


if __name__ == "__main__":
    main(sys.argv[1])
