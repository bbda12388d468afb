"""The models users bring (timm and torchvision: grouped convolutions, ConvNeXt, ViT, MobileViT) convert with
no arguments, train a few steps, and export to a smaller model equal to the hard branch, whose MACs
FlopCounterMode counts as ``hard_flops()``. Small inputs; nothing is downloaded (pretrained=False)."""
import warnings

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import s2h
from s2h.structured.report import report_of

timm = pytest.importorskip("timm")

pytestmark = pytest.mark.usefixtures("one_thread")


def fcm_macs(model: nn.Module, x: torch.Tensor) -> float:
    """MACs per sample by FlopCounterMode; timm's fused attention off (FlopCounterMode skips SDPA on the CPU)."""
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops() / 2 / x.shape[0]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def timm_model(name, size):
    kwargs = {"img_size": size} if ("vit" in name and "mobilevit" not in name) or "deit" in name else {}
    return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)


MODELS = [
    # (id, builder, input size, slow)
    ("timm:resnet50", lambda: timm_model("resnet50", 32), 32, True),
    ("timm:efficientnet_b0", lambda: timm_model("efficientnet_b0", 32), 32, False),
    ("timm:convnext_nano", lambda: timm_model("convnext_nano", 32), 32, False),
    ("timm:regnety_004", lambda: timm_model("regnety_004", 32), 32, False),
    ("timm:vit_tiny_patch16_224", lambda: timm_model("vit_tiny_patch16_224", 32), 32, False),
    ("timm:deit_tiny_patch16_224", lambda: timm_model("deit_tiny_patch16_224", 32), 32, True),
    ("timm:mobilevitv2_050", lambda: timm_model("mobilevitv2_050", 64), 64, False),
    ("tv:resnext50_32x4d", lambda: torchvision.models.resnext50_32x4d(num_classes=10), 32, True),
    ("tv:regnet_y_400mf", lambda: torchvision.models.regnet_y_400mf(num_classes=10), 32, False),
    ("tv:convnext_tiny", lambda: torchvision.models.convnext_tiny(num_classes=10), 32, True),
]


@pytest.mark.parametrize("build,size", [
    pytest.param(b, s, id=i, marks=[pytest.mark.slow] if slow else []) for i, b, s, slow in MODELS])
def test_converts_with_defaults_trains_and_exports(build, size):
    torch.manual_seed(0)
    net = build()
    # Batch 8: with 2 images, BatchNorm at 1x1 spatial size normalises over 2 values and one SGD step
    # sends ResNeXt-50's first conv from 0.1 to 1e4 (eval-mode activations then overflow to NaN).
    x = torch.randn(8, 3, size, size)
    y = torch.arange(8)
    dense_macs = fcm_macs(net.eval(), x)
    dense_params = n_params(net)
    net.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the default target (15%) is reachable: no warning
        model = s2h.convert(net, x)
    report = report_of(model)
    assert report.min_fraction <= 0.30, str(report)
    assert model.dense_flops() == pytest.approx(dense_macs, rel=1e-6)  # the whole model's FLOPs
    trainer = s2h.S2HPruner(model, torch.optim.SGD(model.weight_parameters(), lr=1e-3))
    for _ in range(2):
        trainer.step(x, y)
    model.eval()
    with torch.no_grad(), model.branch("hard"):
        yh = model(x)
    small = model.export().eval()
    with torch.no_grad():
        ye = small(x)
    torch.testing.assert_close(ye, yh, rtol=1e-4, atol=1e-4)
    assert fcm_macs(small, x) == pytest.approx(model.hard_flops(), rel=1e-6)
    assert model.hard_flops() < dense_macs
    assert n_params(small) < dense_params


def test_grouped_conv_keeps_the_same_channels_in_every_group():
    """The hard network of a grouped conv equals the dense network with the dropped channels zeroed."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1, groups=2), nn.ReLU(),
                        nn.Conv2d(12, 4, 1))
    x = torch.randn(2, 3, 8, 8)
    model = s2h.convert(net, x, reorder=False)
    assert [(g.name, g.channels) for g in model.groups] == [("0", 4), ("2", 6)]  # 8 / 2 groups, 12 / 2 groups
    small = model.export(widths={"0": 3, "2": 2})
    g = small[2]
    assert (g.groups, g.in_channels, g.out_channels) == (2, 6, 4)
    keep1 = torch.tensor([0, 1, 2, 4, 5, 6])  # first 3 of each group of 4
    keep2 = torch.tensor([0, 1, 6, 7])  # first 2 of each group of 6
    with torch.no_grad():
        w0, b0 = torch.zeros_like(net[0].weight), torch.zeros_like(net[0].bias)
        w0[keep1], b0[keep1] = net[0].weight[keep1], net[0].bias[keep1]
        w2, b2 = torch.zeros_like(net[2].weight), torch.zeros_like(net[2].bias)
        w2[keep2], b2[keep2] = net[2].weight[keep2], net[2].bias[keep2]
        h = torch.relu(nn.functional.conv2d(x, w0, b0, padding=1))
        h = torch.relu(nn.functional.conv2d(h, w2, b2, padding=1, groups=2))
        expected = net[4](h)
        torch.testing.assert_close(small(x), expected)
    # FLOPs of the grouped conv follow both widths
    assert fcm_macs(small, x) == pytest.approx(float(model.flops(torch.tensor([3.0, 2.0]))), rel=1e-9)


def test_layer_norm_2d_group_and_timm_layers_export_as_the_users_classes():
    from torchvision.models.convnext import LayerNorm2d

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), LayerNorm2d(8), nn.Conv2d(8, 6, 1),
                        timm.layers.BatchNormAct2d(6, act_layer=nn.SiLU), nn.Conv2d(6, 4, 1))
    x = torch.randn(2, 3, 8, 8)
    model = s2h.convert(net, x)
    assert len(model.groups) == 2
    with torch.no_grad():
        model.u.uniform_(-2, 2)
    model.eval()
    small = model.export(widths=[5, 3])
    assert type(small[1]) is LayerNorm2d and small[1].normalized_shape == (5,)
    assert type(small[3]) is timm.layers.BatchNormAct2d and isinstance(small[3].act, nn.SiLU)
    with torch.no_grad():
        with model.branch("hard"):
            yh = model(x)
        torch.testing.assert_close(model.export()(x), yh)
        full = model.export(widths=[8, 6]).eval()
        torch.testing.assert_close(full(x), net.eval()(x), rtol=1e-5, atol=1e-5)  # reordered, same function


def test_report_strict_and_unreachable_target():
    net = torchvision.models.convnext_tiny(num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"layer_scale.*nn.Parameter.*strict=False"):
        s2h.convert(net, x, strict=True)
    with pytest.warns(UserWarning, match=r"target_flops=0.01 is not reachable.*lowest FLOPs is \d+\.\d%"):
        model = s2h.convert(net, x, target_flops=0.01)
    report = report_of(model)
    kept = {r.root: r for r in report.kept}
    assert set(kept) == {"features.0.0", "features.2.1", "features.4.1", "features.6.1"}  # residual streams
    assert all("layer_scale" in r.reason for r in kept.values())
    text = str(report)
    assert "features.4.1" in text and "kept" in text and "pruned" in text
    assert report.to_markdown().count("\n| ") == len(report.rows) + 1
    # the share of FLOPs in pruned groups and the lowest reachable fraction are consistent
    assert 0.5 < report.prunable_share <= 1.0 and 0.0 < report.min_fraction < 0.3


def test_input_checks():
    class TwoOutputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3)

        def forward(self, x):
            h = self.conv1(x)
            return self.conv2(h), h

    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(TypeError, match=r"returns a tuple.*SelectOutput\(model, 0\)"):
        s2h.convert(TwoOutputs(), x)
    model = s2h.convert(s2h.models.SelectOutput(TwoOutputs(), 0), x)
    assert [g.name for g in model.groups] == ["model.conv1"]
    # a string is one layer name, not its characters
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 1))
    model = s2h.convert(net, x, ignored_layers="2")
    assert [g.name for g in model.groups] == ["0"]
    assert model.config["ignored_layers"] == ["2"]


def test_build_model_timm():
    net = s2h.models.build_model("timm:vit_tiny_patch16_224", num_classes=7, in_channels=1, image_size=32)
    assert net(torch.randn(1, 1, 32, 32)).shape == (1, 7)
    with pytest.raises(ValueError, match="unknown timm model"):
        s2h.models.build_model("timm:no_such_model", num_classes=7)
