"""s2h.unstructured (teacher-guided one-shot pruning) against independent eager references: loss, importance, exact pruning, fixed masks."""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from s2h import unstructured as oneshot
from s2h.models import SmallCNN, build_model


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ independent references


def ref_ca_kld(s, t, T, gamma=None, standardize=True):
    """CA-KLD written out longhand: per-row standardise (Bessel std, eps 1e-7), soften by T, mix both
    KL directions with gamma = the teacher's mean top-1 probability at T = 1 (s2h_kernels.ca_kld)."""
    t = t.detach()
    g = torch.softmax(t, 1).max(1).values.mean() if gamma is None else gamma
    if standardize:
        s = (s - s.mean(1, keepdim=True)) / (s.std(1, keepdim=True) + 1e-7)
        t = (t - t.mean(1, keepdim=True)) / (t.std(1, keepdim=True) + 1e-7)
    ps, pt = torch.softmax(s / T, 1), torch.softmax(t / T, 1)
    kl_ts = (pt * (pt.log() - ps.log())).sum(1)
    kl_st = (ps * (ps.log() - pt.log())).sum(1)
    return (g * kl_ts + (1 - g) * kl_st).mean()


def ref_total(s, y, t, alpha, T, gamma=None, kd_scale=None):
    ce = F.cross_entropy(s, y)
    scale = T * T if kd_scale is None else kd_scale
    return ce if t is None or alpha == 0 else alpha * scale * ref_ca_kld(s, t, T, gamma) + (1 - alpha) * ce


def tiny_model(classes=10, seed=0):
    torch.manual_seed(seed)
    return SmallCNN(classes, 1, widths=(4, 8, 8), hidden=8)


def tiny_loader(n=48, batch=16, classes=10, seed=0, shuffle=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=shuffle)


def randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


# ------------------------------------------------------------------ loss


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("gamma", [None, 0.25])
@pytest.mark.parametrize("kd_scale", [None, 1.0])
def test_total_loss_matches_reference(alpha, gamma, kd_scale):
    torch.manual_seed(0)
    s = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    t = (torch.randn(6, 10, dtype=torch.float64) * 3).requires_grad_(True)
    y = torch.randint(0, 10, (6,))
    got = oneshot.total_loss(s, y, t, alpha=alpha, temperature=4.0, gamma=gamma, kd_scale=kd_scale)
    s2 = s.detach().clone().requires_grad_(True)
    want = ref_total(s2, y, t.detach(), alpha, 4.0, gamma, kd_scale)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)
    got.backward()
    want.backward()
    torch.testing.assert_close(s.grad, s2.grad, rtol=1e-5, atol=1e-8)
    assert t.grad is None or torch.all(t.grad == 0)  # no gradient reaches the teacher


def test_loss_runs_on_the_fused_op(monkeypatch):
    import s2h_kernels

    calls = []
    real = s2h_kernels.ca_kld

    def spy(*a, **k):
        calls.append(k)
        return real(*a, **k)

    monkeypatch.setattr(s2h_kernels, "ca_kld", spy)
    oneshot.total_loss(torch.randn(4, 10), torch.arange(4), torch.randn(4, 10), alpha=0.5, temperature=3.0, gamma=0.2)
    assert calls == [{"temperature": 3.0, "gamma": 0.2, "standardize": True, "reduction": "batchmean"}]


def test_ca_kld_zero_for_identical_logits_and_positive_otherwise():
    z = torch.randn(5, 7)
    assert oneshot.ca_kld(z, z).abs() < 1e-6
    assert oneshot.ca_kld(z, torch.randn(5, 7)) > 0


# ------------------------------------------------------------------ importance


def _ref_importance(model, teacher, loader, alpha, T, batches, accumulate="abs", exclude=oneshot.DEFAULT_EXCLUDE):
    model = copy.deepcopy(model).eval()
    names = [n for n, _ in oneshot.prunable_weights(model, exclude).items()]
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(params[n]) for n in names}
    used = 0
    for x, y in loader:
        if used == batches:
            break
        t = teacher(x).detach() if teacher is not None else None
        loss = ref_total(model(x), y, t, alpha, T)
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        for n, g in zip(names, grads):
            total[n] += (params[n] * g).abs() if accumulate == "abs" else g
        used += 1
    if accumulate == "abs":
        return {n: v.detach() / used for n, v in total.items()}
    return {n: (params[n] * total[n] / used).abs().detach() for n in names}


@pytest.mark.parametrize("accumulate", ["abs", "grad"])
def test_importance_matches_eager_reference(accumulate):
    student, teacher = randomize_bn(tiny_model(seed=1)), randomize_bn(tiny_model(seed=2), 3).eval()
    loader = tiny_loader(n=48, batch=16)
    got = oneshot.importance(student, teacher, loader, alpha=0.6, temperature=3.0, batches=2, accumulate=accumulate)
    want = _ref_importance(student, teacher, loader, 0.6, 3.0, 2, accumulate)
    assert list(got) == list(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-9)
    # fewer batches in the loader than asked for: all of them are used
    got_all = oneshot.importance(student, teacher, loader, alpha=0.6, temperature=3.0, batches=10,
                                 accumulate=accumulate)
    want_all = _ref_importance(student, teacher, loader, 0.6, 3.0, 10, accumulate)
    for n in want_all:
        torch.testing.assert_close(got_all[n], want_all[n], rtol=1e-4, atol=1e-9)


def test_importance_leaves_model_untouched():
    student, teacher = randomize_bn(tiny_model(seed=1)), tiny_model(seed=2)
    student.train()
    before = copy.deepcopy(student.state_dict())
    oneshot.importance(student, teacher, tiny_loader(), alpha=0.5, temperature=4.0, batches=3)
    assert student.training
    for k, v in student.state_dict().items():
        assert torch.equal(v, before[k]), k  # BN running stats not updated
    assert all(p.grad is None for p in student.parameters())


def test_grad_ce_and_magnitude_importance():
    student, teacher = randomize_bn(tiny_model(seed=1)), tiny_model(seed=2)
    loader = tiny_loader()
    ce = oneshot.compute_importance("grad-ce", student, teacher, loader, batches=2)
    want = _ref_importance(student, None, loader, 0.0, 4.0, 2)
    for n in want:
        torch.testing.assert_close(ce[n], want[n], rtol=1e-4, atol=1e-9)
    kd = oneshot.compute_importance("grad-kd", student, teacher, loader, alpha=0.9, batches=2)
    assert any(not torch.allclose(kd[n], ce[n]) for n in kd)  # the teacher changes the scores
    mag = oneshot.compute_importance("magnitude", student, teacher, loader)
    for n, p in oneshot.prunable_weights(student).items():
        assert torch.equal(mag[n], p.detach().abs())
    with pytest.raises(ValueError, match="unknown method"):
        oneshot.compute_importance("random", student, teacher, loader)


# ------------------------------------------------------------------ pruning


def _random_scores(model, seed=0, exclude=oneshot.DEFAULT_EXCLUDE, levels=None):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, p in oneshot.prunable_weights(model, exclude).items():
        s = torch.rand(p.shape, generator=g)
        out[n] = torch.floor(s * levels) if levels else s
    return out


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.9, 0.98, 0.9999])
@pytest.mark.parametrize("levels", [None, 3])  # 3 levels: massive ties
def test_global_prune_exact_count_threshold_and_ties(sparsity, levels):
    model = tiny_model()
    scores = _random_scores(model, levels=levels)
    names = list(scores)
    flat = torch.cat([scores[n].flatten() for n in names]).tolist()
    n = len(flat)
    k = round(sparsity * n)
    # independent reference: sort (score, global position), remove the first k
    removed = set(sorted(range(n), key=lambda i: (flat[i], i))[:k])
    want = torch.tensor([i not in removed for i in range(n)])
    masks = oneshot.prune(model, scores, sparsity)
    assert list(masks) == names
    got = torch.cat([masks[nm].flatten() for nm in names])
    assert int((~got).sum()) == k
    assert torch.equal(got, want)
    # the pruned weights are zero in the model, the others untouched
    for nm, p in oneshot.prunable_weights(model).items():
        assert torch.all(p[~masks[nm]] == 0)
    # deterministic: same scores -> same masks
    again = oneshot.prune(tiny_model(), scores, sparsity)
    assert all(torch.equal(masks[nm], again[nm]) for nm in names)


def test_all_ties_prune_in_position_order():
    model = tiny_model()
    scores = {n: torch.ones_like(p) for n, p in oneshot.prunable_weights(model).items()}
    sizes = [s.numel() for s in scores.values()]
    masks = oneshot.prune(model, scores, 0.5)
    k = round(0.5 * sum(sizes))
    flat = torch.cat([m.flatten() for m in masks.values()])
    assert torch.all(~flat[:k]) and torch.all(flat[k:])


@pytest.mark.parametrize("sparsity", [0.3, 0.75, 0.9])
def test_layer_scope(sparsity):
    model = tiny_model()
    scores = _random_scores(model, seed=5)
    masks = oneshot.prune(model, scores, sparsity, scope="layer")
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(sparsity * total)
    for n, m in masks.items():
        k = int((~m).sum())
        assert math.floor(sparsity * m.numel()) <= k <= math.ceil(sparsity * m.numel())
        if 0 < k < m.numel():
            assert scores[n][~m].max() <= scores[n][m].min()
    # global differs from layer scope for skewed scores
    skew = {n: s * (10.0 ** i) for i, (n, s) in enumerate(scores.items())}
    g = oneshot.prune(tiny_model(), skew, sparsity, scope="global")
    lay = oneshot.prune(tiny_model(), skew, sparsity, scope="layer")
    assert any(not torch.equal(g[n], lay[n]) for n in g)


def test_default_exclude_first_conv_and_classifier():
    model = tiny_model()
    names = list(oneshot.prunable_weights(model))
    assert "features.0.weight" not in names and "classifier.2.weight" not in names
    assert names == ["features.3.weight", "features.7.weight", "features.11.weight", "classifier.0.weight"]
    first, last = model.features[0].weight.detach().clone(), model.classifier[2].weight.detach().clone()
    scores = {n: torch.zeros_like(p) for n, p in model.named_parameters()}  # scores for all: extras ignored
    masks = oneshot.prune(model, scores, 0.9)
    assert set(masks) == set(names)
    assert torch.equal(model.features[0].weight, first) and torch.equal(model.classifier[2].weight, last)
    # resnet18: conv1 and fc excluded
    rn = build_model("resnet18", 10, 1, 8)
    rn_names = list(oneshot.prunable_weights(rn))
    assert "conv1.weight" not in rn_names and "fc.weight" not in rn_names and "layer1.0.conv1.weight" in rn_names
    # configurable
    assert "features.0.weight" in oneshot.prunable_weights(model, exclude=())
    assert list(oneshot.prunable_weights(model, exclude=None))[-1] == "classifier.2.weight"
    only = oneshot.prunable_weights(model, exclude=("first conv", "classifier", "features.*"))
    assert list(only) == ["classifier.0.weight"]
    with pytest.raises(ValueError, match="matches no prunable layer"):
        oneshot.prunable_weights(model, exclude=("nosuchlayer",))


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "x"])
def test_bad_sparsity(bad):
    model = tiny_model()
    with pytest.raises(ValueError, match="sparsity"):
        oneshot.prune(model, _random_scores(model), bad)


def test_prune_bad_scores():
    model = tiny_model()
    scores = _random_scores(model)
    with pytest.raises(ValueError, match="no entry"):
        oneshot.prune(model, {k: v for k, v in list(scores.items())[1:]}, 0.5)
    n0 = next(iter(scores))
    with pytest.raises(ValueError, match="shape"):
        oneshot.prune(model, {**scores, n0: scores[n0].flatten()}, 0.5)
    with pytest.raises(ValueError, match="NaN"):
        oneshot.prune(model, {**scores, n0: torch.full_like(scores[n0], float("nan"))}, 0.5)
    with pytest.raises(ValueError, match="scope"):
        oneshot.prune(model, scores, 0.5, scope="channel")


# ------------------------------------------------------------------ bad input: classes, empty loaders


def test_teacher_student_class_mismatch():
    student, teacher = tiny_model(10), tiny_model(5)
    loader = tiny_loader(classes=5)
    with pytest.raises(ValueError, match="teacher has 5 classes but the student has 10"):
        oneshot.distill(student, teacher, loader, epochs=1)
    with pytest.raises(ValueError, match="teacher has 5 classes"):
        oneshot.importance(student, teacher, loader, alpha=0.5, temperature=4.0, batches=1)
    masks = oneshot.prune(student, _random_scores(student), 0.5)
    with pytest.raises(ValueError, match="teacher has 5 classes"):
        oneshot.retrain(student, masks, loader, epochs=1, teacher=teacher)


def test_labels_outside_classes():
    with pytest.raises(ValueError, match="outputs"):
        oneshot.train_cross_entropy(tiny_model(5), tiny_loader(classes=10, seed=3), epochs=1)


def test_empty_loader():
    empty = DataLoader(TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)), batch_size=4)
    student, teacher = tiny_model(), tiny_model(seed=1)
    with pytest.raises(ValueError, match="empty"):
        oneshot.distill(student, teacher, empty, epochs=1)
    with pytest.raises(ValueError, match="empty"):
        oneshot.importance(student, teacher, empty, alpha=0.5, temperature=4.0, batches=2)
    with pytest.raises(ValueError, match="empty"):
        oneshot.evaluate(student, empty)
    masks = oneshot.prune(student, _random_scores(student), 0.5)
    with pytest.raises(ValueError, match="empty"):
        oneshot.retrain(student, masks, empty, epochs=1)

    def nothing():
        return iter(())

    class NoLen:
        __iter__ = staticmethod(nothing)

    with pytest.raises(ValueError, match="no batches"):
        oneshot.importance(student, None, NoLen(), alpha=0.0, temperature=4.0, batches=2)


def test_other_bad_arguments():
    student, teacher, loader = tiny_model(), tiny_model(seed=1), tiny_loader()
    with pytest.raises(ValueError, match="alpha"):
        oneshot.distill(student, teacher, loader, epochs=1, alpha=1.5)
    with pytest.raises(ValueError, match="temperature"):
        oneshot.importance(student, teacher, loader, alpha=0.5, temperature=0.0)
    with pytest.raises(ValueError, match="needs a teacher"):
        oneshot.importance(student, None, loader, alpha=0.5, temperature=4.0)
    with pytest.raises(ValueError, match="batches"):
        oneshot.importance(student, teacher, loader, alpha=0.5, temperature=4.0, batches=0)


# ------------------------------------------------------------------ fixed-mask retraining


def _pruned_with_warm_optimizer(make_opt, seed=0):
    """A model, an optimizer with non-zero state on every weight (dense steps), then pruned to 80%."""
    model = tiny_model(seed=seed)
    opt = make_opt(model.parameters())
    loader = tiny_loader(n=32, batch=16, seed=seed + 10)
    for x, y in loader:  # warm the optimizer state densely
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    masks = oneshot.prune(model, _random_scores(model, seed=seed), 0.8)
    return model, opt, masks


OPTIMIZERS = {
    "sgd-momentum-wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-2),
    "sgd-nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("with_teacher", [False, True])
def test_retrain_keeps_pruned_weights_exactly_zero(opt_name, with_teacher):
    model, opt, masks = _pruned_with_warm_optimizer(OPTIMIZERS[opt_name])
    n_pruned = sum(int((~m).sum()) for m in masks.values())
    n_total = sum(m.numel() for m in masks.values())
    assert n_pruned == round(0.8 * n_total)
    kept_before = {n: p.detach()[masks[n]].clone() for n, p in oneshot.prunable_weights(model).items()}
    teacher = tiny_model(seed=7) if with_teacher else None
    loader = tiny_loader(n=48, batch=8, seed=3, shuffle=True)  # 6 batches x 10 epochs = 60 steps
    hist = oneshot.retrain(model, masks, loader, epochs=10, teacher=teacher, optimizer=opt)
    assert len(hist) == 10
    params = dict(model.named_parameters())
    for n, m in masks.items():
        p = params[n].detach()
        assert torch.all(p[~m] == 0), n  # exactly zero
        assert not torch.signbit(p[~m]).any()  # +0.0
        assert not torch.equal(p[m], kept_before[n]), n  # the kept weights did train
        for key, v in opt.state[params[n]].items():  # gradients were masked: no state builds up
            if torch.is_tensor(v) and v.shape == p.shape:
                assert torch.all(v[~m] == 0), (n, key)
    rep = oneshot.sparsity_report(model, masks)
    assert rep["pruned"] == n_pruned and rep["zeros"] >= n_pruned
    assert sum(int((params[n] == 0).sum()) for n in masks) >= n_pruned


class Drift(torch.optim.Optimizer):
    """SGD that also pushes every weight by +1e-3 per step (an update a zero gradient cannot stop).

    Before each step it records the largest |weight| at pruned positions: re-zeroing after every
    step keeps that at 0 throughout, not only at the end.
    """

    def __init__(self, params, masks_by_param):
        super().__init__(params, {"lr": 0.05})
        self.masks_by_param = masks_by_param
        self.seen = []

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                m = self.masks_by_param.get(p)
                if m is not None:
                    self.seen.append(float(p[~m].abs().max()) if (~m).any() else 0.0)
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])
                p.add_(1e-3)


def test_retrain_rezeroes_after_every_step():
    model = tiny_model()
    masks = oneshot.prune(model, _random_scores(model), 0.7)
    params = dict(model.named_parameters())
    opt = Drift(model.parameters(), {params[n]: m for n, m in masks.items()})
    oneshot.retrain(model, masks, tiny_loader(n=48, batch=8), epochs=3, optimizer=opt, scheduler="none")
    assert len(opt.seen) == 18 * len(masks) and max(opt.seen) == 0.0
    for n, m in masks.items():
        assert torch.all(params[n][~m] == 0) and torch.all(params[n][m] != 0)


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_naive_retraining_would_revive_pruned_weights(opt_name):
    """Control: the same optimizer without mask handling does revive pruned weights."""
    model, opt, masks = _pruned_with_warm_optimizer(OPTIMIZERS[opt_name])
    for x, y in tiny_loader(n=64, batch=8, seed=3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    params = dict(model.named_parameters())
    assert any(bool((params[n][~m] != 0).any()) for n, m in masks.items())


@pytest.mark.parametrize("with_teacher", [False, True])
def test_retrain_equals_manual_masked_loop(with_teacher):
    """retrain() == a hand-written loop: loss, grad masking, step, re-zero (constant lr)."""
    teacher = tiny_model(seed=9).eval() if with_teacher else None
    model, _, masks = _pruned_with_warm_optimizer(OPTIMIZERS["sgd-momentum-wd"])
    ref = copy.deepcopy(model)
    loader = tiny_loader(n=48, batch=16, seed=4)
    oneshot.retrain(model, masks, loader, epochs=2, teacher=teacher, alpha=0.7, temperature=2.0, lr=0.05,
                    momentum=0.9, weight_decay=1e-3, scheduler="none")
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True)
    params = dict(ref.named_parameters())
    ref.train()
    for _ in range(2):
        for x, y in loader:
            t = teacher(x).detach() if teacher is not None else None
            loss = ref_total(ref(x), y, t, 0.7, 2.0)
            opt.zero_grad()
            loss.backward()
            for n, m in masks.items():
                params[n].grad[~m] = 0
            opt.step()
            with torch.no_grad():
                for n, m in masks.items():
                    params[n][~m] = 0
    for (n, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=n)


def test_distill_moves_student_towards_teacher():
    torch.manual_seed(0)
    teacher = randomize_bn(tiny_model(seed=2)).eval()
    student = tiny_model(seed=1)
    loader = tiny_loader(n=64, batch=16)
    t_before = copy.deepcopy(teacher.state_dict())

    def gap():
        student.eval()
        with torch.no_grad():
            return sum(float(ref_ca_kld(student(x), teacher(x), 4.0)) for x, _ in loader)

    g0 = gap()
    hist = oneshot.distill(student, teacher, loader, epochs=15, alpha=1.0, temperature=4.0, lr=0.05)
    assert len(hist) == 15 and hist[-1]["loss"] < hist[0]["loss"]
    assert gap() < 0.5 * g0
    assert all(torch.equal(v, t_before[k]) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())


def test_recalibrate_bn_matches_batch_statistics():
    model = randomize_bn(tiny_model(seed=4))
    loader = tiny_loader(n=48, batch=16, seed=6)
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    oneshot.recalibrate_bn(model, loader, batches=3)
    # reference: the first BN's input over all 48 samples; its running mean is their channel mean
    x = torch.cat([xb for xb, _ in loader])
    with torch.no_grad():
        h = model.features[0](x)
    bn = model.features[1]
    torch.testing.assert_close(bn.running_mean, h.mean((0, 2, 3)), rtol=1e-4, atol=1e-6)
    # unbiased per-batch variances averaged over the 3 equal batches
    var = torch.stack([h[i:i + 16].var((0, 2, 3), unbiased=True) for i in range(0, 48, 16)]).mean(0)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-4, atol=1e-6)
    assert bn.momentum == 0.1 and model.training
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())


# ------------------------------------------------------------------ masks on disk


def test_save_load_and_fresh_model_masks(tmp_path):
    model = randomize_bn(tiny_model(seed=3))
    dense = copy.deepcopy(model.state_dict())
    masks = oneshot.prune(model, _random_scores(model, seed=3), 0.9)
    model.eval()
    x = torch.randn(5, 1, 8, 8)
    y = model(x)
    spec = {"arch": "small_cnn", "num_classes": 10, "in_channels": 1, "image_size": 8}
    # spec for the tiny widths does not exist under a name: load into a given fresh model
    oneshot.save_pruned(tmp_path / "p", model, masks, spec=spec)
    meta = json.loads((tmp_path / "p" / "model.json").read_text())
    assert meta["pruned"] == round(0.9 * meta["prunable"]) and meta["format"] == oneshot.FORMAT
    raw = torch.load(tmp_path / "p" / "masks.pt", weights_only=True)
    assert set(raw) == set(masks) and all(raw[k].dtype == torch.bool for k in raw)
    torch.load(tmp_path / "p" / "model.pt", weights_only=True)
    loaded, lmasks = oneshot.load_pruned(tmp_path / "p", model=tiny_model(seed=99))
    assert all(torch.equal(lmasks[k], masks[k].cpu()) for k in masks)
    assert torch.equal(loaded.eval()(x), y)
    # applying the masks to a fresh model holding the dense weights reproduces the pruned model
    fresh = tiny_model(seed=42)
    fresh.load_state_dict(dense)
    oneshot.apply_masks(fresh, masks)
    assert torch.equal(fresh.eval()(x), y)
    # tampered weights: refused
    bad = {k: v.clone() for k, v in torch.load(tmp_path / "p" / "model.pt", weights_only=True).items()}
    n0 = next(iter(masks))
    bad[n0][~masks[n0]] = 1.0
    torch.save(bad, tmp_path / "p" / "model.pt")
    with pytest.raises(ValueError, match="non-zero"):
        oneshot.load_pruned(tmp_path / "p", model=tiny_model())


def test_load_pruned_rebuilds_from_spec(tmp_path):
    model = build_model("small_cnn_student", 10, 1, 8)
    masks = oneshot.prune(model, oneshot.magnitude_importance(model), 0.75)
    oneshot.save_pruned(tmp_path, model, masks,
                        spec={"arch": "small_cnn_student", "num_classes": 10, "in_channels": 1, "image_size": 8})
    loaded, _ = oneshot.load_pruned(tmp_path)
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(loaded.eval()(x), model.eval()(x))
    assert isinstance(loaded.features[3], nn.Conv2d)  # plain layers, zeros inside


def test_saved_model_goes_through_sparsify(tmp_path):
    """What save_pruned writes is what s2h.sparse.sparsify consumes: plain layers with zeros."""
    from s2h.sparse import SparseConv2d, SparseLinear, sparsify

    model = randomize_bn(build_model("small_cnn_student", 10, 1, 8))
    masks = oneshot.prune(model, oneshot.magnitude_importance(model), 0.9)
    oneshot.save_pruned(tmp_path, model, masks,
                        spec={"arch": "small_cnn_student", "num_classes": 10, "in_channels": 1, "image_size": 8})
    loaded, _ = oneshot.load_pruned(tmp_path)
    loaded.eval()
    sparse = sparsify(loaded, min_sparsity=0.5, calibrate=False)
    kinds = {n: type(m) for n, m in sparse.named_modules()}
    assert kinds["features.3"] is SparseConv2d and kinds["classifier.0"] is SparseLinear
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(sparse(x), loaded(x), rtol=1e-4, atol=1e-5)


def test_build_model_torchvision_adapted():
    m = build_model("resnet18", 7, in_channels=1, image_size=8)
    assert m.conv1.in_channels == 1 and m.conv1.stride == (1, 1) and isinstance(m.maxpool, nn.Identity)
    assert m(torch.randn(2, 1, 8, 8)).shape == (2, 7)
    big = build_model("resnet18", 5, in_channels=3, image_size=224)
    assert big.conv1.stride == (2, 2) and big.fc.out_features == 5
    with pytest.raises(ValueError, match="unknown model"):
        build_model("nosuchnet", 10)
