"""Analytic FLOPs: hand-written formulas, FlopCounterMode, gradients, and the resource loss."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import s2h
from s2h_kernels import reference
from s2h_reference import macs, peaked_u, random_u


pytestmark = pytest.mark.usefixtures("one_thread")


def expected_widths(model):
    """E per group from the pure-PyTorch reference op, differentiable in a fresh copy of u."""
    u = model.u.detach().clone().requires_grad_(True)
    _, e, k = reference.channel_masks(u, model.group_offsets.tolist(), model.temperature,
                                      [g.divisor for g in model.groups], model.hard_width)
    return u, {g.name: e[i] for i, g in enumerate(model.groups)}, {g.name: int(k[i]) for i, g in enumerate(model.groups)}


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.expand = nn.Conv2d(3, 8, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.project = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.project(F.relu(self.bn2(self.dw(F.relu(self.bn1(self.expand(x)))))))


class Tokens(nn.Module):
    """A token MLP: linears on [B, T, C] (the FLOPs count T tokens per sample)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(7, 16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.fc2(F.gelu(self.fc1(x)))
        return self.head(x.mean(1))


class Flatten(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc1 = nn.Linear(6 * 4 * 4, 10)
        self.fc2 = nn.Linear(10, 2)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(F.relu(self.conv(x)), 4).flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


def hand_small(e):
    return 3 * e["conv1"] * 9 * 64 + e["conv1"] * e["conv2"] * 9 * 16 + e["conv2"] * 4


def hand_depthwise(e):
    return 3 * e["expand"] * 64 + e["expand"] * 9 * 64 + e["expand"] * 4 * 64


def hand_tokens(e):
    return 5 * 7 * e["embed"] + 5 * e["embed"] * e["fc1"] + 5 * e["fc1"] * e["embed"] + e["embed"] * 3


def hand_flatten(e):
    return 3 * e["conv"] * 9 * 64 + e["conv"] * 16 * e["fc1"] + e["fc1"] * 2


CASES = [
    (Small, torch.randn(1, 3, 8, 8), hand_small),
    (Depthwise, torch.randn(1, 3, 8, 8), hand_depthwise),
    (Tokens, torch.randn(1, 5, 7), hand_tokens),
    (Flatten, torch.randn(1, 3, 8, 8), hand_flatten),
]


@pytest.mark.parametrize("net,x,hand", CASES, ids=["conv", "depthwise", "tokens", "flatten"])
def test_soft_flops_match_hand_formula_and_gradient(net, x, hand):
    torch.manual_seed(0)
    model = s2h.convert(net(), x)
    random_u(model, seed=7)
    u_ref, e, k = expected_widths(model)
    ref = hand(e)
    model.update_masks()
    soft = model.soft_flops()
    torch.testing.assert_close(soft.double(), ref.double(), rtol=1e-5, atol=0)
    soft.backward()
    ref.backward()
    torch.testing.assert_close(model.u.grad, u_ref.grad, rtol=1e-4, atol=1e-6)
    assert model.hard_flops() == pytest.approx(float(hand({n: torch.tensor(float(v)) for n, v in k.items()})))
    full = {g.name: torch.tensor(float(g.channels)) for g in model.groups}
    assert model.dense_flops() == pytest.approx(float(hand(full)))
    assert model.dense_flops() == pytest.approx(macs(model.export({n: int(v) for n, v in full.items()}), x))


@pytest.mark.parametrize("net,x,hand", CASES, ids=["conv", "depthwise", "tokens", "flatten"])
def test_hard_flops_equal_flop_counter_on_export(net, x, hand):
    model = s2h.convert(net(), x)
    for seed in range(3):
        random_u(model, seed=seed, scale=3.0)
        assert model.hard_flops() == pytest.approx(macs(model.export(), x), rel=1e-6)


def test_binary_masks_make_soft_flops_equal_hard_flops():
    model = s2h.convert(s2h.models.resnet56(), torch.randn(1, 3, 32, 32))
    peaked_u(model, 0.4)
    assert float(model.soft_flops().detach()) == pytest.approx(model.hard_flops(), rel=1e-5)
    assert model.hard_flops() < 0.4 * model.dense_flops()


def test_flops_are_per_sample():
    a = s2h.convert(Small(), torch.randn(1, 3, 8, 8))
    b = s2h.convert(Small(), torch.randn(4, 3, 8, 8))
    assert a.dense_flops() == b.dense_flops()


def test_resource_loss_drives_the_soft_flops_to_the_target():
    model = s2h.convert(s2h.models.resnet56(), torch.randn(1, 3, 32, 32), target_flops=0.3)
    r0 = model.resource_loss()
    assert float(r0.detach()) == pytest.approx((float(model.soft_flops().detach()) / model.dense_flops() - 0.3) ** 2, rel=1e-5)
    opt = torch.optim.Adam(model.mask_parameters(), lr=0.05)
    for _ in range(150):
        opt.zero_grad()
        model.resource_loss().backward()
        opt.step()
    assert float(model.soft_flops().detach()) / model.dense_flops() == pytest.approx(0.3, abs=0.01)
    assert 0.1 < model.hard_flops() / model.dense_flops() < 0.6


def test_dtype_conversions_keep_flops_exact():
    """.half()/.float()/.double() convert the network and u, never the float64 FLOPs tables."""
    model = s2h.convert(s2h.models.resnet56(), torch.randn(1, 3, 32, 32))
    random_u(model)
    dense, hard = model.dense_flops(), model.hard_flops()
    soft = float(model.soft_flops().detach())
    assert dense == pytest.approx(macs(s2h.models.resnet56(), torch.randn(1, 3, 32, 32)), rel=1e-3)  # > 65504: fp16 overflows
    for convert, dtype in ((model.half, torch.float16), (model.float, torch.float32), (model.double, torch.float64)):
        convert()
        assert model.u.dtype == dtype
        assert all(b.dtype == torch.float64 for n, b in model.named_buffers() if n.startswith("_flops_"))
        assert model.hard_flops() == hard
        assert model.flops(model.group_channels).item() == dense
    assert float(model.soft_flops().detach()) == pytest.approx(soft, rel=1e-3)  # u went through fp16


def test_float64_network_gets_float64_masks():
    model = s2h.convert(Small().double(), torch.randn(1, 3, 8, 8, dtype=torch.float64))
    assert model.u.dtype == torch.float64
    assert model.soft_flops().dtype == torch.float64
