"""export / save / load: the hard network as a plain model, files without pickled modules."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import s2h
from s2h_reference import macs, random_u, randomize_norms


pytestmark = pytest.mark.usefixtures("one_thread")


def factory():
    torch.manual_seed(0)
    return randomize_norms(s2h.models.resnet56(num_classes=10))


def trained(steps=3, divisor=1, ignored=None):
    """A converted ResNet-56 after a few S2H-like steps (soft CE + hard KD), so branch stats diverge."""
    model = s2h.convert(factory(), torch.randn(1, 3, 32, 32), divisor=divisor, ignored_layers=ignored).train()
    random_u(model, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(8, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (8,), generator=g)
        model.update_masks()
        ys, yh = model.forward_pair(x)
        loss = F.cross_entropy(ys, y) + F.kl_div(F.log_softmax(yh, 1), F.softmax(ys.detach(), 1),
                                                 reduction="batchmean") + model.resource_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_export_after_training_equals_hard_branch():
    model = trained()
    bn = model.model.bn1
    assert not torch.equal(bn.running_mean_hard, bn.running_mean)  # the branches' stats diverged
    assert not torch.equal(bn.running_mean_hard, bn.running_mean_soft)
    exported = model.export().eval()
    types = {type(m) for m in exported.modules()}
    assert not types & set(s2h.structured.S2H_LAYER_TYPES)
    assert {nn.Conv2d, nn.BatchNorm2d, nn.Linear} <= types
    k = model.keep_counts()[model.groups[0].name]
    torch.testing.assert_close(exported.bn1.running_mean, bn.running_mean_hard[:k])
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad(), model.branch("hard"):
        torch.testing.assert_close(exported(x), model(x), rtol=0, atol=1e-5)
    assert macs(exported, x[:1]) == pytest.approx(model.hard_flops(), rel=1e-6)
    assert exported.s2h_widths == model.keep_counts()


def test_export_widths_argument():
    model = s2h.convert(factory(), torch.randn(1, 3, 32, 32))
    names = [g.name for g in model.groups]
    widths = {n: max(1, g.channels // 4) for n, g in zip(names, model.groups)}
    e = model.export(widths)
    assert e.s2h_widths == widths
    assert e.conv1.out_channels == widths["conv1"]
    assert model.export(list(widths.values())).s2h_widths == widths
    with pytest.raises(ValueError, match="unknown groups"):
        model.export({**widths, "nope": 1})
    with pytest.raises(ValueError, match="lacks groups"):
        model.export({n: 1 for n in names[1:]})
    with pytest.raises(ValueError, match="outside"):
        model.export({**widths, names[0]: 0})
    with pytest.raises(ValueError, match="entries for"):
        model.export([1, 2])


def _only_plain_values(obj):
    """True when a payload holds tensors and plain Python values only (no modules, no classes)."""
    if isinstance(obj, dict):
        return all(isinstance(k, str) and _only_plain_values(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return all(_only_plain_values(v) for v in obj)
    return isinstance(obj, (torch.Tensor, str, int, float, bool, type(None)))


def test_save_load_s2h_model(tmp_path):
    model = trained(divisor=4, ignored=["layer3.0.conv1"])
    path = tmp_path / "s2h.pt"
    s2h.save(model, path)
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "s2h" and _only_plain_values(payload)
    loaded = s2h.load(path, factory).eval()
    assert isinstance(loaded, s2h.S2HModel)
    assert [(g.name, g.channels, g.divisor) for g in loaded.groups] == [(g.name, g.channels, g.divisor)
                                                                       for g in model.groups]
    assert "layer3.0.conv1" not in [g.name for g in loaded.groups]
    torch.testing.assert_close(loaded.u, model.u)
    assert loaded.keep_counts() == model.keep_counts()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for br in ("soft", "hard", "dense"):
            with loaded.branch(br), model.branch(br):
                torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_save_load_exported_model(tmp_path):
    model = trained()
    exported = model.export().eval()
    path = tmp_path / "small.pt"
    s2h.save(exported, path)
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "s2h-exported" and _only_plain_values(payload)
    assert payload["widths"] == model.keep_counts()
    loaded = s2h.load(path, factory).eval()
    assert not any(isinstance(m, s2h.structured.S2H_LAYER_TYPES) for m in loaded.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), exported(x), rtol=0, atol=0)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in exported.parameters())


def test_load_errors(tmp_path):
    model = s2h.convert(factory(), torch.randn(1, 3, 32, 32))
    path = tmp_path / "m.pt"
    s2h.save(model, path)
    with pytest.raises(ValueError, match="dependency groups differ"):
        s2h.load(path, lambda: s2h.models.CifarResNet(20, 10))
    with pytest.raises(TypeError, match="must return an nn.Module"):
        s2h.load(path, lambda: "resnet56")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a file written by s2h.save"):
        s2h.load(tmp_path / "other.pt", factory)
    with pytest.raises(ValueError, match="expected an S2HModel"):
        s2h.save(nn.Linear(2, 2), tmp_path / "x.pt")
