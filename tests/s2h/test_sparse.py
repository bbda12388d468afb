"""s2h.sparse: sparse Linear / Conv2d modules and sparsify (DESIGN §4)."""
import logging

import pytest
import torch
import torchvision
from torch import nn

from s2h.sparse import AutoSparse, FastMaxPool2d, SparseConv2d, SparseLinear, sparsify


def prune_(module: nn.Module, sparsity: float) -> None:
    """Per-layer magnitude pruning of every Conv2d / Linear weight, in place."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                w = m.weight
                k = int(w.numel() * sparsity)
                if k > 0:
                    thr = w.abs().flatten().kthvalue(k).values
                    w.mul_(w.abs() > thr)


@pytest.mark.parametrize("batch_shape", [(), (1,), (5,), (2, 3)])
def test_sparse_linear_matches_linear(batch_shape):
    torch.manual_seed(0)
    lin = nn.Linear(37, 23)
    prune_(lin, 0.8)
    sl = SparseLinear.from_dense(lin)
    x = torch.randn(*batch_shape, 37)
    with torch.no_grad():
        torch.testing.assert_close(sl(x), lin(x), rtol=1e-5, atol=1e-5)
    assert 0.75 < sl.sparsity < 0.85


CONVS = [
    dict(in_channels=8, out_channels=12, kernel_size=3, stride=1, padding=1),
    dict(in_channels=8, out_channels=12, kernel_size=3, stride=2, padding=1, bias=False),
    dict(in_channels=8, out_channels=8, kernel_size=3, stride=1, padding=2, dilation=2, groups=4),
    dict(in_channels=6, out_channels=9, kernel_size=(1, 3), stride=(2, 1), padding=(0, 1), groups=3),
    dict(in_channels=16, out_channels=32, kernel_size=1),
    dict(in_channels=16, out_channels=32, kernel_size=1, stride=2, bias=False),
    dict(in_channels=4, out_channels=4, kernel_size=3, padding="same"),
    dict(in_channels=4, out_channels=6, kernel_size=5, stride=3, padding="valid"),
]


@pytest.mark.parametrize("cfg", CONVS)
def test_sparse_conv_matches_conv(cfg):
    torch.manual_seed(0)
    conv = nn.Conv2d(**cfg)
    prune_(conv, 0.7)
    sc = SparseConv2d.from_dense(conv)
    x = torch.randn(2, cfg["in_channels"], 13, 11)
    with torch.no_grad():
        torch.testing.assert_close(sc(x), conv(x), rtol=1e-4, atol=1e-5)


def test_modules_move_and_save(tmp_path):
    conv = nn.Conv2d(4, 6, 3, padding=1)
    prune_(conv, 0.5)
    sc = SparseConv2d.from_dense(conv).double()
    assert sc.values.dtype == torch.float64 and sc.col_idx.dtype == torch.int32
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(sc(x), conv.double()(x))
    torch.save(sc.state_dict(), tmp_path / "sc.pt")
    again = SparseConv2d.from_dense(conv)
    again.load_state_dict(torch.load(tmp_path / "sc.pt"))
    assert torch.equal(again.values, sc.values)


def test_bad_modules():
    with pytest.raises(ValueError, match="padding_mode"):
        SparseConv2d.from_dense(nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="nn.Linear"):
        SparseLinear.from_dense(nn.Conv2d(3, 3, 3))
    sl = SparseLinear.from_dense(nn.Linear(5, 3))
    with pytest.raises(ValueError, match="features"):
        sl(torch.randn(2, 4))
    with pytest.raises(RuntimeError, match="inference only"):
        sl(torch.randn(2, 5, requires_grad=True))


def pruned_resnet18(sparsity=0.9):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=100).eval()
    # Non-trivial BN statistics, so that the comparison is not dominated by tiny activations.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    prune_(model, sparsity)
    return model


def test_resnet18_90_matches_masked_dense():
    """The issue's acceptance check: sparsified resnet18 at 90% vs its masked dense version."""
    model = pruned_resnet18(0.9)
    sparse = sparsify(model, calibrate=False)
    n_sparse = sum(isinstance(m, (SparseConv2d, SparseLinear)) for m in sparse.modules())
    assert n_sparse == 21   # 20 convs + fc
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        out = sparse(x)        # runs without no_grad too: parameters are frozen
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)
    assert ref.abs().max() > 1e-2
    out2 = sparse(x)
    torch.testing.assert_close(out2, ref, rtol=0, atol=1e-4)
    # the original model is untouched (a copy was converted)
    assert not any(isinstance(m, SparseConv2d) for m in model.modules())


def test_sparsify_calibrates_and_logs(caplog):
    model = pruned_resnet18(0.9)
    with torch.no_grad():          # a dense first conv: below min_sparsity, stays dense untimed
        model.conv1.weight.normal_()
    report = []
    with caplog.at_level(logging.INFO, logger="s2h.sparse"):
        sparse = sparsify(model, min_sparsity=0.5, example_inputs=torch.randn(1, 3, 64, 64), reps=2, report=report)
    names = {r["name"]: r for r in report}
    assert names["conv1"]["choice"].startswith("dense")
    timed = [r for r in report if "dense_ms" in r]
    assert len(timed) == 20 and all(r["choice"] in ("sparse", "dense") for r in timed)
    guard = names["<model>"]
    assert guard["kind"] == "guard" and guard["choice"] in ("sparsified", "dense, rewritten", "as given")
    for r in timed:   # the decision is the measured one: median paired ratio against the 10% margin
        assert (r["choice"] == "sparse") == (r["speedup"] >= 1.1)
        if guard["choice"] == "sparsified":
            got = sparse.get_submodule(r["name"])
            assert isinstance(got, (SparseConv2d, SparseLinear)) == (r["choice"] == "sparse")
    assert any("layer1.0.conv1" in rec.getMessage() and "ms" in rec.getMessage() for rec in caplog.records)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), model(x), rtol=0, atol=1e-4)


def test_sparsify_without_example_inputs_defers_conv_decisions():
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 10))
    prune_(model, 0.9)
    report = []
    sparse = sparsify(model, reps=2, report=report)
    assert isinstance(sparse[0], AutoSparse)
    assert len(report) == 1 and report[0]["input_shape"] == (1, 1024)     # Linear timed at batch 1
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), model(x), rtol=1e-4, atol=1e-5)
    assert list(sparse[0].choices) == [(2, 8, 8, 8)]
    assert len(report) == 2


def test_sparsify_respects_min_sparsity_and_exclude():
    model = nn.Sequential(nn.Linear(20, 20), nn.Linear(20, 20), nn.Linear(20, 5))
    prune_(model[0], 0.3)
    prune_(model[1], 0.9)
    prune_(model[2], 0.9)
    sparse = sparsify(model, min_sparsity=0.5, calibrate=False, exclude=["2"])
    assert isinstance(sparse[0], nn.Linear) and isinstance(sparse[1], SparseLinear)
    assert isinstance(sparse[2], nn.Linear)
    with pytest.raises(ValueError, match="min_sparsity"):
        sparsify(model, min_sparsity=1.5)


@pytest.mark.parametrize("cfg", [dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=2),
                                 dict(kernel_size=3, stride=2, ceil_mode=True), dict(kernel_size=(3, 2), stride=(1, 2))])
def test_fast_maxpool_matches(cfg):
    pool = nn.MaxPool2d(**cfg)
    fast = FastMaxPool2d.from_module(pool)
    x = torch.randn(2, 5, 13, 11)
    with torch.no_grad():
        assert torch.equal(fast(x), pool(x))
    assert torch.equal(fast(x.double()), pool(x.double()))   # fallback path


class ConvBnRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = self.pool(self.relu(self.bn(self.conv(x))))
        return torch.relu(self.fc(x.flatten(1)))


def test_fuse_folds_batchnorm_and_relu():
    torch.manual_seed(0)
    model = ConvBnRelu().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
        model.bn.weight.uniform_(0.5, 1.5)
    prune_(model, 0.8)
    sparse = sparsify(model, calibrate=False)
    assert isinstance(sparse, torch.fx.GraphModule)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in sparse.modules())
    assert isinstance(sparse.conv, SparseConv2d) and sparse.conv.relu and sparse.conv.bias is not None
    assert isinstance(sparse.fc, SparseLinear) and sparse.fc.relu
    assert isinstance(sparse.pool, FastMaxPool2d)
    x = torch.randn(3, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), model(x), rtol=1e-4, atol=1e-5)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > 0:   # data-dependent control flow: torch.fx cannot trace this
            x = -x
        return self.bn(self.conv(x))


def test_fuse_falls_back_for_untraceable_and_training_models():
    model = Untraceable().eval()
    prune_(model, 0.9)
    sparse = sparsify(model, calibrate=False)
    assert isinstance(sparse.conv, SparseConv2d) and isinstance(sparse.bn, nn.BatchNorm2d)
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), model(x), rtol=1e-5, atol=1e-6)
    train = ConvBnRelu().train()
    prune_(train, 0.9)
    assert any(isinstance(m, nn.BatchNorm2d) for m in sparsify(train, calibrate=False).modules())


def pruned_linear_pair():
    """A half-pruned nn.Linear(16, 8), its SparseLinear and one input row."""
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    prune_(lin, 0.5)
    return lin, SparseLinear.from_dense(lin), torch.randn(1, 16)


def test_sparse_linear_batch1_follows_replaced_buffers():
    # Batch 1 runs the SELL-16 packing cached on the SparseWeight: replacing any packed buffer
    # (here the column indices, shifted by one: still distinct within each row) must rebuild it.
    lin, sl, x = pruned_linear_pair()
    with torch.no_grad():
        torch.testing.assert_close(sl(x), lin(x), rtol=1e-5, atol=1e-5)
        sl.col_idx = ((sl.col_idx + 1) % 16).to(torch.int32)
        moved = torch.roll(lin.weight, 1, dims=1)  # W'[r, (c + 1) % 16] = W[r, c]
        torch.testing.assert_close(sl(x), x @ moved.t() + lin.bias, rtol=1e-5, atol=1e-5)


def test_sparse_linear_batch1_compiles_fullgraph():
    lin, sl, x = pruned_linear_pair()
    with torch.no_grad():
        compiled = torch.compile(sl, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), lin(x), rtol=1e-5, atol=1e-5)


def test_sparsified_model_compiles_fullgraph():
    torch.manual_seed(0)
    model = ConvBnRelu().eval()
    prune_(model, 0.8)
    sparse = sparsify(model, calibrate=False)
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        compiled = torch.compile(sparse, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), sparse(x))


def test_calibration_timings_are_cached_per_call_unless_a_cache_is_shared():
    from s2h.sparse import CalibrationCache

    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    prune_(model, 0.9)
    x = torch.randn(4, 64)
    cache = CalibrationCache()
    first, again, fresh = [], [], []
    sparsify(model, example_inputs=x, reps=1, report=first, cache=cache)
    assert len(cache) == 2  # the two 64x64 layers share one key; the 10x64 head has its own
    sparsify(model, example_inputs=x, reps=1, report=again, cache=cache)
    timings = lambda rep: [(r["dense_ms"], r["sparse_ms"], r["speedup"]) for r in rep if "dense_ms" in r]  # noqa: E731
    assert timings(again) == timings(first)  # read from the shared cache
    sparsify(model, example_inputs=x, reps=1, report=fresh)  # its own cache: measured anew
    assert timings(fresh) != timings(first) and len(cache) == 2
    with pytest.warns(DeprecationWarning, match="does nothing"):
        from s2h.sparse import clear_calibration_cache

        clear_calibration_cache()
