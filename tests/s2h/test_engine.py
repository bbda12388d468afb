"""s2h.engine: the one evaluate and the one recalibrate_bn, on plain models and on S2HModel branches."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import s2h
from s2h.engine import evaluate, recalibrate_bn
from s2h_reference import random_u, randomize_norms

pytestmark = pytest.mark.usefixtures("one_thread")


def small_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))
    return randomize_norms(net)


def loader(n=24, batch=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 3, 6, 6, generator=g), torch.randint(0, 4, (n,), generator=g)),
                      batch_size=batch)


def test_evaluate_plain_model_against_direct_computation():
    net, dl = small_net().eval(), loader()
    got = evaluate(net, dl)
    x, y = dl.dataset.tensors
    with torch.no_grad():
        out = net(x)
    assert got["n"] == 24
    assert got["top1"] == pytest.approx(100.0 * float((out.argmax(1) == y).float().mean()))
    assert got["top5"] == pytest.approx(100.0)  # 4 classes: always in the top 5
    assert got["loss"] == pytest.approx(float(F.cross_entropy(out, y)), rel=1e-5)


def test_evaluate_branches_and_gap():
    dl = loader()
    model = s2h.convert(small_net(), torch.randn(1, 3, 6, 6)).eval()
    random_u(model, seed=2)
    got = evaluate(model, dl, branches=("soft", "hard"))
    x, y = dl.dataset.tensors
    with torch.no_grad():
        with model.branch("soft"):
            ys = model(x)
        yh = model.export().eval()(x)  # the hard network as a plain module
    assert got["soft_top1"] == pytest.approx(100.0 * float((ys.argmax(1) == y).float().mean()))
    assert got["hard_top1"] == pytest.approx(100.0 * float((yh.argmax(1) == y).float().mean()))
    kl = F.kl_div(F.log_softmax(yh, 1), F.log_softmax(ys, 1), reduction="batchmean", log_target=True)
    assert got["gap_kl"] == pytest.approx(float(kl), rel=1e-4, abs=1e-7)
    assert got["gap_kl"] > 0 and 0 < got["gap_js"] <= got["gap_kl"] + 1e-9
    assert not model.training


def test_recalibrate_bn_one_branch_of_an_s2h_model():
    dl = loader(n=16, batch=16)
    model = s2h.convert(small_net(), torch.randn(1, 3, 6, 6)).eval()
    random_u(model, seed=2)
    bn = model.model[1]
    before = {k: v.clone() for k, v in bn.named_buffers()}
    assert recalibrate_bn(model, dl, batches=5, branch="hard") == 1  # the loader has one batch
    x, _ = dl.dataset.tensors
    k = model.keep_counts()[next(iter(model.keep_counts()))]
    with torch.no_grad():
        h = model.export().eval()[0](x)  # the hard network's first conv: the BN's input in the hard branch
    torch.testing.assert_close(bn.running_mean_hard[:k], h.mean((0, 2, 3)), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(bn.running_var_hard[:k], h.var((0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-6)
    for name in ("running_mean", "running_var", "running_mean_soft", "running_var_soft"):
        assert torch.equal(getattr(bn, name), before[name]), name
    assert bn.momentum == 0.1 and not model.training
    with pytest.raises(ValueError, match="positive int"):
        recalibrate_bn(model, dl, batches=0)
