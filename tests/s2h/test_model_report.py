"""model.report() and print(model) show which groups convert prunes and which it keeps dense."""
import torch
from torch import nn

import s2h


class WithGroupNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 16, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.a(x)))
        x = torch.relu(self.gn(self.b(x)))
        return self.fc(x.mean((2, 3)))


def test_report_lists_pruned_and_kept_groups():
    model = s2h.convert(WithGroupNorm(), torch.randn(2, 3, 8, 8), target_flops=0.5)
    report = model.report()
    pruned = [r for r in report.rows if r.pruned]
    kept = [r for r in report.rows if not r.pruned]
    assert {r.root for r in pruned} == {g.name for g in model.groups}  # exactly the groups with masks
    assert len(kept) == 1 and "GroupNorm" in kept[0].reason and kept[0].channels == 16
    text = str(model)
    assert report.summary() in text and "1 of 2" in report.summary()
