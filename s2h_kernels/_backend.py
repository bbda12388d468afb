"""Backend choice per op: CPU tensors -> C++; CUDA tensors -> Triton by default, CUDA C++ on request.

Triton also runs CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was imported: that
is how the Triton kernels are tested on machines without a GPU. triton is optional: without it,
``backend="triton"`` (and the default on CUDA tensors) raises an ImportError that says to install it.
"""
from __future__ import annotations

import os

import torch

from . import _triton

BACKENDS = ("cpu", "cuda", "triton")


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cuda_kernels_built() -> bool:
    """True when s2h_kernels._C was compiled with CUDA kernels (a toolkit was found at build time)."""
    from . import _C  # noqa: F401  (loads the registrations)

    return torch._C._dispatch_has_kernel_for_dispatch_key("s2h::channel_masks", "CUDA")


def resolve_backend(backend: str | None, device: torch.device, op: str) -> str:
    """The backend that runs ``op`` on ``device``; a clear error when it cannot."""
    if backend is None:
        if device.type != "cuda":
            return "cpu"
        backend = "triton"
    elif backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"{op}: backend 'cpu' needs CPU tensors, got tensors on {device}")
    if backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"{op}: backend 'cuda' needs CUDA tensors, got tensors on {device}")
        if not cuda_kernels_built():
            raise RuntimeError(f"{op}: s2h_kernels was built without CUDA kernels (S2H_SKIP_CUDA=1 or no toolkit)")
    if backend == "triton" and not _triton.available():
        raise ImportError(_triton.missing_message(op))
    if backend == "triton" and device.type != "cuda" and not triton_interpreted():
        raise ValueError(
            f"{op}: backend 'triton' needs CUDA tensors, got tensors on {device} "
            "(set TRITON_INTERPRET=1 before importing triton to run Triton kernels on the CPU)"
        )
    return backend


def check_same_device(op: str, **tensors: torch.Tensor) -> torch.device:
    """All named tensors on one device, or a ValueError naming them."""
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"{op}: tensors are on different devices ({listing})")
    return next(iter(devices.values()))


def check_float(op: str, name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        raise ValueError(f"{op}: {name} must be a floating-point tensor, got dtype {t.dtype}")
