"""S2HPruner in real training recipes: accumulation, clipping, soft targets, AMP, dtypes, eval mode, phases.

Each result is compared with an independent computation: accumulation with the literal reference
(``S2HReference``, eager autograd, three backward calls) on the concatenated batch; soft targets with
the reference's ``F.cross_entropy(probabilities, label_smoothing=)``; clipping with the unclipped
gradients clipped by hand; the GradScaler path with the unscaled step.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import s2h
from s2h.structured.reference import S2HReference
from s2h.structured.step import PAPER_SETTINGS, S2HPruner

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


def mlp(dtype=F64, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 5)).to(dtype)
    m = s2h.convert(net, torch.randn(2, 12, dtype=dtype), target_flops=0.3).to(dtype)
    with torch.no_grad():
        m.u.normal_(0, 0.5, generator=torch.Generator().manual_seed(5))
    return m.train()


def convnet(dtype=torch.float32):
    # stride 2 first, then >= 16 kept channels: no NarrowConv2d (its backward does not follow CPU
    # autocast's dtypes: reported, s2h/structured/layers/conv.py)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    return s2h.convert(net, torch.randn(2, 3, 16, 16), target_flops=0.3).to(dtype).train()


def batch(n, seed=1, dtype=F64, classes=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=g).to(dtype), torch.randint(0, classes, (n,), generator=g)


def trainer(cls, m, **kw):
    opt = torch.optim.SGD(m.weight_parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    mopt = torch.optim.SGD(m.mask_parameters(), lr=0.5, momentum=0.9)
    return cls(m, opt, mopt, **kw)


def assert_same(a, b, rtol, atol=1e-12):
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        if v.is_floating_point():
            torch.testing.assert_close(v, w, rtol=rtol, atol=atol, msg=lambda s: f"{k}: {s}")


# ------------------------------------------------------------------------------------------ accumulation


@pytest.mark.parametrize("balance", ["paper", "none"])
@pytest.mark.parametrize("sizes", [(4, 4, 4, 4), (5, 3, 6, 2)])
def test_accumulation_equals_one_step_on_the_concatenated_batch(sizes, balance):
    """4 micro-batches (equal or not), then update == the literal algorithm on their concatenation (θ and u)."""
    base = mlp()
    acc, ref = copy.deepcopy(base), copy.deepcopy(base)
    ta = trainer(S2HPruner, acc, balance=balance, **PAPER_SETTINGS)
    tr = trainer(S2HReference, ref, balance=balance, **PAPER_SETTINGS)
    for it in range(3):
        x, y = batch(sum(sizes), seed=it)
        for xi, yi in zip(x.split(sizes), y.split(sizes)):
            ta.backward(xi, yi)
        ta.update()
        tr.step(x, y)
        assert_same(acc, ref, rtol=1e-7)
    assert ta.num_steps == 3 and not torch.equal(acc.u, base.u)


def test_accumulate_n_in_step_updates_every_n_calls():
    base = mlp()
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    ta, tb = trainer(S2HPruner, a, accumulate=4), trainer(S2HPruner, b)
    x, y = batch(16)
    flags = [ta.step(xi, yi)["updated"] for xi, yi in zip(x.split(4), y.split(4))]
    assert flags == [False, False, False, True] and ta.num_steps == 1
    tb.step(x, y)
    assert_same(a, b, rtol=1e-7)


# ------------------------------------------------------------------------------------------ clipping


@pytest.mark.parametrize("which", ["theta", "u"])
def test_clipping_scales_the_gradient_to_the_norm(which):
    """SGD lr 1, no momentum: the update is the clipped gradient; the unclipped one comes from the
    public phases of a twin trainer."""
    base = mlp()
    x, y = batch(8)
    a, b = copy.deepcopy(base), copy.deepcopy(base)

    def plain(m, **kw):
        return S2HPruner(m, torch.optim.SGD(m.weight_parameters(), lr=1.0),
                         torch.optim.SGD(m.mask_parameters(), lr=1.0), **kw)

    tb = plain(b)
    tb.backward(x, y)
    s = tb._state
    tb.finish_gradients(s)
    tb.balance_mask_gradient(s)
    grads = [p.grad.clone() for p in b.weight_parameters()] if which == "theta" else [b.u.grad.clone()]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    max_norm = 0.25 * float(norm)
    kw = {"clip_grad_norm": max_norm} if which == "theta" else {"clip_mask_grad_norm": max_norm}
    stats = plain(a, **kw).step(x, y)
    assert stats["grad_norm" if which == "theta" else "mask_grad_norm"] == pytest.approx(float(norm), rel=1e-12)
    params_b = list(base.weight_parameters()) if which == "theta" else [base.u]
    params_a = list(a.weight_parameters()) if which == "theta" else [a.u]
    factor = max_norm / (float(norm) + 1e-6)
    for p0, p1, g in zip(params_b, params_a, grads):
        torch.testing.assert_close(p1, p0 - factor * g, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------ soft targets


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("kind", ["mixup", "labels"])
def test_soft_targets_and_label_smoothing_match_the_reference(kind, smoothing):
    base = mlp()
    f, r = copy.deepcopy(base), copy.deepcopy(base)
    tf = trainer(S2HPruner, f, label_smoothing=smoothing)
    tr = trainer(S2HReference, r, label_smoothing=smoothing)
    for it in range(3):
        x, y = batch(8, seed=it)
        if kind == "mixup":  # mixup: lam * onehot(y) + (1 - lam) * onehot(y[perm]), inputs mixed alike
            lam, perm = 0.7, torch.randperm(8, generator=torch.Generator().manual_seed(it))
            x = lam * x + (1 - lam) * x[perm]
            y = lam * F.one_hot(y, 5).to(F64) + (1 - lam) * F.one_hot(y[perm], 5).to(F64)
        sf, sr = tf.step(x, y), tr.step(x, y)
        assert sf["loss"] == pytest.approx(sr["loss"], rel=1e-10)
        assert_same(f, r, rtol=1e-7)


def test_soft_targets_with_the_wrong_number_of_classes():
    m = mlp()
    with pytest.raises(ValueError, match="soft targets have 4 classes but the model returns 5"):
        trainer(S2HPruner, m).step(batch(4)[0], torch.full((4, 4), 0.25, dtype=F64))


# ------------------------------------------------------------------------------------------ AMP


class ScalerStub:
    """The GradScaler protocol with a fixed scale: records the calls, skips a step on inf/NaN."""

    def __init__(self, scale=2.0 ** 12):
        self.s, self.calls, self.found = scale, [], {}

    def scale(self, t):
        return t * self.s

    def unscale_(self, opt):
        ok = True
        for g in opt.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    p.grad.div_(self.s)
                    ok &= bool(torch.isfinite(p.grad).all())
        self.found[id(opt)] = not ok
        self.calls.append("unscale")

    def step(self, opt):
        self.calls.append("step")
        if not self.found.get(id(opt)):
            opt.step()

    def update(self):
        self.calls.append("update")


def test_grad_scaler_path_equals_the_unscaled_step_under_bf16_autocast():
    base = convnet()
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    stub = ScalerStub()
    ta = trainer(S2HPruner, a, scaler=stub, autocast=torch.bfloat16)
    tb = trainer(S2HPruner, b, autocast=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)
        sa, sb = ta.step(x, y), tb.step(x, y)
        assert sa["loss"] == sb["loss"]
    assert stub.calls == ["unscale", "unscale", "step", "step", "update"] * 3
    assert_same(a, b, rtol=1e-5, atol=1e-6)  # a power-of-two scale: the same numbers
    assert not torch.equal(a.u, base.u)


def test_grad_scaler_skips_the_update_on_overflow():
    m = convnet()
    before = copy.deepcopy(m.state_dict())
    stub = ScalerStub(scale=2.0 ** 200)  # inf in fp32
    tr = trainer(S2HPruner, m, scaler=stub)
    tr.step(torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,)))
    for k in ("u", "model.0.weight", "model.3.weight"):
        assert torch.equal(m.state_dict()[k], before[k]), k
    assert stub.calls[-1] == "update"


def test_real_cpu_grad_scaler_with_bf16_autocast_trains():
    m = convnet()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    tr = trainer(S2HPruner, m, scaler=scaler, autocast=torch.bfloat16)
    u0 = m.u.detach().clone()
    for _ in range(2):
        st = tr.step(torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,)))
    assert torch.isfinite(torch.tensor(st["loss"])) and not torch.equal(m.u, u0)
    assert "scaler" in tr.state_dict()


@pytest.mark.gpu
def test_fp16_autocast_with_grad_scaler_on_cuda_tracks_fp32():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    base = convnet().cuda()
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    ta = trainer(S2HPruner, a, scaler=torch.amp.GradScaler("cuda"), autocast=torch.float16)
    tb = trainer(S2HPruner, b)
    x, y = torch.randn(8, 3, 16, 16, device="cuda"), torch.randint(0, 10, (8,), device="cuda")
    sa, sb = ta.step(x, y), tb.step(x, y)
    assert sa["loss"] == pytest.approx(sb["loss"], rel=1e-2)
    assert sa["keep"] == sb["keep"]
    torch.testing.assert_close(a.u, b.u, rtol=1e-2, atol=1e-3)


# ------------------------------------------------------------------------------------------ dtypes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_and_bf16_models_train_with_an_fp32_resource_loss(dtype):
    """MACs overflow fp16 (65504) and bf16 keeps 3 digits: R is computed in fp32 from fp32 masks."""
    m = convnet(dtype)
    assert m.dense_flops() > 65504
    tr = trainer(S2HPruner, m, **PAPER_SETTINGS)  # R on the expected FLOPs: the path that overflowed
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        st = tr.step(torch.randn(4, 3, 16, 16, generator=g).to(dtype), torch.randint(0, 10, (4,), generator=g))
    assert st.tensors["resource_loss"].dtype == torch.float32
    assert 0 < st["resource_loss"] < 1 and 0 < st["hard_flops"] < 1 and 0 < st["soft_flops"] < 1
    from s2h_kernels.reference import channel_masks

    _, E, keep = channel_masks(m.u.detach().double(), m.group_offsets, temperature=m.temperature)
    want = (float(m.flops(E)) / m.dense_flops() - m.target_flops) ** 2  # fp64, by hand
    got = tr.resource_loss(E.float(), keep)
    assert got.dtype == torch.float32 and float(got) == pytest.approx(want, rel=1e-5)
    assert m.u.dtype == dtype and torch.isfinite(m.u).all()


# ------------------------------------------------------------------------------------------ contract


def test_eval_mode_warns_once():
    m = mlp()
    m.eval()
    tr = trainer(S2HPruner, m)
    with pytest.warns(UserWarning, match="eval mode.*model.train") as record:
        tr.step(*batch(4))
    assert sum("eval mode" in str(w.message) for w in record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tr.step(*batch(4))
        m.train()
        trainer(S2HPruner, m).step(*batch(4))


def test_wrapped_optimizers_are_accepted():
    """Optimizer-like wrappers (timm's Lookahead, Lightning's) need not subclass torch.optim.Optimizer."""

    class Wrapper:
        def __init__(self, opt):
            self.opt, self.param_groups = opt, opt.param_groups

        def step(self, closure=None):
            return self.opt.step(closure)

        def zero_grad(self, set_to_none=True):
            self.opt.zero_grad(set_to_none=set_to_none)

        def state_dict(self):
            return self.opt.state_dict()

        def load_state_dict(self, s):
            self.opt.load_state_dict(s)

    base = mlp()
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    x, y = batch(8)
    S2HPruner(a, Wrapper(torch.optim.SGD(a.weight_parameters(), lr=0.1)),
              Wrapper(torch.optim.Adam(a.mask_parameters(), lr=0.02))).step(x, y)
    S2HPruner(b, torch.optim.SGD(b.weight_parameters(), lr=0.1)).step(x, y)
    assert_same(a, b, rtol=0, atol=0)
    with pytest.raises(TypeError, match="optimizer must be an optimizer"):
        S2HPruner(a, object())


def test_update_without_backward_and_bad_arguments():
    m = mlp()
    tr = trainer(S2HPruner, m)
    with pytest.raises(RuntimeError, match="call backward"):
        tr.update()
    for kw, match in [({"accumulate": 0}, "accumulate"), ({"clip_grad_norm": -1.0}, "clip_grad_norm"),
                      ({"label_smoothing": 1.0}, "label_smoothing"), ({"scaler": object()}, "GradScaler")]:
        with pytest.raises((ValueError, TypeError), match=match):
            trainer(S2HPruner, m, **kw)
