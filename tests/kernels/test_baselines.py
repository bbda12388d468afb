"""The benchmarks' best-eager baselines (benchmarks/baselines.py) equal the references
(s2h_kernels.reference) in values and gradients, so that a speed ratio against them compares equal work.
Also their torch.compile forms, on one small case each."""
import os
import sys

import pytest
import torch

from s2h_kernels import reference

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import baselines  # noqa: E402


def _masks_case(sizes, seed, dtype=torch.float64, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    u = (scale * torch.randn(offsets[-1], generator=g)).to(dtype)
    return u, offsets


def _masks_grads(fn, u, offsets, gw, ge, **kw):
    u = u.detach().clone().requires_grad_(True)
    w, e, k = fn(u, offsets, **kw)
    torch.autograd.backward((w, e), (gw, ge))
    return w.detach(), e.detach(), k, u.grad


@pytest.mark.parametrize("fn", [baselines.channel_masks_eager, baselines.channel_masks_autograd,
                                baselines.channel_masks_flat, baselines.channel_masks_flat_cf],
                         ids=["closed_form", "autograd", "flat", "flat_closed_form"])
@pytest.mark.parametrize("hard_width", ["threshold", "expected"])
@pytest.mark.parametrize("divisors", [None, "mixed"])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_channel_masks_baseline(fn, hard_width, divisors, temperature):
    sizes = [1, 3, 8, 64, 17, 2, 256]
    u, offsets = _masks_case(sizes, seed=len(sizes))
    div = None if divisors is None else [1, 2, 4, 1, 3, 8, 2]
    n_ch = sum(n * d for n, d in zip(sizes, div or [1] * len(sizes)))
    g = torch.Generator().manual_seed(7)
    gw = torch.randn(n_ch, generator=g, dtype=torch.float64)
    ge = torch.randn(len(sizes), generator=g, dtype=torch.float64)
    kw = dict(temperature=temperature, divisors=div, hard_width=hard_width)
    got = _masks_grads(fn, u, offsets, gw, ge, **kw)
    ref = _masks_grads(reference.channel_masks, u, offsets, gw, ge, **kw)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fn", [baselines.channel_masks_eager, baselines.channel_masks_flat,
                                baselines.channel_masks_flat_cf], ids=["padded", "flat", "flat_closed_form"])
def test_channel_masks_baseline_resnet50_fp32(fn):
    """ResNet-50's group sizes (the benchmark), fp32."""
    sizes = [64] * 7 + [128] * 8 + [256] * 12 + [512] * 6 + [256, 512, 1024, 2048]
    u, offsets = _masks_case(sizes, seed=0, dtype=torch.float32, scale=1.0)
    g = torch.Generator().manual_seed(1)
    gw, ge = torch.randn(u.shape[0], generator=g), torch.randn(len(sizes), generator=g)
    got = _masks_grads(fn, u, offsets, gw, ge)
    ref = _masks_grads(reference.channel_masks, u, offsets, gw, ge)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _kl_case(B, C, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(B, C, generator=g, dtype=dtype)), (3 * torch.randn(B, C, generator=g, dtype=dtype))


@pytest.mark.parametrize("fn", [baselines.kl_gap_with_grads_eager, baselines.kl_gap_with_grads_autograd],
                         ids=["closed_form", "autograd"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum"])
@pytest.mark.parametrize("T", [1.0, 2.5])
@pytest.mark.parametrize("B,C", [(1, 2), (7, 10), (64, 1000)])
def test_kl_gap_with_grads_baseline(fn, reduction, T, B, C):
    s, h = _kl_case(B, C)
    got = fn(s.clone(), h.clone(), T, reduction)
    ref = reference.kl_gap_with_grads(s, h, T, reduction)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("detach", ["none", "soft", "hard"])
def test_kl_gap_baseline_autograd(detach):
    s, h = _kl_case(16, 100, seed=3)
    out = []
    for fn in (baselines.kl_gap_eager, reference.kl_gap):
        ss, hh = s.clone().requires_grad_(detach != "soft"), h.clone().requires_grad_(detach != "hard")
        loss = fn(ss, hh, 2.0, "batchmean")
        (1.7 * loss).backward()
        out.append((loss.detach(), ss.grad, hh.grad))
    for a, b in zip(*out):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("standardize", [True, False])
@pytest.mark.parametrize("gamma", [None, 0.3])
@pytest.mark.parametrize("B,C", [(4, 2), (32, 100), (8, 3000)])
def test_ca_kld_baseline(standardize, gamma, B, C):
    zs, zt = _kl_case(B, C, seed=5)
    out = []
    for fn in (baselines.ca_kld_eager, reference.ca_kld):
        s = zs.clone().requires_grad_(True)
        loss = fn(s, zt, 4.0, gamma=gamma, standardize=standardize)
        (0.9 * loss).backward()
        out.append((loss.detach(), s.grad))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_ca_kld_baseline_sum_fp32():
    zs, zt = _kl_case(64, 1000, seed=6, dtype=torch.float32)
    out = []
    for fn in (baselines.ca_kld_eager, reference.ca_kld):
        s = zs.clone().requires_grad_(True)
        loss = fn(s, zt, 4.0, reduction="sum")
        loss.backward()
        out.append((loss.detach(), s.grad))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-4, atol=1e-7)


def test_baselines_catch_a_wrong_gradient():
    """The comparison can fail: a closed form with the wrong sign of the E term differs."""
    u, offsets = _masks_case([5, 9], seed=2)
    gw, ge = torch.zeros(14, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    got = _masks_grads(baselines.channel_masks_eager, u, offsets, gw, ge)[3]
    ref = _masks_grads(reference.channel_masks, u, offsets, gw, -ge)[3]
    assert not torch.allclose(got, ref)


@pytest.mark.slow
def test_compiled_baselines():
    """torch.compile (inductor) of the best-eager code gives the same values and gradients."""
    u, offsets = _masks_case([3, 8, 64], seed=1, dtype=torch.float32)
    gw, ge = torch.randn(75), torch.randn(3)
    cm = torch.compile(baselines.channel_masks_for(offsets))
    got = _masks_grads(lambda u, o: cm(u), u, offsets, gw, ge)
    ref = _masks_grads(reference.channel_masks, u, offsets, gw, ge)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    s, h = _kl_case(32, 100, dtype=torch.float32)
    ck = torch.compile(baselines.kl_gap_with_grads_eager)
    for a, b in zip(ck(s, h), reference.kl_gap_with_grads(s, h)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
