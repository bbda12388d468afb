"""Channel masks, forward + backward, for all of ResNet-50's dependency groups in one call: the fused op
against the reference (per-group eager loop, s2h_kernels.reference), the best eager code a PyTorch
expert would write (benchmarks/baselines.py: segmented or padded, closed-form backward) and
torch.compile of the reference and of the best eager code (compile time excluded, in
``extra_info["compile_s"]``). `make bench`; ratios: benchmarks/report.py (against each baseline and
the fastest). Interleaved ratios in one process: ``python benchmarks/baselines.py``."""
import functools
import time

import pytest
import torch
import torch_pruning as tp
import torchvision

import baselines
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


def impls(offs):
    """name -> (fn(u, offsets) -> (w, E, keep), compile?)"""
    return {
        "fused": (s2h_kernels.channel_masks, False),
        "reference": (lambda u, o: reference.channel_masks(u, offs), False),
        "best_eager_segmented": (baselines.channel_masks_flat_cf, False),
        "best_eager_padded": (baselines.channel_masks_eager, False),
        "compiled_reference": (lambda u, o: reference.channel_masks(u, offs), True),
        "compiled_best_eager_segmented": (baselines.channel_masks_for(offs, closed_form="flat"), True),
        "compiled_best_eager_padded": (baselines.channel_masks_for(offs, closed_form=True), True),
    }


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
IMPLS = list(impls([0, 1]))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device", DEVICES)
def test_masks(benchmark, device, impl):
    u, offsets, grads = packed_inputs(device)
    offs = offsets.tolist()
    benchmark.group = f"channel_masks resnet50 ({len(offs) - 1} groups, {offs[-1]} channels) {device} " \
                      f"{torch.get_num_threads()}t"
    fn, comp = impls(offs)[impl]
    if comp:
        f = fn if impl == "compiled_reference" else (lambda u_, o, fn=fn: fn(u_))
        cf = torch.compile(f)
        t0 = time.perf_counter()
        step(cf, u, offsets, grads)
        benchmark.extra_info["compile_s"] = round(time.perf_counter() - t0, 2)
        fn = cf
    grad = benchmark(step, fn, u, offsets, grads).clone()
    expected = step(lambda u, o: reference.channel_masks(u, offs), u.detach().clone().requires_grad_(True), offsets,
                    grads)
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)
