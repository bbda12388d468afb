"""S2H layers: drop-in behaviour, branch selection, soft-mask placement, per-branch BN statistics,
paired forwards and the once-per-step mask cache."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import s2h
import s2h.structured.model as s2h_model
from s2h.structured.masks import ChannelSpec, Segment
from s2h_kernels import reference
from s2h_reference import CatNet, peaked_u, plain_copy, random_u, randomize_norms, tp_prune


pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    """Residual convs with BN, a depthwise conv, and an MLP head whose hidden group has no norm."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(12)
        self.c1 = nn.Conv2d(12, 10, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(10)
        self.c2 = nn.Conv2d(10, 12, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12, bias=False)
        self.bn3 = nn.BatchNorm2d(12)
        self.fc1 = nn.Linear(12, 20)
        self.fc2 = nn.Linear(20, 5)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.bn1(self.c1(x)))
        x = F.relu(x + self.bn2(self.c2(y)))
        x = F.relu(self.bn3(self.dw(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


def make(seed=0):
    torch.manual_seed(seed)
    net = randomize_norms(Net(), seed)
    x = torch.randn(4, 3, 8, 8)
    return net, s2h.convert(net, x[:1]), x


# ------------------------------------------------------------------------------ drop-in layers


def test_layers_are_drop_ins():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2, bias=True, padding_mode="reflect")
    sconv = s2h.S2HConv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2, bias=True, padding_mode="reflect",
                          mask_group="g")
    sconv.load_state_dict(conv.state_dict())
    assert set(sconv.state_dict()) == set(conv.state_dict()) and sconv.mask_group == "g"
    lin, slin = nn.Linear(7, 3), s2h.S2HLinear(7, 3, mask_group=None)
    slin.load_state_dict(lin.state_dict())
    bn, sbn = nn.BatchNorm2d(6), s2h.S2HBatchNorm2d(6)
    sbn.load_state_dict(bn.state_dict(), strict=False)
    x, v = torch.randn(2, 4, 9, 9), torch.randn(5, 7)
    for br in ("soft", "hard", "dense"):  # an unconverted layer is its nn counterpart in every branch
        with pytest.warns(DeprecationWarning, match="without a model"), s2h.branch(br):
            torch.testing.assert_close(sconv(x), conv(x))
            torch.testing.assert_close(slin(v), lin(v))
            torch.testing.assert_close(sbn(conv(x)), bn(conv(x)))
    assert isinstance(sconv, nn.Conv2d) and isinstance(slin, nn.Linear) and isinstance(sbn, nn.BatchNorm2d)


def test_branch_context():
    _, model, x = make()
    _, other, _ = make(seed=1)
    assert model.current_branch() is None and s2h.current_branch(model) is None
    with model.branch("hard"):
        assert model.current_branch() == "hard"
        assert other.current_branch() is None  # the branch is the model's own
        with s2h.branch(model, "soft"):
            assert s2h.current_branch(model) == "soft"
            assert all(m.active_branch() == "soft" for m in model.modules() if isinstance(m, s2h.structured.S2H_LAYER_TYPES))
        assert model.current_branch() == "hard"
    assert model.current_branch() is None
    with pytest.raises(ValueError, match="unknown branch 'medium'"):
        with model.branch("medium"):
            pass
    with pytest.raises(RuntimeError):
        with model.branch("dense"):
            raise RuntimeError("boom")
    assert model.current_branch() is None
    # the deprecated model-less form: context-local, and a model's own branch wins over it
    with pytest.warns(DeprecationWarning, match="without a model"), s2h.branch("hard"):
        assert s2h.current_branch() == "hard" and model.current_branch() == "hard"
        with model.branch("dense"):
            assert model.current_branch() == "dense"
    assert s2h.current_branch() is None


def test_two_models_in_two_threads_run_their_own_branches():
    """A teacher-student pair or two experiments in a thread pool: each model computes its own branch
    while the other is inside a different branch block. References: Torch-Pruning's pruned copy of
    the first network (its hard network), and the unconverted second network (its dense branch)."""
    import threading

    net_a, model_a, x = make(seed=0)
    net_b, model_b, _ = make(seed=1)
    model_a.eval(), model_b.eval()
    random_u(model_a, seed=3)
    keep = model_a.keep_counts()
    channels = {g.name: g.channels for g in model_a.groups}
    assert any(keep[g] < channels[g] for g in keep)  # hard differs from dense
    pruned_a = tp_prune(plain_copy(model_a, "hard").eval(), x[:1], keep, channels)
    with torch.no_grad():
        ref_a, ref_b = pruned_a(x), net_b.eval()(x)
        with model_a.branch("dense"):
            assert not torch.allclose(model_a(x), ref_a, atol=1e-3)  # the check can fail
    inside = threading.Barrier(2)
    out, errors = {}, []

    def run(name, model, branch):
        try:
            with torch.no_grad(), model.branch(branch):
                inside.wait(timeout=30)  # both models are in their branch blocks now
                out[name] = [model(x) for _ in range(3)]
                inside.wait(timeout=30)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=("a", model_a, "hard")),
               threading.Thread(target=run, args=("b", model_b, "dense"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for y in out["a"]:
        torch.testing.assert_close(y, ref_a, rtol=1e-5, atol=1e-5)
    for y in out["b"]:
        torch.testing.assert_close(y, ref_b, rtol=1e-5, atol=1e-5)
    assert model_a.current_branch() is None and model_b.current_branch() is None


def test_default_branch_is_soft():
    _, model, x = make()
    model.eval()
    with torch.no_grad():
        y = model(x)
        with model.branch("soft"):
            ys = model(x)
        model.default_branch = "hard"
        yh_default = model(x)
        with model.branch("hard"):
            yh = model(x)
    torch.testing.assert_close(y, ys)
    torch.testing.assert_close(yh_default, yh)


# ------------------------------------------------------------------------------ soft mask placement


def test_soft_mask_after_norm_and_on_unnormalised_outputs():
    """Eval: a BN in a group outputs dense·w; the MLP's hidden linear (no norm) outputs dense·w."""
    net, model, x = make()
    model.eval()
    random_u(model, seed=3)
    offs = model.group_offsets.tolist()
    w, _, _ = reference.channel_masks(model.u.detach(), offs, 1.0, [g.divisor for g in model.groups])
    cw = [0]
    for g in model.groups:
        cw.append(cw[-1] + g.channels)
    wg = {g.name: w[cw[i] : cw[i + 1]] for i, g in enumerate(model.groups)}
    names = {g.name for g in model.groups}
    assert {"stem", "c1", "fc1"} <= names and "fc2" not in names  # the classes stay unpruned
    seen = {}

    def grab(key):
        return lambda mod, inp, out: seen.__setitem__(key, (inp[0], out))

    inner = model.model
    hooks = [getattr(inner, n).register_forward_hook(grab(n)) for n in ("c1", "bn1", "fc1")]
    with torch.no_grad(), model.branch("soft"):
        model(x)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        xin, out = seen["c1"]  # a conv followed by a norm is not masked itself
        torch.testing.assert_close(out, F.conv2d(xin, inner.c1.weight, padding=1))
        xin, out = seen["bn1"]
        bn = inner.bn1
        ref = F.batch_norm(xin, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        torch.testing.assert_close(out, ref * wg["c1"].view(1, -1, 1, 1), rtol=1e-5, atol=1e-6)
        xin, out = seen["fc1"]
        ref = F.linear(xin, inner.fc1.weight, inner.fc1.bias)
        torch.testing.assert_close(out, ref * wg["fc1"], rtol=1e-5, atol=1e-6)


def test_binary_soft_mask_equals_hard_branch_in_training():
    """With 0/1 prefix masks, the masked full-width soft net computes what the sliced hard net does."""
    _, model, x = make()
    model.train()
    keep = peaked_u(model, 0.5)
    assert model.keep_counts() == keep
    with model.branch("soft"):
        ys = model(x)
    with model.branch("hard"):
        yh = model(x)
    torch.testing.assert_close(ys, yh, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ BN statistics


def test_batchnorm_keeps_statistics_per_branch():
    net, model, x = make()
    model.train()
    random_u(model, seed=2)
    bn = model.model.bn1
    k = model.keep_counts()["c1"]
    assert 0 < k < 10
    before = {n: b.clone() for n, b in bn.named_buffers()}
    with model.branch("hard"):
        model(x)
    after = dict(bn.named_buffers())
    assert not torch.equal(after["running_mean_hard"][:k], before["running_mean_hard"][:k])
    torch.testing.assert_close(after["running_mean_hard"][k:], before["running_mean_hard"][k:])
    for n in ("running_mean", "running_var", "running_mean_soft", "running_var_soft"):
        torch.testing.assert_close(after[n], before[n])
    assert int(after["num_batches_tracked_hard"]) == 1 and int(after["num_batches_tracked"]) == 0
    with model.branch("soft"):
        model(x)
    assert not torch.equal(bn.running_mean_soft, before["running_mean_soft"])
    torch.testing.assert_close(bn.running_mean, before["running_mean"])


@pytest.mark.parametrize("arch", ["residual", "concat"])
def test_hard_statistics_match_a_pruned_model_trained_alike(arch):
    """A hard train-mode forward updates the hard stats exactly as Torch-Pruning's pruned copy's own
    (behind a concat the BN keeps an offset range: its statistics are gathered and scattered back)."""
    if arch == "residual":
        net, model, x = make()
    else:
        torch.manual_seed(0)
        x = torch.randn(4, 3, 8, 8)
        model = s2h.convert(randomize_norms(CatNet()), x[:1])
    random_u(model, seed=4)
    keep = model.keep_counts()
    channels = {g.name: g.channels for g in model.groups}
    if arch == "concat":
        assert not model.model.bn_cat.out_spec.is_prefix and keep["a"] < 6
    pruned = tp_prune(plain_copy(model, stats="hard").eval(), x[:1], keep, channels)
    model.train()
    pruned.train()
    with torch.no_grad():
        with model.branch("soft"):  # soft steps must not disturb the hard statistics
            model(torch.randn_like(x))
        with model.branch("hard"):
            model(x)
        pruned(x)
    model.eval()
    pruned.eval()
    x2 = torch.randn_like(x)
    with torch.no_grad(), model.branch("hard"):
        torch.testing.assert_close(model(x2), pruned(x2), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ paired forwards


@pytest.mark.parametrize("pair_backend", [None, "triton"])
def test_layer_forward_pair_equals_two_calls(pair_backend):
    _, model, x = make()
    model.train()
    random_u(model, seed=5)
    model.update_masks()
    fc1, c1 = model.model.fc1, model.model.c1
    fc1.pair_backend = pair_backend
    v = torch.randn(3, 12, requires_grad=True)
    vh = torch.randn(3, model.keep_counts()["stem"], requires_grad=True)
    ys, yh = fc1.forward_pair(v, vh)
    with model.branch("soft"):
        rs = fc1(v)
    with model.branch("hard"):
        rh = fc1(vh)
    torch.testing.assert_close(ys, rs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(yh, rh, rtol=1e-5, atol=1e-5)
    assert yh.shape == (3, model.keep_counts()["fc1"])
    # both graphs share the step's cached masks: keep them for the second traversal
    g1 = torch.autograd.grad((ys.sum() + yh.square().sum()), (v, vh, fc1.weight, model.u), retain_graph=True)
    g2 = torch.autograd.grad((rs.sum() + rh.square().sum()), (v, vh, fc1.weight, model.u))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    xs = torch.randn(2, 12, 6, 6)
    xh = torch.randn(2, model.keep_counts()["stem"], 6, 6)
    cs, ch = c1.forward_pair(xs, xh)
    with model.branch("soft"):
        torch.testing.assert_close(cs, c1(xs))
    with model.branch("hard"):
        torch.testing.assert_close(ch, c1(xh))


def test_pair_backend_and_side_stream_are_per_layer_and_per_model():
    assert "pair_backend" not in vars(s2h.S2HLinear)  # no class attribute: one layer's setting is its own
    _, model, _ = make()
    fc1, fc2 = model.model.fc1, model.model.fc2
    fc1.pair_backend = "cpu"
    assert fc2.pair_backend is None and s2h.S2HLinear(3, 2).pair_backend is None
    _, other, _ = make(seed=1)
    assert other.mask_state is not model.mask_state
    assert all(m.mask_state is model.mask_state for m in model.modules() if isinstance(m, s2h.structured.S2H_LAYER_TYPES))


@pytest.mark.gpu
def test_side_streams_belong_to_their_model():
    _, a, _ = make()
    _, b, _ = make(seed=1)
    dev = torch.device("cuda")
    assert a.side_stream(dev) is a.side_stream(dev)
    assert a.side_stream(dev) is not b.side_stream(dev)


def test_model_forward_pair_trains_like_two_calls():
    _, m1, x = make()
    random_u(m1, seed=6)
    m1.train()
    m2 = copy.deepcopy(m1)
    ys, yh = m1.forward_pair(x)
    (ys.sum() + 2 * yh.sum()).backward()
    with m2.branch("soft"):
        rs = m2(x)
    with m2.branch("hard"):
        rh = m2(x)
    (rs.sum() + 2 * rh.sum()).backward()
    torch.testing.assert_close(ys, rs)
    torch.testing.assert_close(yh, rh)
    for (n, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-5, atol=1e-6, msg=n)
    for (n, b1), b2 in zip(m1.named_buffers(), m2.buffers()):
        torch.testing.assert_close(b1, b2, msg=n)


def test_forward_pair_falls_back_for_untraceable_models():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3)
            self.b = nn.Conv2d(8, 4, 3)

        def forward(self, x):
            y = self.a(x)
            if y.sum() > -1e9:  # data-dependent control flow: torch.fx cannot trace it
                y = y.relu()
            return self.b(y)

    x = torch.randn(2, 3, 9, 9)
    model = s2h.convert(Branchy(), x[:1])
    with pytest.warns(UserWarning, match="torch.fx cannot trace"):
        ys, yh = model.forward_pair(x)
    assert model.pair_mode == "sequential"
    with model.branch("hard"):
        torch.testing.assert_close(yh, model(x))


# ------------------------------------------------------------------------------ errors and caching


def test_layer_errors():
    with pytest.raises(RuntimeError, match="not bound to an S2HModel"):
        s2h.S2HLinear(4, 3).forward_pair(torch.randn(1, 4), torch.randn(1, 4))
    _, model, x = make()
    model.mask_state.clear()
    with model.branch("soft"), pytest.raises(RuntimeError, match="update_masks"):
        model.model(x)  # the inner network, bypassing S2HModel.forward
    with pytest.raises(ValueError, match="only a 1-D normalized_shape"):
        s2h.S2HLayerNorm((3, 4))


def test_masks_computed_once_per_step(monkeypatch):
    calls = []
    real = s2h_model.channel_masks

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(s2h_model, "channel_masks", counting)
    _, model, x = make()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):
        calls.clear()
        model.update_masks()
        with model.branch("soft"):
            ys = model(x)
        with model.branch("hard"):
            yh = model(x)
        ps, ph = model.forward_pair(x)
        loss = ys.sum() + yh.sum() + ps.sum() + ph.sum() + model.resource_loss()
        model.keep_counts()
        model.hard_flops()
        loss.backward()
        assert len(calls) == 1, f"step {step}: channel_masks ran {len(calls)} times"
        opt.step()
        opt.zero_grad()
    calls.clear()
    with model.branch("hard"):  # u changed in the last step: forward recomputes by itself
        model(x)
    assert len(calls) == 1


def test_masks_recomputed_when_grad_needed_after_no_grad():
    _, model, x = make()
    with torch.no_grad():
        model.update_masks()
    with model.branch("soft"):
        y = model(x)
    y.sum().backward()
    assert model.u.grad is not None and model.u.grad.abs().sum() > 0


def test_channel_spec_concat_offsets():
    spec = ChannelSpec(12, [Segment(0, 0, 4), Segment(1, 6, 3, 2)])  # entries 4,5 fixed
    assert not spec.is_prefix
    idx = spec.kept([2, 1], torch.device("cpu"))
    assert idx.tolist() == [0, 1, 4, 5, 6, 7]
    assert spec.kept_size([2, 1]) == 6
    w = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    m = spec.soft_mask(w, [0, 4, 7])
    torch.testing.assert_close(m, torch.tensor([0.9, 0.8, 0.7, 0.6, 1, 1, 0.5, 0.5, 0.4, 0.4, 0.3, 0.3]))
    prefix = ChannelSpec(5, [Segment(0, 0, 5)])
    assert prefix.kept([5], torch.device("cpu")) is None and prefix.kept([2], None) == slice(0, 2)
    with pytest.raises(ValueError, match="overlapping"):
        ChannelSpec(10, [Segment(0, 0, 5), Segment(1, 4, 2)])


@pytest.mark.parametrize("c_in,c_out,kernel,padding,bias", [
    (6, 8, 3, 1, True), (3, 5, 3, 0, False), (7, 4, 1, 0, True), (5, 6, (3, 1), (1, 0), True), (4, 4, 5, 2, False),
])
def test_narrow_conv_gradients_equal_conv2d(c_in, c_out, kernel, padding, bias):
    """The hard branch's narrow conv (input gradient as a forward conv) against F.conv2d's autograd."""
    from s2h.structured.layers.conv import NarrowConv2d

    torch.manual_seed(0)
    k = kernel if isinstance(kernel, tuple) else (kernel, kernel)
    p = padding if isinstance(padding, tuple) else (padding, padding)
    x = torch.randn(3, c_in, 9, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(c_out, c_in, *k, dtype=torch.float64, requires_grad=True)
    b = torch.randn(c_out, dtype=torch.float64, requires_grad=True) if bias else None
    inputs = [t for t in (x, w, b) if t is not None]
    g = torch.randn(3, c_out, 9 + 2 * p[0] - k[0] + 1, 7 + 2 * p[1] - k[1] + 1, dtype=torch.float64)
    y = NarrowConv2d.apply(x, w, b, p)
    got = torch.autograd.grad(y, inputs, g)
    y_ref = F.conv2d(x, w, b, 1, p)
    want = torch.autograd.grad(y_ref, inputs, g)
    torch.testing.assert_close(y, y_ref)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)
    assert torch.autograd.gradcheck(lambda *t: NarrowConv2d.apply(t[0], t[1], t[2] if bias else None, p), tuple(inputs))


def test_hard_branch_takes_the_narrow_conv_path(monkeypatch):
    """(Its values: test_binary_soft_mask_equals_hard_branch_in_training runs the same path.)"""
    from s2h.structured.layers import conv

    calls = []
    monkeypatch.setattr(conv.NarrowConv2d, "apply", lambda *a: calls.append(a) or F.conv2d(a[0], a[1], a[2], 1, a[3]))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(), nn.Conv2d(12, 4, 3, padding=1))
    x = torch.randn(4, 3, 8, 8)
    model = s2h.convert(net, x[:2], target_flops=0.5)
    with model.branch("hard"):
        model(x)
    assert calls, "a conv narrower than 16 channels should take the narrow path in the hard branch"
