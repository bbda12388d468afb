"""S2H layers: what the hard branch, the paired forward and the exported model buy, against eager PyTorch.

Groups (the test with "eager" in its name is each group's baseline; ratios: benchmarks/report.py):
* hard-branch forward+backward (sliced weights) vs the literal algorithm's masked full-width
  compute (the dense network with 0/1 channel masks after every norm), ResNet-56 at 15% FLOPs;
* paired forward vs two separate calls, for one S2HLinear layer and for the whole ResNet-56;
* exported-model inference vs the dense model at 15% FLOPs (ResNet-56 at 32x32, ResNet-50 at 64x64).
Every test also checks that its result equals the baseline's.

    pytest benchmarks/test_bench_layers.py --benchmark-only --benchmark-json=benchmarks/results/layers_cpu.json
"""
import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import s2h
from bench_common import widths_at

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
TARGET = 0.15


def plain_masked(model):
    """The dense network in plain nn layers, with 0/1 masks multiplied in after every masked point.

    This is the literal algorithm's hard network: full-width compute, pruned channels zeroed.
    """
    keep = model.ensure_masks(grad=False).keep_list
    net = copy.deepcopy(model.model)
    hooks = []
    for name, m in list(net.named_modules()):
        if not isinstance(m, s2h.structured.S2H_LAYER_TYPES):
            continue
        mask = None
        spec = m.out_spec
        is_norm = isinstance(m, (s2h.S2HBatchNorm2d, s2h.S2HBatchNorm1d, s2h.S2HLayerNorm))
        if spec is not None and (is_norm or m.soft_out):
            mask = torch.ones(spec.size)
            for s in spec.segments:
                mask[s.start + keep[s.group] * s.repeat : s.stop] = 0
        if isinstance(m, s2h.S2HConv2d):
            p = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                          m.bias is not None)
        elif isinstance(m, s2h.S2HLinear):
            p = nn.Linear(m.in_features, m.out_features, m.bias is not None)
        elif isinstance(m, s2h.S2HBatchNorm2d):
            p = nn.BatchNorm2d(m.num_features)
        else:
            continue
        p.load_state_dict({k: v for k, v in m.state_dict().items() if not k.endswith(("_soft", "_hard"))})
        p.train(m.training)
        if mask is not None:
            shape = (1, -1, 1, 1) if isinstance(m, (s2h.S2HConv2d, s2h.S2HBatchNorm2d)) else (1, -1)
            mk = mask.view(shape)
            hooks.append(p.register_forward_hook(lambda mod, i, o, mk=mk: o * mk.to(o.device)))
        parent, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, child, p)
    return net


def train_step(net, x, y):
    for p in net.parameters():
        p.grad = None
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    return loss.detach()


TRAIN_CASES = {}


def train_case(name):
    """(converted model with 0/1 masks at ~15% FLOPs, FLOPs ratio, batch x, labels y)."""
    if name not in TRAIN_CASES:
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        if name == "resnet56":
            net, x = s2h.models.resnet56(num_classes=100), torch.randn(32, 3, 32, 32, generator=g)
        else:
            net, x = torchvision.models.resnet50(num_classes=100), torch.randn(16, 3, 64, 64, generator=g)
        model = s2h.convert(net, x[:1])
        ratio = widths_at(model)
        TRAIN_CASES[name] = (model, ratio, x, torch.randint(0, 100, (x.shape[0],), generator=g))
    return TRAIN_CASES[name]


@pytest.fixture(scope="module")
def resnet56_15():
    model, ratio, _, _ = train_case("resnet56")
    return model, ratio


# ------------------------------------------------------------------ hard branch vs masked full width


def _batch(device, n=32, classes=100):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, 3, 32, 32, generator=g).to(device), torch.randint(0, classes, (n,), generator=g).to(device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["resnet56", "resnet50"])
def test_hard_step_eager_masked_full_width(benchmark, name, device):
    model, ratio, x, y = train_case(name)
    net = plain_masked(model.train()).to(device)
    x, y = x.to(device), y.to(device)
    benchmark.group = f"{name} train step fwd+bwd, hard at {ratio:.1%} FLOPs, batch {x.shape[0]}, {device}"
    loss = benchmark(train_step, net, x, y)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["resnet56", "resnet50"])
def test_hard_step_sliced(benchmark, name, device):
    model, ratio, x, y = train_case(name)
    m = copy.deepcopy(model).train().to(device)
    x, y = x.to(device), y.to(device)
    benchmark.group = f"{name} train step fwd+bwd, hard at {ratio:.1%} FLOPs, batch {x.shape[0]}, {device}"

    def step():
        with m.branch("hard"):
            return train_step(m, x, y)

    loss = benchmark(step)
    # same batch, fresh copies: masked full width and the sliced hard branch compute the same loss
    ref = train_step(plain_masked(copy.deepcopy(model).train()).to(device), x, y)
    hard = copy.deepcopy(model).train().to(device)
    with hard.branch("hard"):
        got = train_step(hard, x, y)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(loss)


# ------------------------------------------------------------------ paired forward vs two calls


@pytest.fixture(scope="module")
def linear_layer():
    torch.manual_seed(0)

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(1024, 1024)
            self.fc2 = nn.Linear(1024, 1024)
            self.head = nn.Linear(1024, 10)

        def forward(self, x):
            return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))

    model = s2h.convert(MLP(), torch.randn(1, 1024))
    widths_at(model)
    return model


@pytest.mark.parametrize("device", DEVICES)
def test_pair_linear_eager_two_calls(benchmark, linear_layer, device):
    model = copy.deepcopy(linear_layer).eval().to(device)
    model.update_masks()
    layer = model.model.fc2
    kin = model.keep_counts()["fc1"]
    xs, xh = torch.randn(256, 1024, device=device), torch.randn(256, kin, device=device)
    benchmark.group = f"paired forward, S2HLinear 1024x1024 (hard {model.keep_counts()['fc2']}x{kin}), batch 256, {device}"

    def two_calls():  # the layer's soft branch, then its hard branch
        with torch.no_grad():
            with model.branch("soft"):
                ys = layer(xs)
            with model.branch("hard"):
                yh = layer(xh)
        return ys, yh

    ys, yh = benchmark(two_calls)
    assert yh.shape == (256, model.keep_counts()["fc2"])


@pytest.mark.parametrize("device", DEVICES)
def test_pair_linear_forward_pair(benchmark, linear_layer, device):
    model = copy.deepcopy(linear_layer).eval().to(device)
    model.update_masks()
    layer = model.model.fc2
    kin = model.keep_counts()["fc1"]
    xs, xh = torch.randn(256, 1024, device=device), torch.randn(256, kin, device=device)
    benchmark.group = f"paired forward, S2HLinear 1024x1024 (hard {model.keep_counts()['fc2']}x{kin}), batch 256, {device}"

    def pair():
        with torch.no_grad():
            return layer.forward_pair(xs, xh)

    ys, yh = benchmark(pair)
    with torch.no_grad():
        with model.branch("soft"):
            rs = layer(xs)
        with model.branch("hard"):
            rh = layer(xh)
    torch.testing.assert_close(ys, rs, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(yh, rh, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_pair_model_eager_two_calls(benchmark, resnet56_15, device):
    model, ratio = resnet56_15
    m = copy.deepcopy(model).eval().to(device)
    x, _ = _batch(device)
    benchmark.group = f"paired forward, resnet56 (hard at {ratio:.1%} FLOPs), batch 32, {device}"

    def two_calls():
        with torch.no_grad():
            with m.branch("soft"):
                ys = m(x)
            with m.branch("hard"):
                yh = m(x)
        return ys, yh

    ys, yh = benchmark(two_calls)
    assert ys.shape == yh.shape == (32, 100)


@pytest.mark.parametrize("device", DEVICES)
def test_pair_model_forward_pair(benchmark, resnet56_15, device):
    model, ratio = resnet56_15
    m = copy.deepcopy(model).eval().to(device)
    x, _ = _batch(device)
    benchmark.group = f"paired forward, resnet56 (hard at {ratio:.1%} FLOPs), batch 32, {device}"

    def pair():
        with torch.no_grad():
            return m.forward_pair(x)

    ys, yh = benchmark(pair)
    assert m.pair_mode == "graph"
    with torch.no_grad():
        with m.branch("soft"):
            torch.testing.assert_close(ys, m(x), rtol=1e-4, atol=1e-4)
        with m.branch("hard"):
            torch.testing.assert_close(yh, m(x), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ exported vs dense inference


def _exported_case(name):
    torch.manual_seed(0)
    if name == "resnet56":
        net, x = s2h.models.resnet56(), torch.randn(32, 3, 32, 32)
    else:
        net, x = torchvision.models.resnet50(), torch.randn(8, 3, 64, 64)
    net.eval()
    model = s2h.convert(net, x[:1])
    ratio = widths_at(model)
    return net, model.eval(), model.export().eval(), x, ratio


EXPORT_CASES = {}


def exported_case(name):
    if name not in EXPORT_CASES:
        EXPORT_CASES[name] = _exported_case(name)
    return EXPORT_CASES[name]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["resnet56", "resnet50"])
def test_infer_eager_dense(benchmark, name, device):
    net, model, exported, x, ratio = exported_case(name)
    net, x = copy.deepcopy(net).to(device), x.to(device)
    benchmark.group = f"inference {name} batch {x.shape[0]}, exported at {ratio:.1%} FLOPs, {device}"
    with torch.no_grad():
        y = benchmark(net, x)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["resnet56", "resnet50"])
def test_infer_exported(benchmark, name, device):
    net, model, exported, x, ratio = exported_case(name)
    exported, x = copy.deepcopy(exported).to(device), x.to(device)
    benchmark.group = f"inference {name} batch {x.shape[0]}, exported at {ratio:.1%} FLOPs, {device}"
    with torch.no_grad():
        y = benchmark(exported, x)
        ref_model = copy.deepcopy(model).to(device)
        with ref_model.branch("hard"):
            ref = ref_model(x)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4 * max(1.0, float(ref.abs().max())))
