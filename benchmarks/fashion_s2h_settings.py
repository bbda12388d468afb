"""Why S2H with the paper's CNN settings lost on Fashion-MNIST: one setting changed at a time.

    python benchmarks/fashion_s2h_settings.py            # ResNet-20, 12,000 images, 4 epochs, 15% FLOPs

Each row is an S2H run of the structured study's protocol (same data, loop, optimizer and seed)
with one choice changed against the paper's CNN settings (β = 0.5, γ = 5 on θ; the resource loss
on the expected FLOPs; SGD at 0.01 on the masks, the library's former default). Writes
``benchmarks/results/fashion_s2h_settings.md``; finished runs are kept under ``--work``.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fashion_common as fc  # noqa: E402
import fashion_structured as fs  # noqa: E402

PAPER = {"ce_coef": 0.5, "gap_coef": 5.0, "resource_target": "soft", "mask_optimizer": ("sgd", 0.01)}
VARIANTS = [
    ("paper CNN settings (β 0.5, γ 5, R on expected FLOPs, SGD 0.01 on u)", {}),
    ("+ Adam 0.02 on u (the CLI's former default)", {"mask_optimizer": ("adam", 0.02)}),
    ("+ Adam 0.02 on u, R on the hard network's FLOPs", {"mask_optimizer": ("adam", 0.02),
                                                          "resource_target": "hard"}),
    ("+ Adam 0.02 on u, β 1, γ 1", {"mask_optimizer": ("adam", 0.02), "ce_coef": 1.0, "gap_coef": 1.0}),
    ("+ Adam 0.02 on u, β 1, γ 1, R on hard FLOPs (the defaults now)",
     {"mask_optimizer": ("adam", 0.02), "ce_coef": 1.0, "gap_coef": 1.0, "resource_target": "hard"}),
    ("β 1, γ 1, R on hard FLOPs, SGD 0.01 on u", {"ce_coef": 1.0, "gap_coef": 1.0, "resource_target": "hard"}),
]


def run_variant(args) -> dict:
    label, settings, study = args
    study = replace(study, s2h={**PAPER, **settings})
    job = fs.Job("s2h", study.seeds[0], study.targets[0], epochs=study.epochs)
    t0 = time.perf_counter()
    store = fc.ResultStore(study.work)
    done = store.result_or_claim(job.key)
    if done is None:
        data = fc.load_fashion(study.n_train, n_test=study.n_test)
        net, extra = fs.s2h_train(job, study, data)
        done = {"label": label, "top1": fc.accuracy(net, data.x_test, data.y_test),
                "flops_frac": fc.macs(net) / fc.macs(fs.resnet(study.depth)), "wall_s": time.perf_counter() - t0,
                **extra}
        store.put(job.key, done)
    return done


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--n-train", type=int, default=12000)
    p.add_argument("--target", type=float, default=0.15)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--work", default="runs/fashion_s2h_settings")
    p.add_argument("--results", default=str(fs.RESULTS))
    p.add_argument("--report-only", action="store_true", help="write the table from the runs finished so far")
    a = p.parse_args(argv)
    base = fs.Study(epochs=a.epochs, seeds=(0,), n_train=a.n_train, targets=(a.target,), workers=a.workers)
    jobs = [(label, s, replace(base, work=Path(a.work) / f"v{i}")) for i, (label, s) in enumerate(VARIANTS)]
    uniform_job = (fs.Job("uniform", 0, a.target, epochs=a.epochs), replace(base, work=Path(a.work) / "uniform"))
    if a.report_only:
        uniform = fc.ResultStore(uniform_job[1].work).get(uniform_job[0].key)
        key = fs.Job("s2h", 0, a.target, epochs=a.epochs).key
        rows = [r for _, _, st in jobs for r in fc.ResultStore(st.work).finished([key])]
    else:
        uniform = fs.run_job(uniform_job)
        rows = fc.run_parallel(run_variant, jobs, a.workers)
    missing = [label for label, _, _ in jobs if label not in {r["label"] for r in rows}]
    lines = [f"# S2H settings on Fashion-MNIST (ResNet-{base.depth}, {a.n_train:,} images, {a.epochs} epochs, "
             f"{100 * a.target:g}% FLOPs, seed 0)", "",
             f"Machine: {fc.machine_line()}. `python benchmarks/fashion_s2h_settings.py`. The structured study's "
             "protocol (benchmarks/results/fashion_structured.md); one seed, so differences under about "
             "0.5 points are noise.", "",
             "| S2H settings | top-1 % (hard, exported) | soft top-1 % | FLOPs of dense % | keep per group |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['top1']:.2f} | {r['soft_top1']:.2f} | {100 * r['flops_frac']:.1f} | "
                     f"{' '.join(map(str, r['keep']))} |")
    if uniform is not None:
        lines.append(f"| uniform width {'/'.join(map(str, uniform['widths']))}, from scratch (reference) | "
                     f"{uniform['top1']:.2f} | — | {100 * uniform['flops_frac']:.1f} | — |")
    if missing:
        lines += ["", "Not run yet (`python benchmarks/fashion_s2h_settings.py` runs them; finished rows are kept): "
                  + "; ".join(missing) + "."]
    out = Path(a.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fashion_s2h_settings.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
