"""vit_cifar (the paper's CIFAR ViT, 32x32, patch 4): the S2H training step and the exported model.

Groups (the test with "eager" in its name is each group's baseline; ratios: benchmarks/report.py):
* one S2H training step at ~15% hard FLOPs: the fused minimal-work ``S2HPruner.step`` against the
  literal Algorithm 1 (``S2HReference``: masked full-width hard network, three backward calls), with a
  plain dense AdamW step for scale (DESIGN §2: (4 + 3f)F against 7F, and 3F for dense);
* inference: the exported model at ~15% FLOPs (fewer heads, narrower MLPs, plain modules) against
  the dense vit_cifar.
Every test also checks its result against the baseline's.

    pytest benchmarks/test_bench_vit.py --benchmark-only --benchmark-json=benchmarks/results/vit_cpu.json
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import s2h
from bench_common import widths_at
from s2h.models import vit_cifar

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
TARGET = 0.15
BATCH = {"cpu": 16, "cuda": 128}


_CASE = {}


def case():
    """(dense vit_cifar, converted at ~15% FLOPs, the ratio): built once."""
    if not _CASE:
        torch.manual_seed(0)
        net = vit_cifar(num_classes=100).eval()
        model = s2h.convert(net, torch.randn(1, 3, 32, 32), target_flops=TARGET)
        ratio = widths_at(model)
        _CASE["v"] = (net, model, ratio)
    return _CASE["v"]


def batch(device, n):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 32, 32, generator=g).to(device), torch.randint(0, 100, (n,), generator=g).to(device)


# ------------------------------------------------------------------ training step


def _pruner(cls, device):
    _, model, _ = case()
    m = copy.deepcopy(model).train().to(device)
    with torch.no_grad():  # softer logits than the 0/1 peaks, same hard widths: the soft masks have gradients
        m.u.mul_(0.1)
    opt = torch.optim.AdamW(m.weight_parameters(), lr=1e-3, weight_decay=0.05)
    return cls(m, opt, mask_lr=0.01, ce_coef=1.0, gap_coef=1.0)  # Transformers: θ coefficients 1 and 1 (A4)


def _group(device, n):
    _, _, ratio = case()
    return f"vit_cifar S2H train step, hard at {ratio:.1%} FLOPs, batch {n}, {device}"


@pytest.mark.parametrize("device", DEVICES)
def test_vit_step_eager_reference(benchmark, device):
    from s2h.structured.reference import S2HReference

    n = BATCH[device]
    pruner = _pruner(S2HReference, device)
    x, y = batch(device, n)
    benchmark.group = _group(device, n)
    stats = benchmark(pruner.step, x, y)
    assert stats["hard_flops"] < 0.2


@pytest.mark.parametrize("device", DEVICES)
def test_vit_step_fused(benchmark, device):
    from s2h.structured.reference import S2HReference
    from s2h.structured.step import S2HPruner

    n = BATCH[device]
    pruner = _pruner(S2HPruner, device)
    x, y = batch(device, n)
    benchmark.group = _group(device, n)
    stats = benchmark(pruner.step, x, y)
    assert stats["hard_flops"] < 0.2
    # one step from the same state: the fused step and the literal algorithm compute the same gradients
    # (left in .grad by the step; the AdamW update itself would amplify rounding where a gradient is ~0)
    a, b = _pruner(S2HPruner, device), _pruner(S2HReference, device)
    sa, sb = a.step(x, y), b.step(x, y)
    assert sa["keep"] == sb["keep"]
    assert sa["loss"] == pytest.approx(sb["loss"], rel=1e-4)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-4 * float(q.grad.abs().max()))


@pytest.mark.parametrize("device", DEVICES)
def test_vit_step_dense_adamw(benchmark, device):
    """For scale: one plain dense training step (forward, backward, AdamW) of the unpruned vit_cifar."""
    net, _, _ = case()
    net = copy.deepcopy(net).train().to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.05)
    n = BATCH[device]
    x, y = batch(device, n)
    benchmark.group = _group(device, n)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    assert torch.isfinite(benchmark(step))


# ------------------------------------------------------------------ exported inference


_EXPORTED = {}


def exported():
    if not _EXPORTED:
        net, model, ratio = case()
        _EXPORTED["v"] = (net, model.eval(), model.export().eval(), ratio)
    return _EXPORTED["v"]


@pytest.mark.parametrize("device", DEVICES)
def test_vit_infer_eager_dense(benchmark, device):
    net, _, _, ratio = exported()
    net = copy.deepcopy(net).to(device)
    x, _ = batch(device, 2 * BATCH[device])
    benchmark.group = f"inference vit_cifar batch {x.shape[0]}, exported at {ratio:.1%} FLOPs, {device}"
    with torch.no_grad():
        y = benchmark(net, x)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("device", DEVICES)
def test_vit_infer_exported(benchmark, device):
    _, model, small, ratio = exported()
    small = copy.deepcopy(small).to(device)
    x, _ = batch(device, 2 * BATCH[device])
    benchmark.group = f"inference vit_cifar batch {x.shape[0]}, exported at {ratio:.1%} FLOPs, {device}"
    with torch.no_grad():
        y = benchmark(small, x)
        ref_model = copy.deepcopy(model).to(device)
        with ref_model.branch("hard"):
            ref = ref_model(x)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4 * max(1.0, float(ref.abs().max())))
