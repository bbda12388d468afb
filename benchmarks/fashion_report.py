"""Tables and plots of the Fashion-MNIST studies (markdown + PNG)."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import fashion_common as fc

STRUCTURED_ROWS = [
    ("dense", 0, "1. dense"),
    ("uniform", 0, "2. uniform width, from scratch"),
    ("tp-magnitude", 1, "3. Torch-Pruning, GroupMagnitude (dense E/2 + fine-tune E/2)"),
    ("tp-taylor", 1, "3. Torch-Pruning, GroupTaylor (dense E/2 + fine-tune E/2)"),
    ("tp-magnitude", 2, "4. Torch-Pruning, GroupMagnitude, 2x budget (dense E + fine-tune E)"),
    ("tp-taylor", 2, "4. Torch-Pruning, GroupTaylor, 2x budget (dense E + fine-tune E)"),
    ("s2h", 0, "5. S2H, one stage, hard network exported"),
    ("s2h-arch", 0, "S2H's exported architecture, trained from scratch"),
]


def _budget_kind(r: dict, epochs: int) -> int:
    if not r["method"].startswith("tp-"):
        return 0
    return 2 if r["pretrain"] == epochs else 1


def _fmt(mean: float, std: float, n: int) -> str:
    return f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f}"


def structured_table(study, results: list[dict]) -> tuple[list[str], dict]:
    groups: dict = defaultdict(list)
    for r in results:
        if r["method"] == "dense" and r["epochs"] != study.epochs:
            continue  # the E/2 dense runs are Torch-Pruning's pre-training, not a row
        if r.get("table5_row"):
            continue
        groups[(r["method"], _budget_kind(r, study.epochs), r["target"])].append(r)
    lines = ["| method | FLOPs target | top-1 % (mean ± std) | seeds | FLOPs of dense % | params | "
             "latency b1 ms | latency b64 ms | wall s / run | CPU s / run |", "|---|---|---|---|---|---|---|---|---|---|"]
    points = {}
    for method, kind, label in STRUCTURED_ROWS:
        for target in ((1.0,) if method == "dense" else study.targets):
            rs = groups.get((method, kind, target), [])
            if not rs:
                continue
            top, sd = fc.mean_std([r["top1"] for r in rs])
            fl = fc.mean_std([100 * r["flops_frac"] for r in rs])[0]
            flops_range = f"{min(100 * r['flops_frac'] for r in rs):.1f}–{max(100 * r['flops_frac'] for r in rs):.1f}"
            par = fc.mean_std([r["params"] for r in rs])[0]
            lat1 = fc.mean_std([r.get("latency_b1_ms", float("nan")) for r in rs])[0]
            lat64 = fc.mean_std([r.get("latency_b64_ms", float("nan")) for r in rs])[0]
            wall = fc.mean_std([r["wall_s"] + r.get("pretrain_wall_s", 0.0) for r in rs])[0]
            cpus = [r["cpu_s"] + r.get("pretrain_cpu_s", 0.0) for r in rs if "cpu_s" in r]
            cpu = f"{fc.mean_std(cpus)[0]:.0f}" if len(cpus) == len(rs) else "—"
            tgt = "—" if method == "dense" else f"{100 * target:g}%"
            lines.append(f"| {label} | {tgt} | {_fmt(top, sd, len(rs))} | {len(rs)} | {flops_range} | "
                         f"{par / 1e3:.1f}k | {lat1:.3f} | {lat64:.2f} | {wall:.0f} | {cpu} |")
            points.setdefault(label, []).append((fl, top, sd))
    return lines, points


def table5_lines(study, results: list[dict]) -> list[str]:
    from fashion_structured import TABLE5_NAMES, table5_rows

    t = study.targets[0]
    rows = {r["table5_row"]: r for r in results if r["method"] == "s2h" and r["target"] == t and r["seed"] == study.seeds[0]}
    paper = {r["row"]: r["paper_top1"] for r in table5_rows()}
    lines = [f"| Table 5 row | terms | top-1 % here (1 seed) | soft top-1 % | FLOPs of dense % | paper top-1 % "
             "(ResNet-50, CIFAR-100) |", "|---|---|---|---|---|---|"]
    for row in range(1, 6):
        r = rows.get(0 if row == 2 else row)
        if r is None:
            continue
        lines.append(f"| {row} | {TABLE5_NAMES[row]} | {r['top1']:.2f} | {r.get('soft_top1', float('nan')):.2f} | "
                     f"{100 * r['flops_frac']:.1f} | {paper.get(row, float('nan')):.2f} |")
    return lines


def goal_lines(study, results: list[dict]) -> list[str]:
    """The issue's goals, computed from the runs (met / not met), so a rerun states its own verdict."""
    main = [r for r in results if not r.get("table5_row")]

    def rows(method: str, target: float, kind: int = 0) -> list[dict]:
        return [r for r in main if r["method"] == method and r["target"] == target and _budget_kind(r, study.epochs) == kind
                and (method != "dense" or r["epochs"] == study.epochs)]

    def stat(rs: list[dict]) -> tuple[float, float]:
        return fc.mean_std([r["top1"] for r in rs])

    out = ["## Goals, as measured (computed from the rows above)", ""]
    for t in study.targets:
        s2h = rows("s2h", t)
        peers = {"uniform width": rows("uniform", t), "Torch-Pruning GroupMagnitude": rows("tp-magnitude", t, 1),
                 "Torch-Pruning GroupTaylor": rows("tp-taylor", t, 1)}
        peers = {k: stat(v) for k, v in peers.items() if v}
        if not s2h or not peers:
            continue
        m, sd = stat(s2h)
        best = max(peers, key=lambda k: peers[k][0])
        bm, bsd = peers[best]
        verdict = "met" if m >= bm else "**not met**"
        out.append(f"- S2H at least as accurate as the best peer at the same budget, {100 * t:g}% FLOPs: {verdict} "
                   f"(S2H {m:.2f} ± {sd:.2f}, best peer {best} {bm:.2f} ± {bsd:.2f}; difference {m - bm:+.2f}, "
                   f"seed std {max(sd, bsd):.2f}).")
    dense, s2h15 = rows("dense", 1.0), rows("s2h", study.targets[0])
    if dense and s2h15:
        gap = stat(dense)[0] - stat(s2h15)[0]
        out.append(f"- S2H within 1.5 points of dense at {100 * study.targets[0]:g}%: {'met' if gap <= 1.5 else '**not met**'} "
                   f"(dense {stat(dense)[0]:.2f} − S2H {stat(s2h15)[0]:.2f} = {gap:.2f}).")
    s2h_all = [r for r in main if r["method"] == "s2h"]
    if s2h_all:
        errs = [abs(r["flops_frac"] - r["target"]) / r["target"] for r in s2h_all]
        out.append(f"- Exported FLOPs within 1% of the target for every seed: {'met' if max(errs) <= 0.01 else '**not met**'} "
                   f"(" + ", ".join(f"{100 * r['flops_frac']:.2f}% at {100 * r['target']:g}%" for r in s2h_all)
                   + f"; largest relative error {100 * max(errs):.2f}%).")
    t5 = {r["table5_row"]: r["top1"] for r in results if r["method"] == "s2h" and r.get("table5_row")
          and r["seed"] == study.seeds[0] and r["target"] == study.targets[0]}
    full = next((r["top1"] for r in s2h15 if r["seed"] == study.seeds[0]), None)
    if t5 and full is not None:
        t5[2] = full
        best_row = max(t5, key=t5.get)
        far = all(t5.get(r, full) < full - 5 for r in (3, 4))
        out.append(f"- Table 5's ordering (row 2 the best; rows 3 and 4 more than 5 points below it): "
                   f"{'reproduced' if best_row == 2 and far else '**not reproduced**'} (best row {best_row}; "
                   + ", ".join(f"row {r} {t5[r]:.2f}" for r in sorted(t5)) + ").")
    return out + [""]


def plot(points: dict, path: Path, title: str, xlabel: str, dense: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for label, pts in points.items():
        pts = sorted(pts)
        xs, ys, es = zip(*pts)
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=label)
    if dense is not None:
        ax.axhline(dense, color="gray", linestyle="--", linewidth=1, label="dense")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_structured_report(study, results: list[dict], stem: Path, wall_s: float | None,
                            missing: list[str] = (), findings: Path | None = None) -> None:
    lines, points = structured_table(study, results)
    dense = points.pop("1. dense", [(100.0, float("nan"), 0.0)])[0][1]
    plot(points, stem.with_suffix(".png"), f"Fashion-MNIST, ResNet-{study.depth}, {study.epochs} epochs",
         "FLOPs of the dense network (%)", dense)
    n = study.n_train or 60000
    text = [
        f"# Structured pruning on Fashion-MNIST: S2H, uniform width, Torch-Pruning",
        "",
        f"Machine: {fc.machine_line()}. Written by `python benchmarks/fashion_structured.py` "
        + (f"(whole study {wall_s / 60:.0f} min of wall time, {study.workers} runs in parallel, 1 thread each)."
           if wall_s is not None else "`--report-only`, from the runs finished so far."),
        *([f"**Not finished when this was written ({len(missing)} runs, their rows are missing or have fewer "
           f"seeds):** " + ", ".join(f"`{k}`" for k in missing)] if missing else []),
        "",
        "## Protocol",
        f"- Data: Fashion-MNIST from the idx files (`s2h.data`), a fixed random subset of {n:,} training "
        f"images (the same for every run), the whole 10,000-image test split{'' if not study.n_test else f' (first {study.n_test})'}. "
        "Augmentation: random 28x28 crop of the 3-pixel padded image, horizontal flip.",
        f"- Network: CIFAR ResNet-{study.depth} (3x3 stem, stages of 16/32/64 channels, option-B "
        "shortcuts), 1 input channel, 10 classes.",
        f"- Budget E = {study.epochs} epochs for every method; batch {fc.BATCH}; SGD, Nesterov momentum 0.9, "
        f"lr {fc.LR}, weight decay {fc.WEIGHT_DECAY}, cosine decay per step to 0; the same batch order and "
        "augmentation draws for a given seed. Seeds: " + ", ".join(map(str, study.seeds)) + ".",
        "- Uniform width: the three stage widths scaled by one factor, rounded, MACs closest to the target.",
        "- Torch-Pruning 1.6.1: `MetaPruner(global_pruning=True, max_pruning_ratio=0.95)`, classifier "
        "ignored, `GroupMagnitudeImportance(p=2)` or `GroupTaylorImportance` (gradients of 8 training "
        "batches), pruning ratio bisected until the MACs hit the target; then fine-tuned with a fresh "
        "cosine schedule. Row 3: dense E/2 + fine-tune E/2 (the same budget); row 4: dense E + fine-tune E.",
        "- S2H: `s2h.convert(target_flops=...)` and `s2h.S2HPruner` with the library defaults"
        + (f" and {study.s2h}" if study.s2h else "") + ", E epochs from scratch, the hard network exported "
        "(`model.export()`). The last row trains that exported architecture from freshly initialised "
        "weights for E epochs: the gap between the two rows is what soft-to-hard training adds to the "
        "architecture search.",
        "- Top-1 of the exported model in eval mode; MACs by `torch.utils.flop_counter.FlopCounterMode` "
        "(FLOPs / 2) on the exported model; latency: minimum over 25 (batch 1) / 8 (batch 64) eval "
        "forwards after warm-up, 1 thread, after all training finished, every model timed once per round "
        "in interleaved rounds. Wall time and CPU time (the run's process time; each run uses 1 thread): "
        "each run's own, Torch-Pruning's including its dense pre-training. Wall time depends on what "
        "else ran on the machine; CPU time much less so.",
        "",
        "## Results",
        "",
        *lines,
        "",
        f"![top-1 against FLOPs]({stem.with_suffix('.png').name})",
        "",
    ]
    if study.table5:
        text += ["## The paper's Table 5 on this setup "
                 f"({100 * study.targets[0]:g}% FLOPs, seed {study.seeds[0]})", "", *table5_lines(study, results), ""]
    text += goal_lines(study, results)
    if findings is not None and Path(findings).is_file():  # the hand-written reading of the last full run
        text += ["", Path(findings).read_text().rstrip()]
    stem.with_suffix(".md").write_text("\n".join(text) + "\n")


CURVE_LABELS = {"dense": "dense", "uniform": "uniform width, from scratch",
                "tp-magnitude": "Torch-Pruning GroupMagnitude (dense E/2 + fine-tune E/2)",
                "s2h": "S2H, one stage"}


def write_curve_report(study, budgets: list[int], results: list[dict], stem: Path, wall_s: float | None) -> None:
    """Top-1 against the epoch budget E, per method and FLOPs target: where S2H starts to win."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from fashion_structured import CURVE_METHODS

    by_key = {r["key"]: r for r in results}
    groups: dict = defaultdict(list)
    for r in by_key.values():
        if r.get("table5_row"):
            continue
        # Torch-Pruning's budget is pre-training + fine-tuning: the main study's 2x-budget row at E is the
        # curve's point at 2E
        budget = r["epochs"] + r.get("pretrain", 0)
        groups[(r["method"], r["target"], budget)].append(r)
    cols = sorted(budgets)
    head = "| method | FLOPs target | " + " | ".join(f"E = {E}" for E in cols) + " | CPU s / run at E = " + f"{cols[-1]} |"
    lines = [head, "|---|---|" + "---|" * (len(cols) + 1)]
    fig, axes = plt.subplots(1, len(study.targets), figsize=(6 * len(study.targets), 4.5), squeeze=False)
    for ti, target in enumerate(study.targets):
        ax = axes[0][ti]
        for method in ("dense", *CURVE_METHODS):
            t = 1.0 if method == "dense" else target
            cells, pts = [], []
            for E in cols:
                rs = groups.get((method, t, E), [])
                if not rs:
                    cells.append("—")
                    continue
                m, sd = fc.mean_std([r["top1"] for r in rs])
                cells.append(f"{_fmt(m, sd, len(rs))} (n={len(rs)})")
                pts.append((E, m, sd))
            last = groups.get((method, t, cols[-1]), [])
            cpus = [r["cpu_s"] + r.get("pretrain_cpu_s", 0.0) for r in last if "cpu_s" in r]
            cpu = f"{fc.mean_std(cpus)[0]:.0f}" if cpus and len(cpus) == len(last) else "—"
            lines.append(f"| {CURVE_LABELS[method]} | {'—' if method == 'dense' else f'{100 * target:g}%'} | "
                         + " | ".join(cells) + f" | {cpu} |")
            if pts:
                xs, ys, es = zip(*pts)
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=CURVE_LABELS[method],
                            linestyle="--" if method == "dense" else "-")
        ax.set_xscale("log", base=2)
        ax.set_xticks(cols, [str(E) for E in cols])
        ax.set_xlabel("epoch budget E")
        ax.set_ylabel("top-1 (%)")
        ax.set_title(f"{100 * target:g}% of the dense FLOPs")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Fashion-MNIST, ResNet-{study.depth}, {study.n_train or 60000:,} training images")
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120)
    plt.close(fig)
    text = [
        "# The budget curve: S2H and its peers at several epoch budgets (Fashion-MNIST)",
        "",
        f"Machine: {fc.machine_line()}. Written by `python benchmarks/fashion_structured.py --curve "
        + " ".join(map(str, cols)) + "`"
        + (f" ({wall_s / 60:.0f} min of wall time for the runs not already in the work folder, "
           f"{study.workers} runs in parallel, 1 thread each)." if wall_s is not None else " `--report-only`."),
        "",
        "Protocol: the structured study's (fashion_structured.md), with the budget E varied: every method gets "
        "E epochs in all (Torch-Pruning: dense E/2, then fine-tuning E/2, GroupMagnitude, its better "
        "importance in the main study); the cosine schedule spans each run's own epochs. Seeds: "
        + ", ".join(map(str, study.seeds)) + "; cells are top-1 % of the exported model, mean ± std over "
        "the seeds (n). Dense rows are at the budgets the work folder holds (the main study's E and "
        "Torch-Pruning's E/2 pre-training).",
        "",
        *lines,
        "",
        f"![top-1 against the epoch budget]({stem.with_suffix('.png').name})",
        "",
    ]
    stem.with_suffix(".md").write_text("\n".join(text) + "\n")
