"""Every plot s2h draws, with matplotlib's Agg canvas (no display, no pyplot state)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

__all__ = ["trajectory_figure", "plot_trajectory", "plot_architecture", "plot_accuracy_vs_sparsity"]


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _save(fig, path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def trajectory_figure(history: list[dict], target: float | None = None, title: str = ""):
    """The figure of :func:`plot_trajectory`: ``(fig, (flops_axes, top1_axes))``. Every series has
    markers, so a one-epoch run shows its points."""
    fig, ax = _figure(6.4, 4.2)
    ep = [h["epoch"] for h in history]
    ax.plot(ep, [h["hard_flops_pct"] for h in history], "o-", ms=4, color="tab:blue", label="hard FLOPs")
    ax.plot(ep, [h["soft_flops_pct"] for h in history], "s--", ms=3, color="tab:blue", alpha=0.5,
            label="soft (expected) FLOPs")
    if target is not None:
        ax.axhline(100 * target, color="tab:blue", linestyle=":", alpha=0.6, label=f"target {100 * target:g}%")
    ax.set_xlabel("epoch")
    ax.set_ylabel("hard-network FLOPs (% of dense)", color="tab:blue")
    ax.set_ylim(0, 100)  # both axes in %: a one-epoch run's points do not all land mid-height
    if len(ep) == 1:
        ax.set_xlim(ep[0] - 1, ep[0] + 1)
        ax.set_xticks([ep[0]])
    ax2 = ax.twinx()
    ev = [h for h in history if h.get("hard_top1") is not None]
    ax2.plot([h["epoch"] for h in ev], [h["hard_top1"] for h in ev], "o-", ms=4, color="tab:red", label="hard top-1")
    ax2.plot([h["epoch"] for h in ev], [h["soft_top1"] for h in ev], "s--", ms=3, color="tab:orange",
             label="soft top-1")
    ax2.set_ylabel("top-1 accuracy (%)", color="tab:red")
    ax2.set_ylim(0, 100)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="center right")
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    return fig, (ax, ax2)


def plot_trajectory(history: list[dict], path, target: float | None = None, title: str = "") -> Path:
    """Hard FLOPs (%) and top-1 (%) per epoch, two y-axes (the paper's Fig. 3)."""
    fig, _ = trajectory_figure(history, target, title)
    return _save(fig, path)


def plot_architecture(groups: list[tuple[str, int, int]], path, title: str = "") -> Path:
    """Retained against total channels per dependency group (the paper's Fig. 4)."""
    n = len(groups)
    fig, ax = _figure(max(6.4, 0.28 * n + 2), 4.2)
    xs = list(range(n))
    ax.bar(xs, [g[1] for g in groups], color="lightgray", label="total channels")
    ax.bar(xs, [g[2] for g in groups], color="tab:blue", label="retained")
    ax.set_xticks(xs)
    ax.set_xticklabels([g[0] for g in groups], rotation=90, fontsize=6)
    ax.set_ylabel("channels")
    ax.set_xlabel("dependency group (by first producer)")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_accuracy_vs_sparsity(runs: Iterable[Mapping], path, teacher: float | None = None,
                              dense: float | None = None, title: str = "") -> Path:
    """Top-1 against sparsity, one line per importance method (solid: retrained, dashed: before).

    ``runs`` are dicts with ``importance``, ``sparsity``, ``top1_retrained`` and optionally
    ``top1_pruned``; ``teacher`` / ``dense`` draw horizontal reference lines. Writes a PNG.
    """
    runs = list(runs)
    fig, ax = _figure(6.4, 4.4)
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
    return _save(fig, path)
