"""The README's ten-line example with the default mask optimizer reaches its FLOPs target on real data.

torchvision's resnet18 (10 classes, 64x64 inputs), SGD lr 0.05 momentum 0.9, target 15%, default
``S2HPruner`` settings, on scikit-learn's digits upscaled to 64x64 (3 channels): after ``STEPS``
steps of batch 16 the hard network is within 1 point of the target (measured: first within 1 point
at step 56 at batch 16 and at batch 32; 15.1% at step 100). With the old default mask optimizer
(SGD lr 0.01) it stayed at 26.6%.
"""
from __future__ import annotations

import pytest
import torch

from s2h.data import get_dataset

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # ~20 s alone, a minute when shared

STEPS, BATCH = 100, 16

TEN_LINES = """
import torch, torchvision, s2h

model = torchvision.models.resnet18(num_classes=10)
pruned = s2h.convert(model, torch.randn(1, 3, 64, 64), target_flops=0.15)
trainer = s2h.S2HPruner(pruned, torch.optim.SGD(pruned.weight_parameters(), lr=0.05, momentum=0.9))
for x, y in loader:                      # your DataLoader
    stats = trainer.step(x, y)           # soft + hard forward, fused KL gap, minimal-work backward
print(stats["hard_flops"], stats["keep"])
small = pruned.export()                  # plain nn.Conv2d / nn.BatchNorm2d with fewer channels
"""


def digits_loader(steps: int, batch: int):
    ds = get_dataset("digits", train=True, image_size=64)
    x = torch.stack([ds[i][0] for i in range(len(ds))]).expand(-1, 3, -1, -1)
    y = torch.tensor([ds[i][1] for i in range(len(ds))])
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch,), generator=g)
        yield x[idx].contiguous(), y[idx]


def test_ten_line_example_reaches_the_flops_target_in_the_stated_steps():
    torch.manual_seed(0)
    scope = {"loader": digits_loader(STEPS, BATCH)}
    exec(compile(TEN_LINES, "README.md", "exec"), scope)
    stats, pruned = scope["stats"], scope["pruned"]
    assert stats["step"] == STEPS - 1
    assert abs(stats["hard_flops"] - 0.15) <= 0.01, stats["hard_flops"]
    assert abs(pruned.hard_flops() / pruned.dense_flops() - 0.15) <= 0.01
