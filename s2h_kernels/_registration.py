"""One registration path for every s2h op (docs/DESIGN.md §5).

An op has up to two variants: the C++ op ``s2h::<name>`` (schema in csrc/ops.cpp, CPU and CUDA
kernels in C++) and the Triton op ``s2h::<name>_triton`` (schema and kernel defined here, in
Python, by :func:`define_triton_op`). :func:`register_op` gives every variant of an op the same
fake kernel and the same autograd formula, and returns, per variant, the function the public API
calls.

Autograd takes one of two paths, chosen once per process, the same for every op:

* **lean** (the default on the torch versions in :data:`LEAN_TORCH`): a plain
  ``autograd.Function`` registered as the op's Autograd kernel (still Python, through
  ``torch.library``), entered directly by the returned function. ``register_autograd``'s generated
  Function fills defaults, walks pytrees and checks return counts on every call, and the round trip
  through the dispatcher into a Python kernel adds more: for the ops called once per training step
  with microseconds of C++ work that overhead was most of the call (numbers in
  benchmarks/results/). The Function takes ``ctx`` in ``forward`` and defines no ``setup_context``
  (with one, torch binds every call's arguments with ``inspect.signature``); torch.func transforms
  need that form, so a twin with ``setup_context`` serves them. This path uses ``torch._C``
  internals (``_AutoDispatchBelowAutograd``, ``_after_autograd_keyset``,
  ``_are_functorch_transforms_active``, ``OpOverload.redispatch``), hence the version check.
* **generic**: ``torch.library.register_autograd``, on every other torch version, or when
  ``S2H_LEAN_AUTOGRAD=0``. Same formulas, same results; only slower per call.

``S2H_LEAN_AUTOGRAD``: unset (by torch version), ``0`` (generic), ``1`` (lean whenever the internals
exist, on any version). Read once, at import; any other value is an error.
"""
from __future__ import annotations

import os
from typing import Callable, Mapping, Sequence, Union

import torch

# torch versions [first, end) the lean path has been tested on (the suite passes with it).
LEAN_TORCH = ((2, 14), (2, 15))
LEAN_ENV = "S2H_LEAN_AUTOGRAD"

_LIB = torch.library.Library("s2h", "FRAGMENT")  # noqa: TOR901 (Triton ops, and kernels for the C++ ops)


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def _lean_internals_present() -> bool:
    return all(hasattr(torch._C, n) for n in
               ("_AutoDispatchBelowAutograd", "_after_autograd_keyset", "_are_functorch_transforms_active"))


def lean_autograd_enabled() -> bool:
    """Whether :func:`register_op` takes the lean path in this process (see the module docstring)."""
    env = os.environ.get(LEAN_ENV, "")
    if env not in ("", "0", "1"):
        raise ValueError(f"s2h_kernels: {LEAN_ENV}={env!r} is not one of '0', '1' (or unset)")
    if env == "0":
        return False
    if env == "1":
        return _lean_internals_present()
    return LEAN_TORCH[0] <= torch_version() < LEAN_TORCH[1] and _lean_internals_present()


LEAN = lean_autograd_enabled()


def define_triton_op(name: str, schema: str, impl: Callable) -> None:
    """Defines ``s2h::<name>`` (``schema`` is everything after the name) with the Python ``impl``
    for CUDA tensors and for CPU tensors (the Triton interpreter, ``TRITON_INTERPRET=1``)."""
    _LIB.define(name + schema)
    _LIB.impl(name, impl, "CUDA")
    _LIB.impl(name, impl, "CPU")


Backward = Callable[..., tuple]


def register_op(
    ops: Sequence[str],
    *,
    fake: Callable,
    setup_context: Callable | None = None,
    backward: Union[Backward, Mapping[str, Backward], None] = None,
) -> dict[str, Callable]:
    """Registers the variants ``ops`` of one op (e.g. ``("kl_gap", "kl_gap_triton")``) alike.

    Args:
        ops: the variants' names in the ``s2h`` namespace; they share one schema.
        fake: the fake (meta) kernel, for every variant.
        setup_context: ``(ctx, inputs, output)``, keeps what backward needs (inputs as the op takes them).
        backward: ``(ctx, *grads)`` -> one gradient (or None) per op input, for every variant, or a
            mapping from variant name to its own backward (e.g. one that calls that variant's
            backward kernel). None: the op has no autograd (inference only).

    Returns:
        ``{variant: call}``: ``call(*args)`` runs the op with autograd. Under torch.compile it is the
        op itself; on the generic path always the op.
    """
    if (backward is None) != (setup_context is None):
        raise ValueError("register_op: give both setup_context and backward, or neither")
    calls = {}
    for name in ops:
        op = getattr(torch.ops.s2h, name).default
        torch.library.register_fake(f"s2h::{name}", fake, lib=_LIB)
        if backward is None:
            calls[name] = op
            continue
        bwd = backward[name] if isinstance(backward, Mapping) else backward
        if LEAN:
            calls[name] = _register_lean(name, op, setup_context, bwd)
        else:
            torch.library.register_autograd(f"s2h::{name}", bwd, setup_context=setup_context, lib=_LIB)
            calls[name] = op
    return calls


def register_fake(names: Sequence[str], fake: Callable) -> None:
    """The fake kernel of helper ops that are not called through autograd (backward kernels)."""
    for name in names:
        torch.library.register_fake(f"s2h::{name}", fake, lib=_LIB)


def _register_lean(name: str, op, save: Callable, backward: Backward) -> Callable:
    """The lean Autograd kernel of ``s2h::<name>`` (module docstring); returns the direct call."""

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
