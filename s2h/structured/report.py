"""What :func:`s2h.convert` pruned and what it left dense: one row per dependency group.

``report_of(model)`` rebuilds the :class:`ConversionReport` of a converted model from
``model.config["report"]`` (plain data, so it survives ``s2h.save`` / ``s2h.load``);
``str(report)`` is the table the CLI prints, ``report.to_markdown()`` what it writes to a run
folder. Columns: the group's root module, its channels, the share of the dense model's MACs in
layers that read or write the group's channels, pruned or kept, and why it was kept.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = ["GroupRow", "ConversionReport", "build_report", "report_of", "format_report"]


@dataclass
class GroupRow:
    root: str
    channels: int
    flops_share: float
    pruned: bool
    reason: str = ""


@dataclass
class ConversionReport:
    """``rows`` per group; ``prunable_share``: MACs in layers touching a pruned group;
    ``min_fraction``: hard FLOPs / dense FLOPs with one bucket left in every group."""

    rows: list[GroupRow] = field(default_factory=list)
    dense_macs: float = 0.0
    prunable_share: float = 0.0
    min_fraction: float = 1.0
    target_flops: float = 1.0

    @property
    def kept(self) -> list[GroupRow]:
        return [r for r in self.rows if not r.pruned]

    @property
    def reachable(self) -> bool:
        return self.min_fraction <= self.target_flops + 1e-12

    def summary(self) -> str:
        n = len(self.rows) - len(self.kept)
        s = (f"{n} of {len(self.rows)} dependency groups pruned, {100 * self.prunable_share:.1f}% of "
             f"{self.dense_macs / 1e6:.1f} MMACs in their layers; lowest reachable FLOPs "
             f"{100 * self.min_fraction:.1f}% (target {100 * self.target_flops:.1f}%)")
        if not self.reachable:
            s += " -- the target is NOT reachable with the groups S2H can prune"
        return s

    def to_markdown(self) -> str:
        lines = [self.summary(), "", "| group | channels | FLOPs share | status | why kept |", "|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {r.root} | {r.channels} | {100 * r.flops_share:.1f}% | "
                         f"{'pruned' if r.pruned else 'kept'} | {r.reason} |")
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        width = max([len(r.root) for r in self.rows] + [5])
        lines = [self.summary(), f"{'group':<{width}}  channels  FLOPs  status  why kept"]
        for r in self.rows:
            lines.append(f"{r.root:<{width}}  {r.channels:>8}  {100 * r.flops_share:>4.1f}%  "
                         f"{'pruned' if r.pruned else 'kept  '}  {r.reason}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ConversionReport":
        d = dict(d)
        d["rows"] = [GroupRow(**r) for r in d.get("rows", [])]
        return cls(**d)


def build_report(groups, kept, costs, table, flops_fn, target_flops: float) -> ConversionReport:
    """The report of one conversion: ``groups`` pruned, ``kept`` (KeptGroup) left dense.

    ``costs``: the LayerCost list; ``table``: its FlopsTable; ``flops_fn(widths)``: MACs per sample.
    """
    dense_w = torch.tensor([g.channels for g in groups], dtype=torch.float64)
    per_layer = table.coef * (table.a_in @ dense_w + table.c_in) * (table.a_out @ dense_w + table.c_out)
    dense = float(per_layer.sum()) or 1.0
    rows = []
    for gi, g in enumerate(groups):
        touches = (table.a_in[:, gi] > 0) | (table.a_out[:, gi] > 0)
        rows.append(GroupRow(g.name, g.channels, float(per_layer[touches].sum()) / dense, True))
    by_name = {c.name: float(v) for c, v in zip(costs, per_layer)}
    for k in kept:
        share = sum(by_name.get(m, 0.0) for m in k.modules) / dense
        rows.append(GroupRow(k.root, k.channels, share, False, k.reason))
    prunable = (table.a_in.sum(1) > 0) | (table.a_out.sum(1) > 0) if groups else torch.zeros(0, dtype=torch.bool)
    min_w = torch.tensor([g.divisor for g in groups], dtype=torch.float64)
    min_fraction = float(flops_fn(min_w)) / dense if groups else 1.0
    return ConversionReport(rows, dense, float(per_layer[prunable].sum()) / dense if groups else 0.0,
                            min_fraction, float(target_flops))


def report_of(model) -> ConversionReport:
    """The :class:`ConversionReport` of a converted model (an S2HModel)."""
    d = getattr(model, "config", {}).get("report")
    if d is None:
        raise ValueError("report_of: the model carries no conversion report (convert it with s2h.convert)")
    return ConversionReport.from_dict(d)


def format_report(model, markdown: bool = False) -> str:
    """The report of a converted model as text (what the CLI prints) or markdown (its run folder)."""
    r = report_of(model)
    return r.to_markdown() if markdown else str(r)
