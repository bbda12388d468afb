"""Issue 19, part 3: a step reads the device once (the keep counts); everything else waits on the device.

Counted on the CPU with a TorchDispatchMode: ``aten._local_scalar_dense`` (``.item()``, ``float(t)``,
``int(t)``, ``bool(t)``), the ops that synchronise on CUDA because their output size depends on the
data (``nonzero``, ``masked_select``, ``unique``...), and ``Tensor.tolist`` / ``Tensor.numpy``
(which do not dispatch). Adam's step counter lives on the CPU even for CUDA parameters (unless
``capturable``), so reading it is not a device read and is not counted.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import s2h
from s2h.structured.step import NonFiniteLossError, S2HPruner

pytestmark = pytest.mark.usefixtures("one_thread")

SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_dim",
           "unique_consecutive", "repeat_interleave"}


class CountReads(TorchDispatchMode):
    def __init__(self, exclude=()):
        super().__init__()
        self.exclude = {t.data_ptr() for t in exclude}
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNCING and not (args and isinstance(args[0], torch.Tensor) and args[0].data_ptr() in self.exclude):
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def count_reads(fn, exclude=(), monkeypatch=None):
    host = []
    for meth in ("tolist", "numpy"):
        orig = getattr(torch.Tensor, meth)

        def wrapped(self, *a, _orig=orig, _m=meth, **k):
            host.append(_m)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, meth, wrapped)
    with CountReads(exclude) as mode:
        out = fn()
    monkeypatch.undo()
    return out, mode.reads + host


def resnet():
    torch.manual_seed(0)
    net = s2h.models.build_model("resnet8", 10, 3, 16)
    return s2h.convert(net, torch.randn(2, 3, 16, 16), target_flops=0.3).train()


def adam_steps(tr):
    return [s["step"] for s in tr.mask_optimizer.state.values() if "step" in s]


@pytest.mark.parametrize("accumulate", [1, 2])
def test_one_device_read_per_step(monkeypatch, accumulate):
    m = resnet()
    tr = S2HPruner(m, torch.optim.SGD(m.weight_parameters(), lr=0.05, momentum=0.9), accumulate=accumulate,
                   clip_grad_norm=5.0)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    for _ in range(accumulate):
        tr.step(x, y)  # warm-up: optimizer states exist
    for i in range(accumulate):
        stats, reads = count_reads(lambda: tr.step(x, y), adam_steps(tr), monkeypatch)
        # the first micro-batch of an update reads the keep counts (and the checks); the others nothing
        assert reads == (["tolist"] if i == 0 else []), reads
    # statistics: tensors without a read, values in one read
    _, reads = count_reads(lambda: (stats.tensors["loss"], stats["keep"], stats["step"]), (), monkeypatch)
    assert reads == []
    vals, reads = count_reads(lambda: (stats["loss"], stats["hard_flops"], stats["grad_norm"]), (), monkeypatch)
    assert len(reads) == 1 and all(isinstance(v, float) for v in vals)
    _, reads = count_reads(lambda: dict(stats), (), monkeypatch)
    assert reads == []


def test_bad_labels_raise_at_the_next_read():
    m = resnet()
    tr = S2HPruner(m, torch.optim.SGD(m.weight_parameters(), lr=0.05))
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    tr.step(x, y)
    bad = y.clone()
    bad[2] = 12
    tr.step(x, bad)  # no read: the check waits on the device
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\).*\[\d+, 12\] \(step 1; found on the device"):
        tr.step(x, y)
    tr.step(x, y)  # raised once; training goes on
    bad[2] = -1
    st = tr.step(x, bad)
    with pytest.raises(ValueError, match=r"labels must be in .*step 3"):
        st["loss"]  # reading the stats is a read


def test_nan_raises_at_the_next_read_naming_its_step():
    m = resnet()
    tr = S2HPruner(m, torch.optim.SGD(m.weight_parameters(), lr=0.05))
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    tr.step(x, y)
    xn = x.clone()
    xn[0, 0, 0, 0] = float("nan")
    tr.step(xn, y)
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 1 .*whose update was applied") as ei:
        tr.sync()
    assert ei.value.step == 1
    tr.sync()  # nothing pending


def test_eager_checks_change_nothing():
    m = resnet()
    tr = S2HPruner(m, torch.optim.SGD(m.weight_parameters(), lr=0.05, momentum=0.9), eager_checks=True)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    tr.step(x, y)
    before = copy.deepcopy(m.state_dict())
    xn = x.clone()
    xn[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="step 1 .*nothing was updated"):
        tr.step(xn, y)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
