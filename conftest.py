"""Test set-up shared by tests/ and benchmarks/.

TRITON_INTERPRET must be set before triton.jit decorates anything, so it is set here, before any
test module imports s2h_kernels: without a GPU the Triton kernels run on the CPU interpreter.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Every backend, checked against the same reference. "cuda" runs only where a GPU exists.
BACKEND_PARAMS = [
    pytest.param("cpu", id="cpu"),
    pytest.param("triton", id="triton"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
]


@pytest.fixture(params=BACKEND_PARAMS)
def backend(request):
    return request.param


@pytest.fixture
def device_for():
    """The device a backend's tensors live on: Triton runs CPU tensors under the interpreter."""

    def pick(backend: str) -> torch.device:
        if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
            return torch.device("cuda")
        return torch.device("cpu")

    return pick
