"""channel_masks: every backend against the pure-PyTorch reference (docs/DESIGN.md §2)."""
import pytest
import torch

import s2h_kernels
from s2h_kernels import _cpu_config, reference

# (offsets, divisors): a mix of sizes and divisors, one single-bucket group, one > one chunk.
LAYOUTS = [
    ([0, 1], [1]),
    ([0, 5, 12, 13, 40], [1, 2, 4, 3]),
    ([0, 300, 317], [1, 8]),
]


def make_u(offsets, dtype, device, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(offsets[-1], generator=g, dtype=torch.float64)).to(dtype).to(device)


def run_both(u, offsets, divisors, temperature, hard_width, backend):
    """Forward and a random-cotangent backward for the op and the reference."""
    u1 = u.detach().clone().requires_grad_(True)
    u2 = u.detach().clone().requires_grad_(True)
    out = s2h_kernels.channel_masks(u1, offsets, temperature, divisors, hard_width, backend=backend)
    ref = reference.channel_masks(u2, offsets, temperature, divisors, hard_width)
    g = torch.Generator().manual_seed(1)
    gw = torch.randn(ref[0].shape, generator=g, dtype=torch.float64).to(u.dtype).to(u.device)
    ge = torch.randn(ref[1].shape, generator=g, dtype=torch.float64).to(u.dtype).to(u.device)
    ((out[0] * gw).sum() + (out[1] * ge).sum()).backward()
    ((ref[0] * gw).sum() + (ref[1] * ge).sum()).backward()
    return out, ref, u1.grad, u2.grad


_LEVELS = ("scalar", "avx2", "avx512")
# The CPU kernel's blocks are one vector (4, 8 or 16 floats): groups shorter than a block, of whole
# blocks, of whole blocks and a partial one, and of many blocks.
ISA_LAYOUTS = LAYOUTS + [([0, 16, 48, 63, 64, 600], [1, 1, 2, 1, 3])]


@pytest.mark.parametrize("isa", [pytest.param(i, marks=pytest.mark.skipif(
    _LEVELS.index(i) > _LEVELS.index(_cpu_config.best_isa()), reason=f"CPU lacks {i}")) for i in _LEVELS])
@pytest.mark.parametrize("offsets,divisors", ISA_LAYOUTS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize("hard_width", ["threshold", "expected"])
def test_cpu_isa_levels_match_reference(cpu_env, isa, offsets, divisors, dtype, tol, hard_width):
    """Every ISA level of the CPU kernels (S2H_CPU_ISA), forward and backward, against the fp64
    reference of the same values (bfloat16 computes in fp32 and rounds once). The long groups'
    gradients sum hundreds of terms, so their absolute tolerance scales with the largest one."""
    cpu_env(S2H_CPU_ISA=isa)
    assert _cpu_config.active_isa() == isa
    u = make_u(offsets, dtype, torch.device("cpu"), seed=5)
    (w, e, k), _, gu, _ = run_both(u, offsets, divisors, 0.7, hard_width, "cpu")
    # The fp64 oracle, with run_both's cotangents as u's dtype rounds them.
    u64 = u.double().requires_grad_(True)
    wr, er, kr = reference.channel_masks(u64, offsets, 0.7, divisors, hard_width)
    g = torch.Generator().manual_seed(1)
    gw = torch.randn(wr.shape, generator=g, dtype=torch.float64).to(dtype).double()
    ge = torch.randn(er.shape, generator=g, dtype=torch.float64).to(dtype).double()
    (gr,) = torch.autograd.grad((wr * gw).sum() + (er * ge).sum(), u64)
    wr, er = wr.detach(), er.detach()
    assert w.dtype == e.dtype == gu.dtype == dtype
    torch.testing.assert_close((w.double(), e.double()), (wr, er), rtol=tol, atol=tol / 10)
    scale = max(1.0, gr.abs().max().item())
    torch.testing.assert_close(gu.double(), gr, rtol=4 * tol, atol=tol / 10 * scale)
    assert torch.equal(k, kr)


@pytest.mark.parametrize("offsets,divisors", LAYOUTS)
@pytest.mark.parametrize("hard_width", ["threshold", "expected"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(backend, device_for, offsets, divisors, hard_width, dtype):
    u = make_u(offsets, dtype, device_for(backend))
    (w, e, k), (wr, er, kr), gu, gr = run_both(u, offsets, divisors, 0.7, hard_width, backend)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    assert w.dtype == dtype and e.dtype == dtype and k.dtype == torch.int64
    torch.testing.assert_close(w, wr, **tol)
    torch.testing.assert_close(e, er, **tol)
    assert k.tolist() == kr.tolist()
    torch.testing.assert_close(gu, gr, **tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_half_precision(backend, device_for, dtype, tol):
    """Half inputs are computed in fp32: the result equals the fp32 reference rounded once."""
    offsets, divisors = LAYOUTS[1]
    u = make_u(offsets, dtype, device_for(backend))
    (w, e, k), _, gu, _ = run_both(u, offsets, divisors, 1.0, "threshold", backend)
    (wr, er, kr), _, gr, _ = run_both(u.float(), offsets, divisors, 1.0, "threshold", backend)
    wr_ref = reference.channel_masks(u.float(), offsets, 1.0, divisors)[0]
    assert w.dtype == dtype
    torch.testing.assert_close(w.float(), wr_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(e.float(), er, rtol=tol, atol=tol)
    torch.testing.assert_close(gu.float(), gr, rtol=4 * tol, atol=4 * tol)
    assert k.tolist() == kr.tolist()


def test_gradcheck_fp64(backend, device_for):
    offsets, divisors = [0, 4, 7, 8], [2, 1, 3]
    u = make_u(offsets, torch.float64, device_for(backend)).requires_grad_(True)

    def f(u):
        w, e, _ = s2h_kernels.channel_masks(u, offsets, 0.5, divisors, backend=backend)
        return w, e

    assert torch.autograd.gradcheck(f, (u,), eps=1e-6, atol=1e-8)


def test_paper_definitions(backend, device_for):
    """Independent of the reference: w is a reverse cumsum of a softmax, E sums w, k is a prefix."""
    offsets, divisors = [0, 6, 9], [1, 2]
    u = make_u(offsets, torch.float64, device_for(backend), seed=3)
    w, e, k = s2h_kernels.channel_masks(u, offsets, 1.0, divisors, backend=backend)
    p0 = torch.softmax(u[0:6], 0)
    w0 = torch.tensor([p0[j:].sum() for j in range(6)], dtype=torch.float64)
    torch.testing.assert_close(w[:6].cpu(), w0.to(w.dtype))
    assert abs(w[0].item() - 1.0) < 1e-12
    assert torch.all(w[:6][1:] <= w[:6][:-1])
    torch.testing.assert_close(e.cpu(), torch.stack([w[:6].sum(), w[6:].sum()]).cpu())
    assert k[0].item() == int((w0 >= w0.mean()).sum())
    assert k[1].item() % 2 == 0 and 2 <= k[1].item() <= 6


@pytest.mark.parametrize(
    "case",
    ["one_channel", "4096_channels", "peaked", "flat_odd", "flat_even", "tiny_tau", "masked_bucket"],
)
def test_edge_cases(backend, device_for, case):
    dev = device_for(backend)
    temperature, offsets, divisors = 1.0, None, None
    if case == "one_channel":
        u, offsets = torch.tensor([0.3]), [0, 1]
    elif case == "4096_channels":
        u, offsets = make_u([0, 4096], torch.float32, "cpu"), [0, 4096]
    elif case == "peaked":
        u, offsets = torch.tensor([0.0, 0.0, 80.0, 0.0, 0.0, -80.0]), [0, 6]
    elif case == "flat_odd":
        u, offsets = torch.zeros(7), [0, 7]  # bucket 4 sits exactly on mean(w)
    elif case == "flat_even":
        u, offsets, divisors = torch.zeros(10), [0, 4, 10], [3, 1]
    elif case == "tiny_tau":
        u, offsets, temperature = make_u([0, 50], torch.float32, "cpu"), [0, 50], 1e-3
    else:
        u, offsets = torch.tensor([1.0, float("-inf"), 0.5, 0.2]), [0, 4]
    (w, e, k), (wr, er, kr), gu, gr = run_both(u.to(dev), offsets, divisors, temperature, "threshold", backend)
    torch.testing.assert_close(w, wr, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(e, er, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gu, gr, rtol=1e-4, atol=1e-5)
    assert k.tolist() == kr.tolist()
    assert torch.isfinite(w).all() and torch.isfinite(gu).all()
    if case == "one_channel":
        assert w.tolist() == [1.0] and k.tolist() == [1] and gu.abs().max() < 1e-7
    if case == "flat_odd":
        assert k.tolist() == [4]
    if case == "peaked":  # all mass on bucket 3: exactly three buckets kept
        assert k.tolist() == [3] and abs(e.item() - 3.0) < 1e-5


def test_expected_hard_width_rounds_up_to_divisor(backend, device_for):
    u = torch.tensor([0.0, 0.0, 5.0, 0.0], device=device_for(backend))
    w, e, k = s2h_kernels.channel_masks(u, [0, 4], 1.0, [4], "expected", backend=backend)
    assert k.item() == 4 * int(torch.ceil(e / 4 - 1e-5).item())


def test_nan_in_one_group(backend, device_for):
    """Documented: NaN makes that group's w and E NaN and its keep one bucket; others untouched."""
    u = make_u([0, 4, 9], torch.float32, device_for(backend))
    u[5] = float("nan")
    w, e, k = s2h_kernels.channel_masks(u, [0, 4, 9], 1.0, [1, 2], backend=backend)
    wr, er, kr = reference.channel_masks(u[:4], [0, 4])
    torch.testing.assert_close(w[:4], wr)
    assert torch.isnan(w[4:]).all() and torch.isnan(e[1])
    assert k.tolist() == [kr.item(), 2]


@pytest.mark.parametrize("op_name", ["channel_masks", "channel_masks_triton"])
def test_opcheck(op_name):
    op = getattr(torch.ops.s2h, op_name)
    offsets = torch.tensor([0, 5, 12, 13])
    divisors = torch.tensor([1, 2, 4])
    u = make_u([0, 13], torch.float32, "cpu").requires_grad_(True)
    torch.library.opcheck(op, (u, offsets, divisors, 0.7, 0, 23))
    torch.library.opcheck(op, (u, offsets, torch.ones(3, dtype=torch.int64), 1.0, 1, 13))


@pytest.mark.parametrize("compile_backend", ["cpu", "triton"])
def test_torch_compile_fullgraph(compile_backend):
    offsets = torch.tensor([0, 5, 12, 13])

    def loss(u):
        w, e, k = s2h_kernels.channel_masks(u, offsets, 0.7, backend=compile_backend)
        return (w * torch.arange(13.0)).sum() + e.pow(2).sum(), k

    u = make_u([0, 13], torch.float32, "cpu").requires_grad_(True)
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    out, k = compiled(u)
    (g,) = torch.autograd.grad(out, u)
    ur = u.detach().clone().requires_grad_(True)
    wr, er, kr = reference.channel_masks(ur, offsets, 0.7)
    ref = (wr * torch.arange(13.0)).sum() + er.pow(2).sum()
    (gr,) = torch.autograd.grad(ref, ur)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g, gr)
    assert k.tolist() == kr.tolist()


def test_torch_compile_inductor_cpu():
    offsets = torch.tensor([0, 3, 8])

    @torch.compile(fullgraph=True)
    def masks(u):
        w, e, k = s2h_kernels.channel_masks(u, offsets, backend="cpu")
        return w * 2, e

    u = make_u([0, 8], torch.float32, "cpu")
    w, e = masks(u)
    wr, er, _ = reference.channel_masks(u, offsets)
    torch.testing.assert_close(w, 2 * wr)
    torch.testing.assert_close(e, er)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(u=torch.zeros(5), offsets=[0, 3, 4]), "end at u's length 5"),
        (dict(u=torch.zeros(5), offsets=[0, 3, 3, 5]), "group 1 is empty"),
        (dict(u=torch.zeros(5, dtype=torch.int64), offsets=[0, 5]), "floating-point"),
        (dict(u=torch.zeros(5), offsets=torch.tensor([0.0, 5.0])), "offsets must be int64"),
        (dict(u=torch.zeros(5), offsets=torch.tensor([0, 5], device="meta")), "different devices"),
        (dict(u=torch.zeros(5, 1), offsets=[0, 5]), "1-D"),
        (dict(u=torch.zeros(5), offsets=[0, 5], divisors=[0]), "divisors\\[0\\] must be >= 1"),
        (dict(u=torch.zeros(5), offsets=[0, 2, 5], divisors=[1]), "divisors has 1 entries for 2 groups"),
        (dict(u=torch.zeros(5), offsets=[0, 5], temperature=0.0), "temperature"),
        (dict(u=torch.zeros(5), offsets=[0, 5], hard_width="median"), "hard_width"),
        (dict(u=torch.zeros(5), offsets=[0, 5], backend="cuda"), "backend 'cuda' needs CUDA tensors"),
        (dict(u=torch.zeros(5), offsets=[0, 5], backend="tpu"), "unknown backend"),
    ],
)
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        s2h_kernels.channel_masks(**kwargs)


def test_layout_tensors_validated_once_then_on_change(monkeypatch):
    """A layout given as tensors is read on the host (validated) on its first use, not on every call;
    again after an in-place write to offsets or divisors, or for a u of another length."""
    import importlib

    module = importlib.import_module("s2h_kernels.channel_masks")
    reads = []
    check = module._check_layout
    monkeypatch.setattr(module, "_check_layout", lambda *a: reads.append(1) or check(*a))
    offsets, divisors = torch.tensor([0, 5, 12]), torch.tensor([1, 2])
    u = make_u([0, 12], torch.float32, "cpu")
    for _ in range(3):
        w, e, k = s2h_kernels.channel_masks(u, offsets, 0.7, divisors)
    assert len(reads) == 1 and w.shape == (19,)
    divisors[1] = 3  # in place: read again, and the new channel count is used
    w, e, k = s2h_kernels.channel_masks(u, offsets, 0.7, divisors)
    wr, er, kr = reference.channel_masks(u, [0, 5, 12], 0.7, [1, 3])
    assert len(reads) == 2
    torch.testing.assert_close((w, e), (wr, er))
    assert k.tolist() == kr.tolist()
    with pytest.raises(ValueError, match="end at u's length 13"):
        s2h_kernels.channel_masks(make_u([0, 13], torch.float32, "cpu"), offsets, 0.7, divisors)
    offsets[2] = 5  # group 1 now empty
    with pytest.raises(ValueError, match="group 1 is empty"):
        s2h_kernels.channel_masks(u[:5], offsets, 0.7, divisors)


def test_cpp_op_checks_layout_itself():
    """Called directly, the C++ op rejects a layout that would read out of bounds."""
    with pytest.raises(RuntimeError, match="offsets\\[-1\\]"):
        torch.ops.s2h.channel_masks(torch.zeros(5), torch.tensor([0, 7]), torch.tensor([1]), 1.0, 0, 7)
    with pytest.raises(RuntimeError, match="num_channels"):
        torch.ops.s2h.channel_masks(torch.zeros(5), torch.tensor([0, 5]), torch.tensor([2]), 1.0, 0, 5)


def test_torch_func_grad_on_cpu():
    """torch.func.grad through the op (CPU, default divisors) equals it through the reference."""
    u = make_u([0, 4, 10], torch.float64, "cpu")
    weights = torch.linspace(-1.0, 2.0, 10, dtype=torch.float64)

    def objective(impl):
        def f(u):
            w, e, _ = impl(u, [0, 4, 10])
            return (w * weights).sum() + e.pow(2).sum()
        return f

    got = torch.func.grad(objective(s2h_kernels.channel_masks))(u)
    want = torch.func.grad(objective(reference.channel_masks))(u)
    torch.testing.assert_close(got, want)


def test_tie_tolerance_is_defined_once():
    """TIE_RTOL lives in the reference; the op, the Triton launcher and the compiled C++
    (kMaskTieRtol, read back through a test-only op) all use that one value."""
    import importlib

    op_module = importlib.import_module("s2h_kernels.channel_masks")  # the package exports the function
    ref_module = importlib.import_module("s2h_kernels.reference.channel_masks")

    assert op_module.TIE_RTOL is ref_module.TIE_RTOL
    assert torch.ops.s2h_internal.mask_tie_rtol() == ref_module.TIE_RTOL
    pytest.importorskip("triton")
    from s2h_kernels._triton import channel_masks as triton_module

    assert triton_module.TIE_RTOL is ref_module.TIE_RTOL


def test_triton_gpu_config_under_the_interpreter(monkeypatch):
    """The GPU's chunk size (launch_config(..., interpreted=False): 1024 buckets) run by the
    interpreter, on groups below, at and above one chunk: the interpreted tests otherwise use 128."""
    pytest.importorskip("triton")
    from s2h_kernels._triton import channel_masks as K

    gpu = K.launch_config(torch.float32, interpreted=False)
    assert gpu["BLOCK"] == 1024 and K.launch_config(torch.float32, interpreted=True)["BLOCK"] == 128
    monkeypatch.setattr(K, "INTERPRETED_CONFIG", gpu)
    offsets, divisors = [0, 5, 1029, 1030, 2200], [1, 2, 3, 1]
    for dtype in (torch.float32, torch.float64):
        u = make_u(offsets, dtype, "cpu", seed=4)
        out, ref, gu, gref = run_both(u, offsets, divisors, 0.8, "threshold", "triton")
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        for a, b in zip(out, ref):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
        torch.testing.assert_close(gu, gref, rtol=tol, atol=tol)
