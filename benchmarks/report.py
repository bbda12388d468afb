"""Speed-up of every benchmark over the eager baseline of its group, from pytest-benchmark JSON.

    python benchmarks/report.py benchmarks/results/cpu.json

In each group the test whose name contains "eager" is the baseline; the ratio is
baseline median / test median (above 1: faster than eager).
"""
import json
import sys
from collections import defaultdict


def main(path: str) -> None:
    data = json.load(open(path))
    groups = defaultdict(list)
    for b in data["benchmarks"]:
        groups[b["group"]].append(b)
    print(f"machine: {data['machine_info'].get('cpu', {}).get('brand_raw', '?')}, "
          f"{data['machine_info'].get('cpu', {}).get('count', '?')} cores")
    print("| group | test | median | vs eager |")
    print("|---|---|---|---|")
    for group, rows in sorted(groups.items()):
        base = [r for r in rows if "eager" in r["name"]]
        base_median = base[0]["stats"]["median"] if base else None
        for r in sorted(rows, key=lambda r: r["name"]):
            med = r["stats"]["median"]
            ratio = f"{base_median / med:.2f}x" if base_median else "-"
            print(f"| {group} | {r['name']} | {med * 1e3:.3f} ms | {ratio} |")


if __name__ == "__main__":
    main(sys.argv[1])
