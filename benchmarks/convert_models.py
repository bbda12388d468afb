"""Which models ``s2h.convert`` takes with no arguments, and how far they can be pruned.

    .venv/bin/python benchmarks/convert_models.py [--size 224] [--models NAME ...] [--out benchmarks/results/convert_models.md]

Per model (timm and torchvision, freshly initialised, nothing downloaded): whether ``s2h.convert(model, x)``
succeeds with the defaults, the share of the dense MACs in layers touching a pruned group, the lowest
reachable FLOPs fraction (one bucket left in every pruned group), whether the exported model equals the
hard branch (random masks, eval mode), the groups left dense (and the first reason), and the convert time
(wall and process CPU seconds; the second is less sensitive to other load on the machine).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings
from collections import Counter

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import s2h  # noqa: E402
from s2h.structured.report import report_of  # noqa: E402

MODELS = [
    "timm:resnet50", "timm:efficientnet_b0", "timm:convnext_nano", "timm:regnety_004", "timm:vit_tiny_patch16_224",
    "timm:deit_tiny_patch16_224", "timm:mobilevitv2_050",
    "resnext50_32x4d", "regnet_y_400mf", "convnext_tiny", "resnet50", "mobilenet_v3_large", "efficientnet_b0",
    "swin_t",
]


def measure(name: str, size: int) -> dict:
    torch.manual_seed(0)
    net = s2h.models.build_model(name, num_classes=1000, image_size=size if "vit" in name or "deit" in name else None)
    x = torch.randn(1, 3, size, size)
    row = {"model": name}
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = s2h.convert(net, x)
    except Exception as e:  # noqa: BLE001 - reported in the table
        row["converts"] = f"no: {type(e).__name__}: {str(e)[:120]}"
        return row
    row["wall"], row["cpu"] = time.perf_counter() - t0, time.process_time() - c0
    report = report_of(model)
    row["converts"] = "yes"
    row["share"], row["min"] = report.prunable_share, report.min_fraction
    row["groups"] = f"{len(model.groups)} / {len(report.kept)}"
    reasons = Counter(r.reason.split(": ", 1)[-1] for r in report.kept)
    example = {r.reason.split(": ", 1)[-1]: r.reason.split(": ", 1)[0] for r in reversed(report.kept)}
    row["kept"] = "; ".join(f"{n}x {r[:60]}" + (f" (e.g. {example[r]})" if example[r] != r else "")
                            for r, n in reasons.most_common(2))
    with torch.no_grad():
        model.u.uniform_(-2, 2)
    model.eval()
    with torch.no_grad(), model.branch("hard"):
        yh = model(x)
    small = model.export().eval()
    with torch.no_grad():
        ye = small(x)
    err = float((ye - yh).abs().max() / yh.abs().max().clamp_min(1e-12))
    row["equal"] = f"yes ({err:.0e})" if err < 1e-4 else f"NO ({err:.0e})"
    return row


def to_markdown(rows: list[dict], size: int) -> str:
    head = (f"# s2h.convert with no arguments ({size}x{size} input, batch 1, 1000 classes)\n\n"
            f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads. Convert time: wall / process CPU seconds.\n\n"
            "| model | converts with defaults | FLOPs share in pruned groups | lowest reachable FLOPs | "
            "export equals hard | convert time (s) | groups pruned / kept | kept because |\n"
            "|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        if r["converts"] != "yes":
            lines.append(f"| {r['model']} | {r['converts']} | | | | | | |")
            continue
        lines.append(f"| {r['model']} | yes | {100 * r['share']:.1f}% | {100 * r['min']:.1f}% | {r['equal']} | "
                     f"{r['wall']:.1f} / {r['cpu']:.1f} | {r['groups']} | {r['kept']} |")
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "convert_models.md"))
    args = ap.parse_args(argv)
    rows = []
    for name in args.models:
        rows.append(measure(name, args.size))
        print(rows[-1], flush=True)
    text = to_markdown(rows, args.size)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
