"""s2h.convert beyond the zoo: concat consumers, flatten, ignored layers, clear errors, modes, API."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import s2h
from s2h.structured.report import report_of
from s2h_kernels import reference
from s2h_reference import CatNet, macs, plain_copy, random_u, randomize_norms, tp_prune


pytestmark = pytest.mark.usefixtures("one_thread")


def test_concat_consumer_takes_offset_ranges():
    torch.manual_seed(0)
    net = randomize_norms(CatNet()).eval()
    x = torch.randn(3, 3, 8, 8)
    model = s2h.convert(net, x[:1]).eval()
    assert [(g.name, g.channels) for g in model.groups] == [("a", 6), ("b", 5), ("c", 7)]
    with torch.no_grad():
        model.u.copy_(torch.linspace(-2, 2, model.u.numel()))
    keep = model.keep_counts()
    assert keep["a"] < 6 and keep["b"] < 5 and keep["c"] < 7
    c_in = model.model.c.in_spec
    assert [(s.start, s.channels) for s in c_in.segments] == [(0, 6), (6, 5)]  # b's prefix starts at 6
    assert model.model.fc.in_spec.segments[0].repeat == 16  # each channel is 4x4 features
    pruned = tp_prune(plain_copy(model, "hard").eval(), x[:1], keep, {g.name: g.channels for g in model.groups})
    with torch.no_grad(), model.branch("hard"):
        yh = model(x)
        torch.testing.assert_close(yh, pruned(x), rtol=1e-5, atol=1e-5)
        ys, yh2 = model.forward_pair(x)
        torch.testing.assert_close(yh2, yh)
    exported = model.export().eval()
    assert exported.c.in_channels == keep["a"] + keep["b"] and exported.bn_cat.num_features == keep["a"] + keep["b"]
    assert exported.fc.in_features == keep["c"] * 16
    with torch.no_grad():
        torch.testing.assert_close(exported(x), yh, rtol=0, atol=1e-5)
    assert model.hard_flops() == pytest.approx(macs(exported, x[:1]), rel=1e-6)
    assert model.dense_flops() == pytest.approx(macs(net, x[:1]), rel=1e-6)


def test_concat_binary_soft_equals_hard_in_training():
    torch.manual_seed(0)
    net = CatNet()
    x = torch.randn(4, 3, 8, 8)
    model = s2h.convert(net, x[:1]).train()
    with torch.no_grad():
        model.u.fill_(-40.0)
        offs = model.group_offsets.tolist()
        for gi, j in enumerate([3, 2, 4]):
            model.u[offs[gi] + j - 1] = 40.0
    assert list(model.keep_counts().values()) == [3, 2, 4]
    with model.branch("soft"):
        ys = model(x)
    with model.branch("hard"):
        yh = model(x)
    torch.testing.assert_close(ys, yh, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ what gets pruned


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_input_and_output_stay_unpruned():
    x = torch.randn(2, 3, 8, 8)
    model = s2h.convert(Small(), x[:1])
    assert [g.name for g in model.groups] == ["conv1", "conv2"]
    with torch.no_grad():
        model.u.fill_(0.0)
        model.u[0] = 30.0  # conv1 keeps one channel
    with model.branch("hard"):
        y = model(x)
    assert y.shape == (2, 4)
    assert model.keep_counts()["conv1"] == 1
    e = model.export()
    assert e.conv1.in_channels == 3 and e.fc.out_features == 4 and e.conv1.out_channels == 1


@pytest.mark.parametrize("ignored", [["conv2"], "module"])
def test_ignored_layers(ignored):
    net = Small()
    if ignored == "module":
        ignored = [net.conv2]
    model = s2h.convert(net, torch.randn(1, 3, 8, 8), ignored_layers=ignored)
    assert [g.name for g in model.groups] == ["conv1"]
    assert model.config["ignored_layers"] == ["conv2"]


def test_original_model_untouched_unless_inplace():
    net = randomize_norms(Small())
    before = {k: v.clone() for k, v in net.state_dict().items()}
    s2h.convert(net, torch.randn(1, 3, 8, 8))
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert type(net.conv1) is nn.Conv2d
    model = s2h.convert(net, torch.randn(1, 3, 8, 8), inplace=True)
    assert model.model is net and isinstance(net.conv1, s2h.S2HConv2d)


def test_reorder_sorts_by_l1_importance():
    torch.manual_seed(0)
    net = randomize_norms(Small()).eval()
    x = torch.randn(2, 3, 8, 8)
    model = s2h.convert(net, x[:1]).eval()
    for name in ("conv1", "conv2"):  # each group has one producer: its filters' L1 norms descend
        l1 = getattr(model.model, name).weight.detach().abs().sum((1, 2, 3))
        assert torch.all(l1[:-1] >= l1[1:])
        ref = torch.sort(getattr(net, name).weight.detach().abs().sum((1, 2, 3)), descending=True).values
        torch.testing.assert_close(l1, ref)
    with torch.no_grad(), model.branch("dense"):
        torch.testing.assert_close(model(x), net(x), rtol=1e-5, atol=1e-5)
    unordered = s2h.convert(net, x[:1], reorder=False)
    torch.testing.assert_close(unordered.model.conv1.weight, net.conv1.weight)


def test_modes_and_requires_grad_restored():
    net = Small().train()
    net.bn1.eval()
    net.conv1.weight.requires_grad_(False)
    model = s2h.convert(net, torch.randn(1, 3, 8, 8), inplace=True)
    assert net.training and model.training and not net.bn1.training and net.bn2.training
    assert not net.conv1.weight.requires_grad and net.conv2.weight.requires_grad
    net2 = Small().eval()
    model2 = s2h.convert(net2, torch.randn(1, 3, 8, 8))
    assert not model2.training and not any(m.training for m in model2.model.modules())


# ------------------------------------------------------------------------------ divisor, hard width, API


def test_divisor_and_hard_width():
    x = torch.randn(1, 3, 32, 32)
    model = s2h.convert(s2h.models.resnet56(), x, divisor=4)
    assert all(g.divisor == 4 and g.buckets == g.channels // 4 for g in model.groups)
    assert model.u.numel() == sum(g.channels // 4 for g in model.groups)
    random_u(model, seed=0)
    assert all(k % 4 == 0 and k >= 4 for k in model.keep_counts().values())
    odd = s2h.convert(CatNet(), torch.randn(1, 3, 8, 8), divisor=4)  # 6, 5, 7 channels
    assert [g.divisor for g in odd.groups] == [2, 1, 1]
    for hw in ("threshold", "expected"):
        m = s2h.convert(Small(), torch.randn(1, 3, 8, 8), hard_width=hw)
        random_u(m, seed=2)
        _, e, k = reference.channel_masks(m.u.detach(), m.group_offsets.tolist(), 1.0, None, hw)
        assert list(m.keep_counts().values()) == k.tolist()
        assert list(m.expected_widths().values()) == pytest.approx(e.tolist())


def test_api_surface():
    net = Small()
    model = s2h.convert(net, torch.randn(1, 3, 8, 8), target_flops=0.3, temperature=0.5)
    assert model.target_flops == 0.3 and model.temperature == 0.5
    assert model.mask_parameters() == [model.u]
    wp = model.weight_parameters()
    assert all(p is not model.u for p in wp)
    assert len(wp) + 1 == len(list(model.parameters()))
    assert model.group_offsets.dtype == torch.int64 and model.group_offsets.tolist() == [0, 8, 20]
    assert [(g.name, g.channels, g.buckets) for g in model.groups] == [("conv1", 8, 8), ("conv2", 12, 12)]
    assert model.model.conv1.mask_group == "conv1"
    assert set(model.keep_counts()) == {"conv1", "conv2"}
    assert "u" in model.state_dict()


# ------------------------------------------------------------------------------ errors


def test_bad_arguments():
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="target_flops"):
        s2h.convert(Small(), x, target_flops=1.5)
    with pytest.raises(ValueError, match="target_flops"):
        s2h.convert(Small(), x, target_flops=0)
    with pytest.raises(ValueError, match="divisor"):
        s2h.convert(Small(), x, divisor=0)
    with pytest.raises(ValueError, match="temperature"):
        s2h.convert(Small(), x, temperature=-1.0)
    with pytest.raises(ValueError, match="hard_width"):
        s2h.convert(Small(), x, hard_width="median")
    with pytest.raises(TypeError, match="example_inputs"):
        s2h.convert(Small(), [1, 2])
    with pytest.raises(TypeError, match="nn.Module"):
        s2h.convert(lambda t: t, x)
    with pytest.raises(ValueError, match="'conv9', which is not a submodule"):
        s2h.convert(Small(), x, ignored_layers=["conv9"])
    with pytest.raises(ValueError, match="not part of the model"):
        s2h.convert(Small(), x, ignored_layers=[nn.Conv2d(1, 1, 1)])


class WithGroupNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.gn = nn.GroupNorm(2, 8)
        self.conv2 = nn.Conv2d(8, 4, 3)

    def forward(self, x):
        return self.conv2(self.gn(self.conv1(x)))


class WithGroupedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.gconv = nn.Conv2d(8, 8, 3, groups=2)
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.conv2(self.gconv(self.conv1(x)))


class WithSplit(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.conv3 = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        a, b = self.conv1(x).chunk(2, dim=1)
        return self.conv3(self.conv2(a) + b)


class WithLayerScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.gamma = nn.Parameter(torch.ones(8))
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.conv2(self.conv1(x) * self.gamma.view(1, -1, 1, 1))


class WithConv1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(3, 8, 3)
        self.conv2 = nn.Conv1d(8, 4, 3)

    def forward(self, x):
        return self.conv2(self.conv1(x))


@pytest.mark.parametrize(
    "net,x,match",
    [
        (WithGroupNorm(), torch.randn(1, 3, 8, 8), r"module 'gn' \(GroupNorm\).*rooted at 'conv1'.*ignored_layers"),
        (WithSplit(), torch.randn(1, 3, 8, 8), r"rooted at 'conv[12]'.*split of the channel dimension"),
        (WithLayerScale(), torch.randn(1, 3, 8, 8), r"'gamma'.*nn.Parameter"),
        (WithConv1d(), torch.randn(1, 3, 8), r"module 'conv1' \(Conv1d\).*no S2H replacement"),
    ],
)
def test_unsupported_layers_are_named(net, x, match):
    with pytest.raises(ValueError, match=match):
        s2h.convert(net, x, strict=True)
    # by default the group is left dense and reported, with the same reason
    model = s2h.convert(net, x)
    kept = report_of(model).kept
    assert kept and all(not r.pruned for r in kept)
    assert not any(g.name == kept[0].root for g in model.groups)
    with torch.no_grad(), model.branch("hard"):
        torch.testing.assert_close(model(x), net(x))


def test_unsupported_group_can_be_ignored():
    x = torch.randn(1, 3, 8, 8)
    model = s2h.convert(WithGroupNorm(), x, ignored_layers=["conv1"])
    assert model.groups == []
    with torch.no_grad(), model.branch("hard"):
        assert model(x).shape == (1, 4, 4, 4)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = NumpyHead()

    def forward(self, x):
        return self.head(self.conv(x))


class NumpyHead(nn.Module):
    def forward(self, x):
        return torch.from_numpy(x.numpy())  # breaks the autograd graph (and fails with grad on)


class HardCodedView(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 8 * 8, 2)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).view(x.shape[0], 6 * 8 * 8))


def test_untraceable_model_error_names_the_module():
    with pytest.raises(RuntimeError, match=r"tracing with Torch-Pruning failed in module 'head' \(NumpyHead\)"):
        s2h.convert(Untraceable(), torch.randn(1, 3, 8, 8))


def test_model_that_cannot_run_narrower_is_refused():
    with pytest.raises(RuntimeError, match=r"hard-branch forward .* failed in module '<root>' \(HardCodedView\)"):
        s2h.convert(HardCodedView(), torch.randn(1, 3, 8, 8))
