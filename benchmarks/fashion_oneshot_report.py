"""The table, plot and protocol of benchmarks/fashion_oneshot.py (markdown + PNG)."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import fashion_common as fc

LABELS = {
    "grad-kd": "grad-kd |θ·∂L_total/∂θ| (the paper)",
    "grad-ce": "grad-ce |θ·∂CE/∂θ|",
    "magnitude": "magnitude |θ| (s2h, one-shot)",
    "torch-l1": "torch global_unstructured L1 (one-shot)",
    "gmp": "gradual magnitude (Zhu & Gupta, cubic)",
}
# marker and line style: lines that coincide (all methods at 10% once a layer is emptied) stay visible
STYLE = {"grad-kd": ("s", "-"), "grad-ce": ("^", "--"), "magnitude": ("o", "-"), "torch-l1": ("x", ":"),
         "gmp": ("D", "-.")}
RETRAIN_LABELS = {"kd": "KD", "ce": "CE only"}


def _fmt(vals: list[float]) -> str:
    m, s = fc.mean_std(vals)
    return f"{m:.2f} ± {s:.2f}" if len(vals) > 1 else f"{m:.2f}"


def grouped(results: list[dict]) -> dict:
    g: dict = defaultdict(list)
    for r in results:
        if "sparsity" in r:
            g[(r["method"], r["retrain"], r["sparsity"])].append(r)
    return g


def table_lines(study, results: list[dict], key: str = "top1") -> list[str]:
    g = grouped(results)
    head = "| importance / method | retraining | " + " | ".join(f"{100 * s:g}%" for s in study.sparsities) + " |"
    lines = [head, "|---|---|" + "---:|" * len(study.sparsities)]
    for method in LABELS:
        for rt in ("kd", "ce"):
            cells = []
            for s in study.sparsities:
                rs = [r for r in g.get((method, rt, s), []) if key in r]
                cell = _fmt([r[key] for r in rs]) if rs else "—"
                if rs and len(rs) < len(study.seeds):
                    cell += f" ({len(rs)} seed{'s' if len(rs) > 1 else ''})"
                cells.append(cell)
            if any(c != "—" for c in cells):
                label = LABELS[method].replace("|", "\\|")
                lines.append(f"| {label} | {RETRAIN_LABELS[rt]} | " + " | ".join(cells) + " |")
    return lines


def collapse_lines(study, results: list[dict]) -> list[str]:
    """Per layer, the fraction of weights kept (mean over the runs of a cell, KD and CE retraining alike):
    one global threshold can empty a layer, and then no retraining recovers the cut network."""
    runs = [r for r in results if "layers" in r]
    if not runs:
        return []
    names = list(runs[0]["layers"])
    lines = ["| method | sparsity | " + " | ".join(f"`{n}` kept %" for n in names) + " | runs with an emptied layer |",
             "|---|---:|" + "---:|" * (len(names) + 1)]
    g = grouped(runs)
    for method in LABELS:
        for s in study.sparsities:
            rs = g.get((method, "kd", s), []) + g.get((method, "ce", s), [])
            if not rs:
                continue
            kept = [fc.mean_std([100 * (1 - r["layers"][n]) for r in rs])[0] for n in names]
            dead = sum(any(v >= 1.0 for v in r["layers"].values()) for r in rs)
            lines.append(f"| {method} | {100 * s:g}% | " + " | ".join(f"{k:.2f}" for k in kept) + f" | {dead} / {len(rs)} |")
    return lines


def goal_lines(study, results: list[dict]) -> list[str]:
    """grad-kd retrained with KD (the paper's pipeline) against every other row at 95-99%."""
    g = grouped(results)
    out = []
    for s in [s for s in study.sparsities if s >= 0.95]:
        ours = g.get(("grad-kd", "kd", s))
        if not ours:
            continue
        m = fc.mean_std([r["top1"] for r in ours])[0]
        best = max(((fc.mean_std([r["top1"] for r in rs])[0], k) for k, rs in g.items()
                    if k[2] == s and k[:2] != ("grad-kd", "kd")), default=None)
        if best is None:
            continue
        verdict = "met" if m >= best[0] else "not met"
        out.append(f"- {100 * s:g}%: grad-kd + KD {m:.2f}; best other row {best[0]:.2f} "
                   f"({LABELS[best[1][0]]}, {RETRAIN_LABELS[best[1][1]]}): **{verdict}**")
    return out


def plot(study, results: list[dict], path: Path, dense: float | None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = grouped(results)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, rt in zip(axes, ("kd", "ce")):
        for method, label in LABELS.items():
            pts = [(100 * s, *fc.mean_std([r["top1"] for r in g[(method, rt, s)]]))
                   for s in study.sparsities if g.get((method, rt, s))]
            if pts:
                xs, ys, sd = zip(*pts)
                ax.errorbar(xs, ys, yerr=sd, marker=STYLE[method][0], linestyle=STYLE[method][1], capsize=3,
                            label=label, linewidth=3 if method == "grad-kd" else 1.5, markersize=8 if method == "grad-kd" else 5,
                            zorder=3 if method == "grad-kd" else 2)
        if dense is not None:
            ax.axhline(dense, color="gray", linestyle="--", linewidth=1, label="dense student")
        ax.set_title(f"retrained with {RETRAIN_LABELS[rt]}")
        ax.set_xlabel("sparsity of the prunable weights (%)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 % (Fashion-MNIST test)")
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle("One-shot unstructured pruning of small_cnn_student on Fashion-MNIST")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def protocol_lines(study, results: list[dict], wall_s: float) -> list[str]:
    teacher = next((r for r in results if r["method"] == "teacher"), None)
    students = [r for r in results if r["method"] == "student"]
    runs = [r for r in results if "sparsity" in r]
    n_train = study.n_train or 60000
    t = f"{teacher['top1']:.2f}% ({teacher['params'] / 1e3:.1f}k parameters)" if teacher else "—"
    st = (f"{_fmt([r['top1'] for r in students])}% ({students[0]['params'] / 1e3:.1f}k parameters, "
          f"{runs[0]['prunable'] if runs else '?'} prunable)" if students else "—")
    return [
        "## Protocol", "",
        f"- Data: Fashion-MNIST, a fixed training subset of {n_train} images (drawn once, seed 0), "
        f"{'the whole 10,000-image' if study.n_test is None else f'the first {study.n_test} images of the'} "
        "test split; augmentation: random 28×28 crop of the 3-pixel padded image + horizontal flip.",
        f"- Teacher: CIFAR-style ResNet-{study.teacher_depth} (16/32/64), CE, {study.teacher_epochs} epochs, "
        f"lr {fc.LR}: top-1 {t}. Trained once, shared by every seed.",
        f"- Student: `small_cnn_student`, per seed distilled {study.student_epochs} epochs from the teacher "
        f"(alpha {study.alpha}·T²·CA-KLD + (1 − alpha)·CE, T {study.temperature}), lr {study.lr}: top-1 {st}.",
        f"- Importance on the dense student over {study.batches} augmented training batches of {fc.BATCH} "
        f"(s2h.unstructured defaults{', ' + str(dict(study.importance_kw)) if study.importance_kw else ''}); "
        "one global threshold over every conv/linear weight except the first conv and the classifier; "
        "exact sparsity.",
        "- torch-l1: `torch.nn.utils.prune.global_unstructured(..., L1Unstructured, amount=k)` on the same layers, "
        "retrained through PyTorch's reparametrisation, then `prune.remove`.",
        f"- gmp: from the dense student, global magnitude pruning every 1/{4} epoch on the cubic schedule "
        f"s_t = s_f(1 − (1 − t/t_end)³), t_end = {int(100 * 0.75)}% of the retraining steps, then fine-tuning "
        "with the final mask.",
        f"- Retraining: {study.epochs} epochs for every row (gmp prunes within them), SGD Nesterov momentum 0.9, "
        f"weight decay {fc.WEIGHT_DECAY}, batch {fc.BATCH}, per-step cosine from lr {study.lr}; the mask re-applied "
        "after every step; KD = the same loss as the student's distillation, CE only = cross-entropy.",
        f"- Seeds {', '.join(map(str, study.seeds))}; top-1 mean ± std over seeds. {len(runs)} runs.",
        f"- Machine: {fc.machine_line()}; {study.workers} worker process(es), 1 thread each; "
        f"this invocation {wall_s / 60:.1f} min (finished runs are reused).",
        "",
    ]


def write_report(study, results: list[dict], stem: Path, wall_s: float) -> None:
    students = [r["top1"] for r in results if r["method"] == "student"]
    dense = fc.mean_std(students)[0] if students else None
    lines = ["# One-shot unstructured pruning on Fashion-MNIST", "",
             "Top-1 % on the test split after retraining (mean ± std over seeds); columns: sparsity of the "
             "prunable weights.", ""]
    lines += table_lines(study, results) + [""]
    lines += ["Goal: grad-kd retrained with KD at least as accurate as every other row at 95–99%:", ""]
    lines += goal_lines(study, results) + [""]
    lines += ["Before retraining (one-shot methods only, the pruned dense student):", ""]
    lines += table_lines(study, [r for r in results if r.get("retrain") == "kd"], key="top1_oneshot") + [""]
    lines += ["Weights kept per layer under the global threshold (first conv and classifier are never pruned):", ""]
    lines += collapse_lines(study, results) + [""]
    lines += protocol_lines(study, results, wall_s)
    lines += [f"![top-1 vs sparsity]({stem.name}.png)", ""]
    stem.with_suffix(".md").write_text("\n".join(lines))
    plot(study, results, stem.with_suffix(".png"), dense)
