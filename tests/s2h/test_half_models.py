"""FLOPs of half-precision S2H models stay finite; narrow convolutions train under CPU autocast."""
import torch
import torch.nn.functional as F
from torch import nn

import s2h


def test_soft_flops_of_an_fp16_model_is_fp32_and_finite():
    net = nn.Sequential(nn.Conv2d(3, 512, 3, padding=1), nn.BatchNorm2d(512), nn.ReLU(),
                        nn.Conv2d(512, 512, 3, padding=1), nn.BatchNorm2d(512), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10))
    model = s2h.convert(net, torch.randn(1, 3, 64, 64), target_flops=0.5)
    want = model.soft_flops().double()
    model.half()
    got = model.soft_flops()
    assert got.dtype == torch.float32 and torch.isfinite(got)
    assert float(torch.finfo(torch.float16).max) < float(want.detach())  # these MACs would overflow in fp16
    torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=0)


def test_narrow_conv_trains_under_bf16_autocast():
    conv = nn.Conv2d(6, 6, 3, padding=1)
    model = s2h.convert(nn.Sequential(conv, nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten(), nn.Linear(6, 3)), torch.randn(2, 6, 8, 8), target_flops=0.9)
    x = torch.randn(4, 6, 8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16), model.branch("hard"):
        model.train()
        out = model(x)
    out.float().sum().backward()  # failed with a bf16/fp32 mismatch in the narrow conv's backward
    assert torch.isfinite(x.grad).all()
