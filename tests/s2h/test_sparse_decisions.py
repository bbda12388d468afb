"""s2h.sparse: the dense-or-sparse decisions, made deterministic with a fake timer.

The fake timer gives every layer a fixed cost (dense and sparse, per layer) times a machine load
that changes with the call count, so the tests say what the decision logic does under a noisy
machine without depending on this machine's load.  Outputs are checked against F.conv2d on the
pruned dense weights.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from s2h.sparse import SparseConv2d, sparsify
from s2h.sparse.calibration import CalibrationCache, decide_layer, fastest_model, paired_ratio, wall_timer

# (in, out) channels -> (dense cost, sparse cost) in seconds, per call
COSTS = {(8, 16): (1.0, 0.4),     # sparse 2.5x faster: goes sparse
         (16, 24): (1.0, 1.5),    # sparse slower: stays dense
         (24, 32): (1.0, 0.95)}   # sparse 5% faster: inside the 10% margin, stays dense


class FakeTimer:
    """seconds = sum of the layer costs in the module x load(call number)."""

    def __init__(self, load=lambda i: 1.0, sparse_model_penalty=1.0):
        self.calls = 0
        self.load = load
        self.sparse_model_penalty = sparse_model_penalty

    @staticmethod
    def layer_cost(m: nn.Module) -> float:
        if isinstance(m, SparseConv2d):
            return COSTS[(m.in_channels, m.out_channels)][1]
        if isinstance(m, nn.Conv2d):
            return COSTS[(m.in_channels, m.out_channels)][0]
        return 0.0

    def __call__(self, module, args):
        self.calls += 1
        module(*args)  # the module still runs (its output is not used here)
        cost = sum(self.layer_cost(m) for m in module.modules())
        whole = any(isinstance(m, SparseConv2d) for m in module.modules()) and len(list(module.children())) > 0
        return cost * self.load(self.calls) * (self.sparse_model_penalty if whole else 1.0)


def pruned(conv: nn.Conv2d, sparsity: float) -> nn.Conv2d:
    with torch.no_grad():
        w = conv.weight
        thr = w.abs().flatten().kthvalue(int(w.numel() * sparsity)).values
        w.mul_(w.abs() > thr)
    return conv


def three_layer_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(pruned(nn.Conv2d(8, 16, 3, padding=1), 0.9), nn.ReLU(),
                         pruned(nn.Conv2d(16, 24, 3, padding=1), 0.9), nn.ReLU(),
                         pruned(nn.Conv2d(24, 32, 1), 0.9)).eval()


def dense_reference(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The pruned model computed with F.conv2d directly (independent of s2h.sparse)."""
    c0, c2, c4 = model[0], model[2], model[4]
    y = F.relu(F.conv2d(x, c0.weight, c0.bias, padding=1))
    y = F.relu(F.conv2d(y, c2.weight, c2.bias, padding=1))
    return F.conv2d(y, c4.weight, c4.bias)


def kinds(model: nn.Module) -> list[str]:
    return ["sparse" if isinstance(m, SparseConv2d) else "dense" for m in model.modules()
            if isinstance(m, (nn.Conv2d, SparseConv2d))]


@pytest.mark.parametrize("load", [
    lambda i: 1.0,                                   # a quiet machine
    lambda i: 6.0 if 3 <= i <= 9 else 1.0,           # a noisy moment: seven calls 6x slower
    lambda i: 40.0 if i % 5 == 0 else 1.0,           # short spikes on every fifth call
    lambda i: 1.0 + 0.3 * i,                         # the load keeps growing
], ids=["quiet", "burst", "spikes", "ramp"])
def test_layer_decisions_survive_a_noisy_machine(load):
    model = three_layer_model()
    x = torch.randn(2, 8, 6, 6)
    report = []
    out = sparsify(model, example_inputs=x, timer=FakeTimer(load), report=report, guard=False)
    assert kinds(out) == ["sparse", "dense", "dense"]
    speedups = {r["name"]: r["speedup"] for r in report}
    assert speedups["0"] == pytest.approx(2.5, rel=0.1)
    assert speedups["2"] < 1 and speedups["4"] < 1.1
    with torch.no_grad():
        torch.testing.assert_close(out(x), dense_reference(model, x), rtol=1e-4, atol=1e-5)


def test_interleaving_cancels_slow_load_changes():
    """Dense and sparse alternate within each round, so a load that comes and goes in blocks of calls
    (3x for ten calls, then quiet for ten) slows both sides of almost every ratio alike."""
    dense, sparse = nn.Conv2d(8, 16, 3), SparseConv2d.from_dense(pruned(nn.Conv2d(8, 16, 3), 0.9))
    x = (torch.randn(1, 8, 5, 5),)
    base, (t,), (ratio,) = paired_ratio(dense, [sparse], x, rounds=7,
                                        timer=FakeTimer(lambda i: 3.0 if (i // 10) % 2 else 1.0))
    assert ratio == pytest.approx(2.5)
    assert base > 0 and t > 0


def test_margin_is_a_parameter():
    model = three_layer_model()
    x = torch.randn(1, 8, 6, 6)
    out = sparsify(model, example_inputs=x, timer=FakeTimer(), min_speedup=1.02, guard=False)
    assert kinds(out) == ["sparse", "dense", "sparse"]   # 1.05x now clears the margin


def test_guard_falls_back_when_the_sparsified_model_is_slower():
    """The issue's failure: per-layer timings said sparse, the whole model ran 2x slower."""
    model = three_layer_model()
    x = torch.randn(1, 8, 6, 6)
    report = []
    out = sparsify(model, example_inputs=x, timer=FakeTimer(sparse_model_penalty=4.0), report=report)
    assert kinds(out) == ["dense", "dense", "dense"]
    guard = report[-1]
    assert guard["name"] == "<model>" and guard["choice"] == "as given"
    assert guard["speedups"]["sparsified"] < 1
    assert all(not p.requires_grad for p in out.parameters())
    with torch.no_grad():
        torch.testing.assert_close(out(x), dense_reference(model, x), rtol=1e-5, atol=1e-6)
    assert out is not model


def test_guard_keeps_a_faster_sparsified_model():
    model = three_layer_model()
    x = torch.randn(1, 8, 6, 6)
    report = []
    out = sparsify(model, example_inputs=x, timer=FakeTimer(), report=report)
    assert kinds(out) == ["sparse", "dense", "dense"]
    assert report[-1]["choice"] == "sparsified"
    assert report[-1]["speedups"]["sparsified"] == pytest.approx(3.0 / 2.4, rel=1e-6)


def test_guard_inplace_falls_back_to_a_copy_of_the_original():
    model = three_layer_model()
    x = torch.randn(1, 8, 6, 6)
    ref = dense_reference(model, x).detach()
    out = sparsify(model, example_inputs=x, timer=FakeTimer(sparse_model_penalty=4.0), inplace=True)
    assert kinds(out) == ["dense", "dense", "dense"]
    with torch.no_grad():
        torch.testing.assert_close(out(x), ref, rtol=1e-5, atol=1e-6)


def test_fastest_model_needs_the_margin():
    a, b = nn.Conv2d(8, 16, 1), nn.Conv2d(8, 16, 1)
    x = (torch.randn(1, 8, 2, 2),)
    best, speedups = fastest_model(a, {"same": b}, x, rounds=3, min_speedup=1.02, timer=FakeTimer())
    assert best is None and speedups == {"same": 1.0}
    best, _ = fastest_model(a, {"same": b}, x, rounds=3, min_speedup=1.0, timer=FakeTimer())
    assert best == "same"


def test_decide_layer_caches_by_shape_and_threads():
    conv = pruned(nn.Conv2d(8, 16, 3), 0.9)
    sparse = SparseConv2d.from_dense(conv)
    cache, timer = CalibrationCache(), FakeTimer()
    assert decide_layer("a", conv, sparse, (1, 8, 5, 5), 0.9, 3, 1.1, None, cache, timer)
    calls = timer.calls
    assert decide_layer("b", conv, sparse, (1, 8, 5, 5), 0.9, 3, 1.1, None, cache, timer)
    assert timer.calls == calls and len(cache) == 1
    decide_layer("c", conv, sparse, (2, 8, 5, 5), 0.9, 3, 1.1, None, cache, timer)
    assert len(cache) == 2


def test_no_guard_without_example_inputs_or_in_training_mode():
    model = three_layer_model()
    timer = FakeTimer(sparse_model_penalty=4.0)
    report = []
    sparsify(model.train(), example_inputs=torch.randn(1, 8, 6, 6), timer=timer, report=report)
    assert all(r["name"] != "<model>" for r in report)


def test_bad_calibration_arguments():
    with pytest.raises(ValueError, match="reps"):
        sparsify(three_layer_model(), reps=0)


def test_wall_timer_times_one_call():
    calls = []
    conv = nn.Conv2d(2, 2, 1)
    t = wall_timer(lambda x: calls.append(x) or conv(x), (torch.randn(1, 2, 3, 3),))
    assert t >= 0 and len(calls) == 1


class PoolTimer:
    """seconds = a fixed cost per pool kind: torch's max-pool ``torch_cost``, oneDNN's ``onednn_cost``."""

    def __init__(self, torch_cost: float, onednn_cost: float):
        self.costs = (torch_cost, onednn_cost)

    def __call__(self, module, args):
        from s2h.sparse import FastMaxPool2d

        module(*args)
        return sum(self.costs[1] if isinstance(m, FastMaxPool2d) else self.costs[0] if isinstance(m, nn.MaxPool2d)
                   else 0.0 for m in module.modules()) or 1.0


@pytest.mark.parametrize("torch_cost, onednn_cost, swapped", [(1.0, 0.5, True), (1.0, 2.0, False)])
def test_max_pool_goes_to_onednn_only_where_timed_faster(torch_cost, onednn_cost, swapped):
    from s2h.sparse import FastMaxPool2d

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, 1)).eval()
    x = torch.randn(2, 3, 16, 16)
    report = []
    out = sparsify(model, example_inputs=x, timer=PoolTimer(torch_cost, onednn_cost), report=report, guard=False,
                   fuse=False)
    assert isinstance(out[2], FastMaxPool2d) == swapped
    entry = next(r for r in report if r["kind"] == "MaxPool2d")
    assert entry["input_shape"] == (2, 8, 16, 16) and entry["speedup"] == pytest.approx(torch_cost / onednn_cost)
    with torch.no_grad():
        want = F.max_pool2d(F.relu(F.conv2d(x, model[0].weight, model[0].bias, padding=1)), 3, 2, 1)
        torch.testing.assert_close(out(x), want)
    # Without example inputs nothing is timed: the pool goes to oneDNN (the documented default).
    assert isinstance(sparsify(model, fuse=False, guard=False)[2], FastMaxPool2d)
