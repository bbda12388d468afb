"""Lean autograd for the C++ ops: what ``torch.library.register_autograd`` does, for hot small ops.

``register_autograd``'s generated Function fills defaults, walks pytrees and checks return counts
on every call: ~45 us per forward+backward on the development VM. The ops called once per training
step with microseconds of C++ work (channel masks, the KL gap) lose most of their speed-up to it.
:func:`register_lean_autograd` registers a plain ``autograd.Function`` as the op's Autograd kernel
(still Python, through ``torch.library``), and returns a function that enters it directly, skipping
the round trip through the dispatcher into a Python kernel (~20 us more).

The Function takes ``ctx`` in ``forward`` and defines no ``setup_context``: with one, torch 2.14
binds every call's arguments with ``inspect.signature`` (~60 us). torch.func transforms require
that form, so a twin with ``setup_context`` serves them.
"""
from __future__ import annotations

from typing import Callable

import torch

_LIB = torch.library.Library("s2h", "FRAGMENT")  # noqa: TOR901 (adds kernels to the C++ library's ops)


def register_lean_autograd(name: str, save: Callable, backward: Callable) -> Callable:
    """Autograd for the C++ op ``s2h::<name>``; returns ``call(*args)`` (the op, with autograd; under
    torch.compile, the op itself).

    ``save(ctx, inputs, output)`` keeps what backward needs; ``backward(ctx, *grads)`` returns one
    gradient (or None) per op input, with ``ctx.needs_input_grad`` indexed by op input.
    """
    op = getattr(torch.ops.s2h, name).default

    def below_autograd(keyset, *args):
        with torch._C._AutoDispatchBelowAutograd():
            if keyset is None:
                return op(*args)
            return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)

    def run_backward(ctx, *grads):
        full = ctx.needs_input_grad
        ctx.needs_input_grad = full[1:]  # without the keyset
        try:
            return (None, *backward(ctx, *grads))
        finally:
            ctx.needs_input_grad = full

    class Lean(torch.autograd.Function):
        @staticmethod
        def forward(ctx, keyset, *args):
            out = below_autograd(keyset, *args)
            save(ctx, args, out)
            return out

        backward = staticmethod(run_backward)

    class Transformable(torch.autograd.Function):
        @staticmethod
        def forward(keyset, *args):
            return below_autograd(keyset, *args)

        @staticmethod
        def setup_context(ctx, inputs, output):
            save(ctx, inputs[1:], output)

        backward = staticmethod(run_backward)

    Lean.__name__ = Lean.__qualname__ = f"{name}_autograd"
    Transformable.__name__ = Transformable.__qualname__ = f"{name}_autograd_transformable"

    def kernel(keyset, *args):
        if torch._C._are_functorch_transforms_active():
            return Transformable.apply(keyset, *args)
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return Lean.apply(keyset, *args)
        return below_autograd(keyset, *args)

    def call(*args):
        if torch.compiler.is_compiling():
            return op(*args)  # torch.compile traces the op itself (through the kernel registered above)
        return kernel(None, *args)

    _LIB.impl(name, kernel, "Autograd", with_keyset=True)
    return call
