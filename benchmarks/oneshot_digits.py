"""Digits table for the README: magnitude vs grad-ce vs grad-kd importance at 90% and 98% sparsity.

    python benchmarks/oneshot_digits.py --runs runs/oneshot-digits-bench --seeds 0,1,2
        -> benchmarks/results/oneshot_digits.md

Per seed, one ``python -m s2h oneshot`` run trains the teacher, distills the dense student and
prunes it with the three importances (all from the same dense student), retraining with KD; a
second run starts from the same teacher and dense student checkpoints and retrains with CE only.
``--skip-run`` only rebuilds the table from existing run folders.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("magnitude", "grad-ce", "grad-kd")
SPARSITIES = (0.9, 0.98)
ABLATIONS = {"kdscale1": ["--kd-scale", "1"], "accgrad": ["--accumulate", "grad"], "alpha09": ["--alpha", "0.9"]}
ABLATION_LABELS = {"kdscale1": "bare CA-KLD (`--kd-scale 1`)", "accgrad": "gradients averaged first (`--accumulate grad`)",
                   "alpha09": "alpha 0.9"}


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def fmt(vals: list[float]) -> str:
    if len(vals) == 1:
        return f"{vals[0]:.1f}"
    return f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="runs/oneshot-digits-bench")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", default="1")
    ap.add_argument("--skip-run", action="store_true")
    ap.add_argument("--no-ablations", action="store_true", help="skip the grad-ce/grad-kd variants table")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "oneshot_digits.md"))
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = Path(args.runs)
    common = ["--no-progress", "--threads", args.threads, "--sparsity", ",".join(map(str, SPARSITIES)),
              "--importance", ",".join(METHODS), "--recalibrate-bn", "8"]
    if not args.skip_run:
        for seed in seeds:
            kd = runs / f"kd-s{seed}"
            run([sys.executable, "-m", "s2h", "oneshot", *common, "--seed", str(seed), "--out", str(kd)])
            run([sys.executable, "-m", "s2h", "oneshot", *common, "--seed", str(seed), "--out", str(runs / f"ce-s{seed}"),
                 "--teacher-ckpt", str(kd / "teacher.pt"), "--student-ckpt", str(kd / "student_dense.pt"),
                 "--distill-epochs", "0", "--no-kd-retrain"])

    if not args.skip_run and not args.no_ablations:
        for seed in seeds:
            kd = runs / f"kd-s{seed}"
            for name, flags in ABLATIONS.items():
                run([sys.executable, "-m", "s2h", "oneshot", "--no-progress", "--threads", args.threads, "--seed",
                     str(seed), "--sparsity", ",".join(map(str, SPARSITIES)), "--importance", "grad-kd,grad-ce",
                     "--teacher-ckpt", str(kd / "teacher.pt"), "--student-ckpt", str(kd / "student_dense.pt"),
                     "--distill-epochs", "0", *flags, "--out", str(runs / f"var-{name}-s{seed}")])

    kd_sum = [json.loads((runs / f"kd-s{s}" / "summary.json").read_text()) for s in seeds]
    ce_sum = [json.loads((runs / f"ce-s{s}" / "summary.json").read_text()) for s in seeds]

    def pick(summaries, method, sp, key):
        return [next(r[key] for r in s["runs"] if r["importance"] == method and abs(r["sparsity"] - sp) < 1e-9)
                for s in summaries]

    cfg = kd_sum[0]["config"]
    lines = [
        "# One-shot pruning on digits: importance methods at 90% and 98% sparsity",
        "",
        f"Teacher `{kd_sum[0]['teacher']['arch']}` ({kd_sum[0]['teacher']['params']:,} parameters), student "
        f"`{kd_sum[0]['student_dense']['arch']}` ({kd_sum[0]['student_dense']['params']:,} parameters, "
        f"{kd_sum[0]['student_dense']['prunable_weights']:,} prunable: first conv and classifier excluded). "
        f"scikit-learn digits, 8x8, {kd_sum[0]['dataset']['train_samples']} train / "
        f"{kd_sum[0]['dataset']['test_samples']} test images (one test image = "
        f"{100 / kd_sum[0]['dataset']['test_samples']:.2f} points).",
        "",
        f"Protocol per seed: teacher {cfg['teacher_epochs']} epochs CE; dense student {cfg['distill_epochs']} epochs "
        f"of alpha·T²·CA-KLD + (1−alpha)·CE (alpha {cfg['alpha']}, T {cfg['temperature']}, gamma = teacher's "
        f"mean top-1 probability); importance over {cfg['importance_batches']} batches of {cfg['batch_size']}; "
        f"one global threshold; retraining {cfg['retrain_epochs']} epochs with the mask fixed (SGD lr "
        f"{cfg['lr']}, momentum {cfg['momentum']}, wd {cfg['weight_decay']}, cosine). All three importances "
        "prune the same dense student; the CE-retraining run starts from the same teacher and dense student "
        f"checkpoints. Top-1 (%) on the test split, mean ± std over seeds {', '.join(map(str, seeds))}.",
        "",
        f"Teacher: {fmt([s['teacher']['top1'] for s in kd_sum])}; dense student: "
        f"{fmt([s['student_dense']['top1'] for s in kd_sum])}.",
        "",
        "| importance | sparsity | pruned, no retraining | pruned, BN re-estimated | retrained with KD | retrained, CE only |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for sp in SPARSITIES:
        for m in METHODS:
            lines.append(
                f"| {m} | {sp:.0%} | {fmt(pick(kd_sum, m, sp, 'top1_pruned'))} | "
                f"{fmt(pick(kd_sum, m, sp, 'top1_pruned_bn_recalibrated'))} | "
                f"{fmt(pick(kd_sum, m, sp, 'top1_retrained'))} | {fmt(pick(ce_sum, m, sp, 'top1_retrained'))} |")
    if all((runs / f"var-{n}-s{s}" / "summary.json").is_file() for n in ABLATIONS for s in seeds):
        lines += [
            "",
            "Variants of the gradient importance (same teacher and dense student checkpoints, KD retraining with "
            "the variant's loss). `features.11` kept = weights left in the widest conv (18,432 weights), "
            "per seed.",
            "",
            "| variant | importance | sparsity | retrained with KD | `features.11` kept |",
            "|---|---|---:|---:|---|",
        ]
        for name, summaries in [("default (alpha 0.5, T² scale, accumulate abs)", kd_sum)] + [
                (ABLATION_LABELS[n], [json.loads((runs / f"var-{n}-s{s}" / "summary.json").read_text()) for s in seeds])
                for n in ABLATIONS]:
            for sp in SPARSITIES:
                for m in ("grad-ce", "grad-kd"):
                    kept = [round((1 - r["layers"]["features.11.weight"]) * 18432)
                            for r in (next(x for x in s_["runs"] if x["importance"] == m and abs(x["sparsity"] - sp) < 1e-9)
                                      for s_ in summaries)]
                    lines.append(f"| {name} | {m} | {sp:.0%} | {fmt(pick(summaries, m, sp, 'top1_retrained'))} | "
                                 f"{', '.join(map(str, kept))} |")
    secs = statistics.mean(s["seconds_total"] for s in kd_sum)
    lines += [
        "",
        "Layer sparsity under the global threshold (seed 0, after pruning):",
        "",
        "| importance | sparsity | " + " | ".join(f"`{k}`" for k in kd_sum[0]["runs"][0]["layers"]) + " |",
        "|---|---:|" + "---:|" * len(kd_sum[0]["runs"][0]["layers"]),
    ]
    for r in kd_sum[0]["runs"]:
        lines.append(f"| {r['importance']} | {r['sparsity']:.0%} | "
                     + " | ".join(f"{100 * v:.1f}%" for v in r["layers"].values()) + " |")
    lines += [
        "",
        f"Machine: {platform.machine()} CPU, {args.threads} thread(s), torch {kd_sum[0]['torch']}; one KD run "
        f"(teacher, student, 3 importances x 2 sparsities) takes {secs:.0f} s.",
        f"Reproduce: `python benchmarks/oneshot_digits.py --seeds {args.seeds}`.",
        "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # a hand-written "## Findings" section of an earlier table is kept
    old = out.read_text() if out.is_file() else ""
    keep = old[old.find("\n## Findings"):] if "\n## Findings" in old else ""
    out.write_text("\n".join(lines) + keep)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
