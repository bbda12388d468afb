"""Plots for the command-line tools, drawn with matplotlib's Agg canvas (no display, no pyplot state)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping


def plot_accuracy_vs_sparsity(runs: Iterable[Mapping], path, teacher: float | None = None,
                              dense: float | None = None, title: str = "") -> Path:
    """Top-1 against sparsity, one line per importance method (solid: retrained, dashed: before).

    ``runs`` are dicts with ``importance``, ``sparsity``, ``top1_retrained`` and optionally
    ``top1_pruned``; ``teacher`` / ``dense`` draw horizontal reference lines. Writes a PNG.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = list(runs)
    fig = Figure(figsize=(6.4, 4.4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    methods = list(dict.fromkeys(r["importance"] for r in runs))
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    for i, m in enumerate(methods):
        rs = sorted((r for r in runs if r["importance"] == m), key=lambda r: r["sparsity"])
        xs = [100 * r["sparsity"] for r in rs]
        c = colors[i % len(colors)]
        ax.plot(xs, [r["top1_retrained"] for r in rs], "o-", color=c, label=f"{m} (retrained)")
        if all("top1_pruned" in r for r in rs):
            ax.plot(xs, [r["top1_pruned"] for r in rs], "x--", color=c, alpha=0.6, label=f"{m} (before retraining)")
    if teacher is not None:
        ax.axhline(teacher, color="black", linestyle=":", label=f"teacher {teacher:.1f}%")
    if dense is not None:
        ax.axhline(dense, color="gray", linestyle="-.", label=f"dense student {dense:.1f}%")
    ax.set_xlabel("sparsity (% of prunable weights removed)")
    ax.set_ylabel("top-1 accuracy (%)")
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
