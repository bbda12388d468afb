"""Channel masks, forward + backward, for all of ResNet-50's dependency groups in one call,
against eager per-group PyTorch (s2h_kernels.reference). `make bench`; ratios: benchmarks/report.py."""
import functools

import pytest
import torch
import torch_pruning as tp
import torchvision

import s2h_kernels
from s2h_kernels import reference


@functools.lru_cache(maxsize=None)
def resnet50_group_sizes() -> tuple[int, ...]:
    """Channel counts of ResNet-50's dependency groups, as Torch-Pruning finds them."""
    model = torchvision.models.resnet50()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 64, 64))
    groups = graph.get_all_groups(ignored_layers=[model.fc], root_module_types=[torch.nn.Conv2d])
    return tuple(len(g[0].idxs) for g in groups)


def packed_inputs(device):
    sizes = resnet50_group_sizes()
    offsets = torch.tensor([0] + list(torch.tensor(sizes).cumsum(0).tolist()), device=device)
    u = torch.randn(int(offsets[-1]), generator=torch.Generator().manual_seed(0)).to(device)
    grad_w = torch.randn(u.shape[0], generator=torch.Generator().manual_seed(1)).to(device)
    grad_e = torch.randn(len(sizes), generator=torch.Generator().manual_seed(2)).to(device)
    return u.requires_grad_(True), offsets, (grad_w, grad_e)


def step(fn, u, offsets, grads):
    """Forward, then backward from fixed cotangents on w and E (the trainer uses both)."""
    u.grad = None
    w, e, k = fn(u, offsets)
    torch.autograd.backward((w, e), grads)
    return u.grad


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
def test_masks_eager(benchmark, device):
    u, offsets, grads = packed_inputs(device)
    offs = offsets.tolist()
    benchmark.group = f"channel_masks resnet50 ({len(offs) - 1} groups, {offs[-1]} channels) {device}"
    grad = benchmark(step, lambda u, o: reference.channel_masks(u, offs), u, offsets, grads)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("device", DEVICES)
def test_masks_fused(benchmark, device):
    u, offsets, grads = packed_inputs(device)
    offs = offsets.tolist()
    benchmark.group = f"channel_masks resnet50 ({len(offs) - 1} groups, {offs[-1]} channels) {device}"
    grad = benchmark(step, s2h_kernels.channel_masks, u, offsets, grads)
    expected = step(lambda u, o: reference.channel_masks(u, offs), u.detach().clone().requires_grad_(True), offsets,
                    grads)
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)
