"""kl_gap and ca_kld: every backend against the reference, the paper's eager forms and gradcheck.

docs/DESIGN.md §2 (fused KL gap with split-detach gradients) and §3 (CA-KLD). Triton runs under the
interpreter on the CPU, so its shapes stay small; C = 50257 runs on the CPU backend (and one row
on Triton).
"""

import pytest
import torch
import torch.nn.functional as F

import s2h_kernels
from s2h_kernels import _cpu_config, reference


# The interpreter evaluates masked-off lanes too (-inf - -inf): numpy warns, the kernel discards them.
pytestmark = pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning",
    "ignore:overflow encountered:RuntimeWarning",
    "ignore:divide by zero encountered:RuntimeWarning",
    "ignore:All-NaN slice encountered:RuntimeWarning",
    "ignore:reduction. 'mean' divides the total loss:UserWarning",  # F.kl_div, compared on purpose
)

REDUCTIONS = ["batchmean", "sum", "mean", "none"]
NINF = float("-inf")
# Where the Triton kernels run: CUDA when present, else the CPU under TRITON_INTERPRET=1.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def logits(shape, dtype=torch.float32, device="cpu", seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype).to(device)


def tol(dtype):
    return dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)


def cotangent(loss, seed=5):
    if loss.dim() == 0:
        return torch.tensor(0.7, dtype=loss.dtype, device=loss.device)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(loss.shape, generator=g, dtype=torch.float64).to(loss.dtype).to(loss.device)


def run_gap(fn, s, h, T, reduction, **kw):
    """Loss and the gradients of <loss, cotangent> with respect to both inputs."""
    s = s.detach().clone().requires_grad_(True)
    h = h.detach().clone().requires_grad_(True)
    loss = fn(s, h, T, reduction, **kw)
    loss.backward(cotangent(loss))
    return loss.detach(), s.grad, h.grad


def run_cak(fn, zs, zt, T, gamma, standardize, reduction="batchmean", **kw):
    zs = zs.detach().clone().requires_grad_(True)
    loss = fn(zs, zt, T, gamma, standardize, reduction, **kw)
    loss.backward(cotangent(loss))
    return loss.detach(), zs.grad


# ---- kl_gap ---------------------------------------------------------------------------------------


# (37, 9): the CPU kernel's short-row path (16 rows per vector, then single rows).
@pytest.mark.parametrize("shape", [(1, 1), (4, 7), (37, 9), (5, 37), (3, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kl_gap_matches_reference(backend, device_for, shape, dtype, temperature):
    dev = device_for(backend)
    s, h = logits(shape, dtype, dev, 0), logits(shape, dtype, dev, 1)
    out = run_gap(s2h_kernels.kl_gap, s, h, temperature, "batchmean", backend=backend)
    ref = run_gap(reference.kl_gap, s, h, temperature, "batchmean")
    assert out[0].dtype == dtype and out[1].dtype == dtype and out[2].dtype == dtype
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, **tol(dtype))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_kl_gap_reductions(backend, device_for, reduction):
    dev = device_for(backend)
    s, h = logits((6, 11), device=dev, seed=2), logits((6, 11), device=dev, seed=3)
    out = run_gap(s2h_kernels.kl_gap, s, h, 1.5, reduction, backend=backend)
    ref = run_gap(reference.kl_gap, s, h, 1.5, reduction)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, **tol(torch.float32))
    if reduction != "none":  # the same number as F.kl_div for 2-D input
        expect = F.kl_div(F.log_softmax(h.double() / 1.5, -1), F.softmax(s.double() / 1.5, -1), reduction=reduction)
        torch.testing.assert_close(out[0].double(), expect, rtol=1e-5, atol=1e-7)
    else:
        assert out[0].shape == (6,)


def test_kl_gap_leading_dims(backend, device_for):
    """(..., C): every leading index is a row; batchmean divides by the number of rows."""
    dev = device_for(backend)
    s, h = logits((2, 3, 9), device=dev, seed=4), logits((2, 3, 9), device=dev, seed=5)
    none = s2h_kernels.kl_gap(s, h, 1.0, "none", backend=backend)
    assert none.shape == (2, 3)
    flat = s2h_kernels.kl_gap(s.reshape(6, 9), h.reshape(6, 9), 1.0, "none", backend=backend)
    torch.testing.assert_close(none.reshape(6), flat)
    bm = s2h_kernels.kl_gap(s, h, 1.0, "batchmean", backend=backend)
    torch.testing.assert_close(bm, flat.sum() / 6)
    _, gs, gh = s2h_kernels.kl_gap_with_grads(s, h, 1.0, "sum", backend=backend)
    assert gs.shape == s.shape and gh.shape == h.shape
    one = s2h_kernels.kl_gap(s[0, 0], h[0, 0], 1.0, "none", backend=backend)  # a single (C,) row
    assert one.shape == () and torch.allclose(one, none[0, 0])


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_paper_detach_patterns(backend, device_for, temperature):
    """d1 = KL(sg(p) || q) gives dd/dh, d2 = KL(p || sg(q)) gives dd/ds: both equal the fused ones."""
    dev = device_for(backend)
    T = temperature
    s = logits((5, 23), device=dev, seed=6).requires_grad_(True)
    h = logits((5, 23), device=dev, seed=7).requires_grad_(True)
    d1 = F.kl_div(F.log_softmax(h / T, -1), F.softmax(s.detach() / T, -1), reduction="batchmean")
    d2 = F.kl_div(F.log_softmax(h.detach() / T, -1), F.softmax(s / T, -1), reduction="batchmean")
    (gh_eager,) = torch.autograd.grad(d1, h)
    (gs_eager,) = torch.autograd.grad(d2, s)
    loss, gs, gh = s2h_kernels.kl_gap_with_grads(s, h, T, "batchmean", backend=backend)
    torch.testing.assert_close(loss, d1.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, d2.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh, gh_eager, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gs, gs_eager, rtol=1e-5, atol=1e-7)
    # Through autograd: hard gets d1's gradient, soft gets d2's; reference.kl_gap_d1_d2 agrees.
    s2, h2 = s.detach().clone().requires_grad_(True), h.detach().clone().requires_grad_(True)
    s2h_kernels.kl_gap(s2, h2, T, backend=backend).backward()
    torch.testing.assert_close(h2.grad, gh_eager, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(s2.grad, gs_eager, rtol=1e-5, atol=1e-7)
    r1, r2 = reference.kl_gap_d1_d2(s, h, T)
    torch.testing.assert_close(r1, d1)
    torch.testing.assert_close(r2, d2)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_with_grads_matches_autograd(backend, device_for, reduction):
    dev = device_for(backend)
    s, h = logits((4, 13), device=dev, seed=8), logits((4, 13), device=dev, seed=9)
    loss, gs, gh = s2h_kernels.kl_gap_with_grads(s, h, 2.0, reduction, backend=backend)
    rl, rgs, rgh = reference.kl_gap_with_grads(s, h, 2.0, reduction)
    for a, b in ((loss, rl), (gs, rgs), (gh, rgh)):
        torch.testing.assert_close(a, b, **tol(torch.float32))
    assert not loss.requires_grad and not gs.requires_grad


def test_underflow_gives_finite_gradients_where_eager_is_nan(backend, device_for):
    """Logits spread by ±30: softmax underflows to 0 in fp32; eager F.kl_div's d2 gradient is NaN,
    the fused one is finite and equals the log_target=True form computed in fp64."""
    dev = device_for(backend)
    s = logits((4, 200), device=dev, seed=10, scale=30.0)
    h = logits((4, 200), device=dev, seed=11, scale=30.0)
    se = s.clone().requires_grad_(True)
    d2 = F.kl_div(F.log_softmax(h / 1.0, -1), F.softmax(se, -1), reduction="batchmean")
    (g_eager,) = torch.autograd.grad(d2, se)
    assert torch.isnan(g_eager).any(), "precondition: eager gives NaN here"

    loss, gs, gh = s2h_kernels.kl_gap_with_grads(s, h, 1.0, backend=backend)
    assert torch.isfinite(loss) and torch.isfinite(gs).all() and torch.isfinite(gh).all()
    s64 = s.double().requires_grad_(True)
    h64 = h.double().requires_grad_(True)
    d64 = F.kl_div(F.log_softmax(h64, -1), F.log_softmax(s64, -1), reduction="batchmean", log_target=True)
    gs64, gh64 = torch.autograd.grad(d64, (s64, h64))
    torch.testing.assert_close(loss.double(), d64.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gs.double(), gs64, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gh.double(), gh64, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype,atol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_half_precision(backend, device_for, dtype, atol):
    """16-bit inputs are computed in fp32: results equal the fp32 reference on the same values."""
    dev = device_for(backend)
    s, h = logits((4, 50), dtype, dev, 12), logits((4, 50), dtype, dev, 13)
    loss, gs, gh = s2h_kernels.kl_gap_with_grads(s, h, 1.0, "sum", backend=backend)
    rl, rgs, rgh = reference.kl_gap_with_grads(s.float(), h.float(), 1.0, "sum")
    assert loss.dtype == dtype and gs.dtype == dtype and gh.dtype == dtype
    torch.testing.assert_close(loss.float(), rl, rtol=atol, atol=atol * rl.abs().item())
    torch.testing.assert_close(gs.float(), rgs, rtol=atol, atol=atol)
    torch.testing.assert_close(gh.float(), rgh, rtol=atol, atol=atol)
    op = torch.ops.s2h.kl_gap_triton if backend == "triton" else torch.ops.s2h.kl_gap
    assert op(s, h, 1.0)[0].dtype == torch.float32  # per-row losses stay fp32


def test_gradcheck_fp64(backend, device_for):
    dev = device_for(backend)
    s = logits((3, 6), torch.float64, dev, 14).requires_grad_(True)
    h = logits((3, 6), torch.float64, dev, 15).requires_grad_(True)
    for reduction in ("batchmean", "none"):
        assert torch.autograd.gradcheck(
            lambda a, b: s2h_kernels.kl_gap(a, b, 1.7, reduction, backend=backend), (s, h), eps=1e-6, atol=1e-8,
            fast_mode=backend == "triton",  # the interpreter is slow; fast mode checks random projections
        )


EDGE_CASES = ["extreme", "extreme_fp32", "equal_rows", "near_one_hot", "one_class", "vocab_50257", "masked", "soft_masked"]


def edge_inputs(case, backend):
    B = 1 if backend == "triton" else 3
    if case in ("extreme", "extreme_fp32"):
        dt = torch.float64 if case == "extreme" else torch.float32
        s = torch.tensor([[1e4, -1e4, 0.0, 5e3], [-1e4, -1e4, 1e4, 1e4], [3.0, 1e4, -2.0, -1e4]], dtype=dt)
        h = torch.tensor([[-1e4, 1e4, 0.0, 5e3], [-1e4, 1e4, 1e4, -1e4], [3.0, 1e4, 2.0, -1e4]], dtype=dt)
        return s, h
    if case == "equal_rows":
        s = torch.full((3, 10), 2.5)
        s[1] = -7.0
        h = logits((3, 10), seed=16)
        h[2] = 4.0
        return s, h
    if case == "near_one_hot":
        s = torch.full((3, 12), -20.0)
        s[:, 3] = 20.0
        h = logits((3, 12), seed=17)
        h[0, 3] = 40.0
        return s, h
    if case == "one_class":
        return logits((4, 1), seed=18), logits((4, 1), seed=19)
    if case == "vocab_50257":
        return logits((B, 50257), seed=20), logits((B, 50257), seed=21)
    mask = torch.zeros(3, 9, dtype=torch.bool)
    mask[:, [1, 4, 5]] = True
    mask[2, 8] = True
    s, h = logits((3, 9), seed=22), logits((3, 9), seed=23)
    s = s.masked_fill(mask, NINF)
    if case == "masked":  # masked in both (classes not in the label space)
        h = h.masked_fill(mask, NINF)
    return s, h  # soft_masked: the target gives them probability 0, the hard side does not


@pytest.mark.parametrize("case", EDGE_CASES)
def test_kl_gap_edge_cases(backend, device_for, case):
    dev = device_for(backend)
    s, h = (t.to(dev) for t in edge_inputs(case, backend))
    for T in (1.0, 2.0):
        loss, gs, gh = s2h_kernels.kl_gap_with_grads(s, h, T, "sum", backend=backend)
        s64, h64 = s.double().requires_grad_(True), h.double().requires_grad_(True)
        ref = reference.kl_gap(s64, h64, T, "sum")
        rgs, rgh = torch.autograd.grad(ref, (s64, h64))
        assert torch.isfinite(loss) and torch.isfinite(gs).all() and torch.isfinite(gh).all()
        if case == "extreme_fp32":  # fp32 logits of 1e4 carry absolute errors of ~1e-3
            kw = dict(rtol=1e-3, atol=5e-3)
        elif s.dtype == torch.float64:
            kw = dict(rtol=1e-9, atol=1e-10)
        else:
            kw = dict(rtol=1e-4, atol=1e-5 * max(1.0, abs(ref.item())))
        torch.testing.assert_close(loss.double(), ref.detach(), **kw)
        torch.testing.assert_close(gs.double(), rgs, **{**kw, "atol": max(kw["atol"], 1e-6)})
        torch.testing.assert_close(gh.double(), rgh, **{**kw, "atol": max(kw["atol"], 1e-6)})
        if case == "one_class":
            assert loss.item() == 0.0
            assert gs.abs().max().item() < 1e-6 and gh.abs().max().item() < 1e-6
        if case in ("masked", "soft_masked"):
            m = torch.isinf(s)
            assert (gs[m] == 0).all()
            if case == "masked":
                assert (gh[m] == 0).all()


def test_hard_masked_where_soft_has_mass_is_infinite(backend, device_for):
    """Documented: q_j = 0 < p_j makes the true KL +inf; the hard gradient stays finite."""
    dev = device_for(backend)
    s = torch.tensor([[0.0, 1.0, 2.0]], device=dev)
    h = torch.tensor([[0.0, NINF, 2.0]], device=dev)
    loss, gs, gh = s2h_kernels.kl_gap_with_grads(s, h, 1.0, "none", backend=backend)
    assert loss.item() == float("inf")
    torch.testing.assert_close(gh, F.softmax(h, -1) - F.softmax(s, -1))


@pytest.mark.parametrize("where", ["soft", "hard"])
def test_nan_propagates(backend, device_for, where):
    dev = device_for(backend)
    s, h = logits((3, 20), device=dev, seed=24), logits((3, 20), device=dev, seed=25)
    (s if where == "soft" else h)[1, 7] = float("nan")
    loss, gs, gh = s2h_kernels.kl_gap_with_grads(s, h, 1.0, "none", backend=backend)
    assert torch.isnan(loss[1]) and torch.isnan(gs[1]).all() and torch.isnan(gh[1]).all()
    keep = torch.tensor([0, 2])
    rl, rgs, rgh = reference.kl_gap_with_grads(s[keep], h[keep], 1.0, "none")
    torch.testing.assert_close(loss[keep], rl, **tol(torch.float32))
    torch.testing.assert_close(gs[keep], rgs, **tol(torch.float32))
    assert torch.isnan(s2h_kernels.kl_gap(s, h, 1.0, backend=backend))


def test_cpu_short_rows_special_values():
    """16-rows-at-once path: -inf, NaN, one class and extreme rows among ordinary ones."""
    s, h = logits((35, 6), seed=52), logits((35, 6), seed=53)
    s[3, :2] = NINF
    h[3, :2] = NINF
    s[5, 1] = float("nan")
    h[20, 4] = float("nan")
    s[7] = 4.0
    s[9, 0], h[9, 0] = 1e4, -1e4
    loss, gs, gh = s2h_kernels.kl_gap_with_grads(s, h, 1.5, "none")
    nan_rows = torch.zeros(35, dtype=torch.bool)
    nan_rows[[5, 20]] = True
    assert torch.isnan(loss[nan_rows]).all() and torch.isnan(gs[nan_rows]).all() and torch.isnan(gh[nan_rows]).all()
    rl, rgs, rgh = reference.kl_gap_with_grads(s[~nan_rows].double(), h[~nan_rows].double(), 1.5, "none")
    torch.testing.assert_close(loss[~nan_rows].double(), rl, rtol=1e-5, atol=1e-3)
    # Row 9 has logits of ±1e4: its fp32 gradients carry absolute errors of ~1e-3 (like eager fp32).
    torch.testing.assert_close(gs[~nan_rows].double(), rgs, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(gh[~nan_rows].double(), rgh, rtol=1e-5, atol=1e-3)
    ok = ~nan_rows
    ok[9] = False
    rest = torch.arange(33) != 8  # row 9 is at index 8 among the rows without NaN
    torch.testing.assert_close(gs[ok].double(), rgs[rest], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh[ok].double(), rgh[rest], rtol=1e-5, atol=1e-6)
    one = s2h_kernels.kl_gap_with_grads(s[:, :1], h[:, :1], 2.0, "none")[0]
    finite = torch.isfinite(s[:, 0]) & torch.isfinite(h[:, 0])
    assert (one[finite] == 0).all()
    assert torch.isnan(one[~finite]).all()  # a NaN logit, or a row with no finite logit at all


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cpu_multi_chunk(dtype):
    """Rows of several 1024-class chunks: a chunk entirely -inf, the maximum in the last chunk, and
    16-bit inputs (whose exponentials wait in a float scratch instead of the outputs)."""
    s, h = logits((3, 3000), seed=58, scale=4.0), logits((3, 3000), seed=59, scale=4.0)
    s[0, 1024:2048] = NINF
    h[0, 1024:2048] = NINF
    s[1, 2990] = 60.0  # the earlier chunks' sums are rescaled by exp(-~45)
    s[2, :1024] = -200.0  # a whole chunk underflows against the later maximum
    s, h = s.to(dtype), h.to(dtype)
    loss, gs, gh = s2h_kernels.kl_gap_with_grads(s, h, 1.0, "none")
    rl, rgs, rgh = reference.kl_gap_with_grads(s.double(), h.double(), 1.0, "none")
    t = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(loss.double(), rl, rtol=t, atol=t * 10)
    torch.testing.assert_close(gs.double(), rgs, rtol=t, atol=t)
    torch.testing.assert_close(gh.double(), rgh, rtol=t, atol=t)
    assert (gs[0, 1024:2048] == 0).all() and (gh[0, 1024:2048] == 0).all()


def test_triton_multi_chunk(monkeypatch):
    """Chunks of 16 classes: the online rescaling across chunks, -inf and NaN-free tails."""
    from s2h_kernels._triton import kl_common

    monkeypatch.setattr(kl_common, "MAX_BLOCK", 16)
    s, h = logits((3, 83), seed=26, scale=6.0), logits((3, 83), seed=27, scale=6.0)
    s, h = s.to(TRITON_DEVICE), h.to(TRITON_DEVICE)
    s[0, 40:60] = NINF  # a whole chunk masked
    h[0, 40:60] = NINF
    s[1, 70] = 50.0  # the maximum arrives late: the earlier sums are rescaled
    for T in (1.0, 0.5):
        out = s2h_kernels.kl_gap_with_grads(s, h, T, "none", backend="triton")
        ref = reference.kl_gap_with_grads(s, h, T, "none")
        for a, b in zip(out, ref):  # logits up to 100 after / T: fp32 absolute errors of a few 1e-6
            torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)
    for standardize in (True, False):
        for gamma in (None, 0.25):
            loss, g = run_cak(s2h_kernels.ca_kld, s, h, 2.0, gamma, standardize, backend="triton")
            rl, rg = run_cak(reference.ca_kld, s, h, 2.0, gamma, standardize)
            torch.testing.assert_close(loss, rl, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(g, rg, rtol=1e-5, atol=1e-6)


_LEVELS = ("scalar", "avx2", "avx512")


@pytest.mark.parametrize("isa", [pytest.param(i, marks=pytest.mark.skipif(
    _LEVELS.index(i) > _LEVELS.index(_cpu_config.best_isa()), reason=f"CPU lacks {i}")) for i in ("avx2", "scalar")])
def test_cpu_isa_variants(cpu_env, isa):
    """The AVX2 and baseline builds of the CPU kernel give the same results as the best one."""
    s, h = logits((5, 77), seed=28), logits((5, 77), seed=29)
    s[2, 3] = NINF
    h[2, 3] = NINF
    best = s2h_kernels.kl_gap_with_grads(s, h, 1.3, "none")
    best_cak = torch.ops.s2h.ca_kld(s, h, 2.0, None, True, 1e-7)
    cpu_env(S2H_CPU_ISA=isa)
    assert _cpu_config.active_isa() == isa
    for a, b in zip(s2h_kernels.kl_gap_with_grads(s, h, 1.3, "none"), best):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for a, b in zip(torch.ops.s2h.ca_kld(s, h, 2.0, None, True, 1e-7), best_cak):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ---- ca_kld ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("standardize", [True, False])
@pytest.mark.parametrize("gamma", [None, 0.0, 0.3, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ca_kld_matches_reference(backend, device_for, standardize, gamma, dtype):
    dev = device_for(backend)
    zs, zt = logits((5, 19), dtype, dev, 30), logits((5, 19), dtype, dev, 31, scale=5.0)
    loss, g = run_cak(s2h_kernels.ca_kld, zs, zt, 4.0, gamma, standardize, backend=backend)
    rl, rg = run_cak(reference.ca_kld, zs, zt, 4.0, gamma, standardize)
    assert loss.dtype == dtype and g.dtype == dtype
    torch.testing.assert_close(loss, rl, **tol(dtype))
    torch.testing.assert_close(g, rg, **tol(dtype))


def test_ca_kld_definition(backend, device_for):
    """Independent of the reference: standardise with torch.std, both F.kl_div directions."""
    dev = device_for(backend)
    zs, zt = logits((6, 10), torch.float64, dev, 32), logits((6, 10), torch.float64, dev, 33)
    T, eps = 3.0, 1e-7

    def stdz(z):
        return (z - z.mean(-1, keepdim=True)) / (z.std(-1, keepdim=True) + eps)

    log_s = F.log_softmax(stdz(zs) / T, -1)
    log_t = F.log_softmax(stdz(zt) / T, -1)
    gamma = F.softmax(zt, -1).amax(-1).mean()
    fwd = F.kl_div(log_s, log_t, reduction="batchmean", log_target=True)  # KL(P_T || P_S)
    rev = F.kl_div(log_t, log_s, reduction="batchmean", log_target=True)  # KL(P_S || P_T)
    expect = gamma * fwd + (1 - gamma) * rev
    got = s2h_kernels.ca_kld(zs, zt, T, backend=backend)
    torch.testing.assert_close(got, expect, rtol=1e-10, atol=1e-12)
    assert 0 < gamma < 1
    torch.testing.assert_close(
        s2h_kernels.ca_kld(zs, zt, T, gamma=float(gamma), backend=backend), got, rtol=1e-12, atol=1e-12
    )
    _, _, gamma_used = torch.ops.s2h.ca_kld(zs.cpu(), zt.cpu(), T, None, True, eps)
    torch.testing.assert_close(gamma_used, gamma.cpu())


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ca_kld_reductions(backend, device_for, reduction):
    dev = device_for(backend)
    zs, zt = logits((4, 8), device=dev, seed=34), logits((4, 8), device=dev, seed=35)
    loss, g = run_cak(s2h_kernels.ca_kld, zs, zt, 2.0, None, True, reduction, backend=backend)
    rl, rg = run_cak(reference.ca_kld, zs, zt, 2.0, None, True, reduction)
    torch.testing.assert_close(loss, rl, **tol(torch.float32))
    torch.testing.assert_close(g, rg, **tol(torch.float32))


def test_ca_kld_teacher_gets_no_gradient(backend, device_for):
    dev = device_for(backend)
    zs = logits((3, 7), device=dev, seed=36).requires_grad_(True)
    zt = logits((3, 7), device=dev, seed=37).requires_grad_(True)
    s2h_kernels.ca_kld(zs, zt, backend=backend).backward()
    assert zt.grad is None and zs.grad is not None
    # The explicit route to a teacher gradient: the reference with detach_teacher=False.
    reference.ca_kld(zs, zt, detach_teacher=False).backward()
    assert zt.grad is not None and torch.isfinite(zt.grad).all()


def test_ca_kld_gradcheck_fp64(backend, device_for):
    dev = device_for(backend)
    zs = logits((3, 5), torch.float64, dev, 38).requires_grad_(True)
    zt = logits((3, 5), torch.float64, dev, 39)
    for standardize, gamma in ((True, None), (True, 0.4), (False, None)):
        assert torch.autograd.gradcheck(
            lambda a: s2h_kernels.ca_kld(a, zt, 2.0, gamma, standardize, "sum", backend=backend),
            (zs,), eps=1e-6, atol=1e-8, fast_mode=backend == "triton",
        )


@pytest.mark.parametrize("case", ["equal_rows", "one_class", "masked", "extreme", "vocab_50257"])
@pytest.mark.parametrize("standardize", [True, False])
def test_ca_kld_edge_cases(backend, device_for, case, standardize):
    dev = device_for(backend)
    zs, zt = edge_inputs(case, backend)
    if case == "masked":
        zt = zt.masked_fill(torch.isinf(zs), NINF)
    zs, zt = zs.double().to(dev), zt.double().to(dev)
    loss, g = run_cak(s2h_kernels.ca_kld, zs, zt, 4.0, None, standardize, "sum", backend=backend)
    rl, rg = run_cak(reference.ca_kld, zs, zt, 4.0, None, standardize, "sum")
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    torch.testing.assert_close(loss, rl, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(g, rg, rtol=1e-8, atol=1e-10)
    if case == "one_class":
        assert loss.item() == 0.0 and g.abs().max().item() == 0.0


def test_ca_kld_nan_propagates(backend, device_for):
    dev = device_for(backend)
    zs, zt = logits((3, 6), device=dev, seed=40), logits((3, 6), device=dev, seed=41)
    zs[1, 2] = float("nan")
    loss = s2h_kernels.ca_kld(zs, zt, 2.0, 0.5, True, "none", backend=backend)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    zs[1, 2] = 0.0
    zt[2, 0] = float("nan")  # gamma=None averages the teacher rows: everything becomes NaN
    assert torch.isnan(s2h_kernels.ca_kld(zs, zt, 2.0, None, True, "none", backend=backend)).all()


# ---- op registration: opcheck, torch.compile ----------------------------------------------------


@pytest.mark.parametrize("op_name", ["kl_gap", "kl_gap_triton"])
def test_opcheck_kl_gap(op_name):
    op = getattr(torch.ops.s2h, op_name)
    dev = TRITON_DEVICE if op_name.endswith("_triton") else "cpu"
    s = logits((3, 10), device=dev, seed=42).requires_grad_(True)
    h = logits((3, 10), device=dev, seed=43).requires_grad_(True)
    torch.library.opcheck(op, (s, h, 1.5, 1.0))
    torch.library.opcheck(op, (s.detach().double(), h.detach().double(), 0.5, 0.25))


@pytest.mark.parametrize("op_name", ["ca_kld", "ca_kld_triton"])
def test_opcheck_ca_kld(op_name):
    op = getattr(torch.ops.s2h, op_name)
    dev = TRITON_DEVICE if op_name.endswith("_triton") else "cpu"
    zs = logits((3, 10), device=dev, seed=44).requires_grad_(True)
    zt = logits((3, 10), device=dev, seed=45)
    torch.library.opcheck(op, (zs, zt, 4.0, None, True, 1e-7, 1.0))
    torch.library.opcheck(op, (zs, zt, 2.0, 0.3, False, 1e-7, 0.5))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def step(s, h, zs, zt):
        return s2h_kernels.kl_gap(s, h, 2.0) + 0.5 * s2h_kernels.ca_kld(zs, zt, 4.0)

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    args = [logits((4, 12), seed=46 + i) for i in range(4)]
    outs = []
    for fn in (compiled, step):
        leaves = [a.clone().requires_grad_(i < 3) for i, a in enumerate(args)]
        loss = fn(*leaves)
        loss.backward()
        outs.append((loss.detach(), [leaves[i].grad for i in range(3)]))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b)


def test_double_backward_raises(backend, device_for):
    """Second derivatives are not implemented: create_graph=True must fail loudly, never return a
    silently incomplete result (even when the cotangent itself requires grad)."""
    dev = device_for(backend)
    s = logits((2, 5), device=dev, seed=54).requires_grad_(True)
    h = logits((2, 5), device=dev, seed=55).requires_grad_(True)
    v = torch.ones((), device=dev, requires_grad=True)
    for loss in (s2h_kernels.kl_gap(s, h, backend=backend), s2h_kernels.ca_kld(s, h, backend=backend)):
        (g,) = torch.autograd.grad(loss, s, grad_outputs=v, create_graph=True, retain_graph=True)
        with pytest.raises(RuntimeError, match="differentiate twice"):
            g.sum().backward()
        (g,) = torch.autograd.grad(loss, s, create_graph=True)
        with pytest.raises(RuntimeError, match="does not require grad"):
            g.sum().backward()


def test_one_side_detached(backend, device_for):
    """kl_gap(s.detach(), h) is d1 (hard gradient only); kl_gap(s, h.detach()) is d2."""
    dev = device_for(backend)
    s = logits((4, 9), device=dev, seed=60).requires_grad_(True)
    h = logits((4, 9), device=dev, seed=61).requires_grad_(True)
    _, rgs, rgh = reference.kl_gap_with_grads(s, h, 1.0)
    s2h_kernels.kl_gap(s.detach(), h, backend=backend).backward()
    s2h_kernels.kl_gap(s, h.detach(), backend=backend).backward()
    torch.testing.assert_close(h.grad, rgh, **tol(torch.float32))
    torch.testing.assert_close(s.grad, rgs, **tol(torch.float32))


def test_retain_graph_backward_twice(backend, device_for):
    """The saved gradients are not modified in place: a retained graph gives the same result twice."""
    dev = device_for(backend)
    s = logits((3, 7), device=dev, seed=56).requires_grad_(True)
    h = logits((3, 7), device=dev, seed=57).requires_grad_(True)
    loss = s2h_kernels.kl_gap(s, h, backend=backend)
    g1 = torch.autograd.grad(loss, (s, h), retain_graph=True)
    g2 = torch.autograd.grad(loss, (s, h))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", ["kl_gap", "kl_gap_with_grads", "ca_kld"])
def test_bad_input(fn):
    f = getattr(s2h_kernels, fn)
    x = torch.randn(3, 5)
    with pytest.raises(ValueError, match=f"{fn}: .*same shape"):
        f(x, torch.randn(3, 6))
    with pytest.raises(ValueError, match=f"{fn}: .*floating-point"):
        f(x, torch.ones(3, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match=f"{fn}: .*floating-point"):
        f(torch.ones(3, 5, dtype=torch.int32), torch.ones(3, 5, dtype=torch.int32))
    with pytest.raises(ValueError, match=f"{fn}: .*empty batch"):
        f(torch.randn(0, 5), torch.randn(0, 5))
    with pytest.raises(ValueError, match=f"{fn}: .*no classes"):
        f(torch.randn(3, 0), torch.randn(3, 0))
    with pytest.raises(ValueError, match=f"{fn}: .*different devices"):
        f(x, torch.randn(3, 5, device="meta"))
    with pytest.raises(ValueError, match=f"{fn}: .*same dtype"):
        f(x, x.double())
    with pytest.raises(ValueError, match=f"{fn}: .*0-d"):
        f(torch.tensor(1.0), torch.tensor(1.0))
    for bad_t in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"{fn}: temperature"):
            f(x, x, bad_t)
    with pytest.raises(ValueError, match=f"{fn}: reduction"):
        f(x, x, 1.0, reduction="avg")
    with pytest.raises(ValueError, match=f"{fn}: unknown backend"):
        f(x, x, backend="tpu")
    if fn == "ca_kld":
        for bad_gamma in (-0.1, 1.5, float("nan")):
            with pytest.raises(ValueError, match="ca_kld: gamma"):
                f(x, x, gamma=bad_gamma)


def test_bad_input_cpp_ops():
    x = torch.randn(3, 5)
    with pytest.raises(RuntimeError, match="s2h::kl_gap: soft and hard must have the same shape"):
        torch.ops.s2h.kl_gap(x, torch.randn(3, 4), 1.0)
    with pytest.raises(RuntimeError, match="s2h::kl_gap: soft must be 2-D"):
        torch.ops.s2h.kl_gap(torch.randn(5), torch.randn(5), 1.0)
    with pytest.raises(RuntimeError, match="s2h::kl_gap: soft must be float32"):
        torch.ops.s2h.kl_gap(x.long(), x.long(), 1.0)
    with pytest.raises(RuntimeError, match="s2h::kl_gap: soft has no rows"):
        torch.ops.s2h.kl_gap(torch.randn(0, 5), torch.randn(0, 5), 1.0)
    with pytest.raises(RuntimeError, match="s2h::kl_gap: temperature"):
        torch.ops.s2h.kl_gap(x, x, 0.0)
    with pytest.raises(RuntimeError, match="s2h::ca_kld: gamma must lie in"):
        torch.ops.s2h.ca_kld(x, x, 1.0, 2.0, True, 1e-7)
    with pytest.raises(RuntimeError, match="s2h::ca_kld: student and teacher must have the same dtype"):
        torch.ops.s2h.ca_kld(x, x.double(), 1.0, None, True, 1e-7)
    with pytest.raises(ValueError, match="s2h::kl_gap_triton: soft and hard must have the same shape"):
        torch.ops.s2h.kl_gap_triton(x, torch.randn(3, 4), 1.0)


# ---- CUDA-specific ------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_and_triton_agree_on_gpu():
    """Both GPU backends and the CPU kernel on one large-vocabulary batch."""
    s, h = logits((8, 50257), seed=50), logits((8, 50257), seed=51)
    cpu = s2h_kernels.kl_gap_with_grads(s, h, 2.0)
    for b in ("cuda", "triton"):
        out = s2h_kernels.kl_gap_with_grads(s.cuda(), h.cuda(), 2.0, backend=b)
        for a, r in zip(out, cpu):
            torch.testing.assert_close(a.cpu(), r, rtol=1e-4, atol=1e-7)
        for standardize in (True, False):
            got = torch.ops.s2h.ca_kld(s.cuda(), h.cuda(), 4.0, None, standardize, 1e-7) if b == "cuda" else \
                torch.ops.s2h.ca_kld_triton(s.cuda(), h.cuda(), 4.0, None, standardize, 1e-7)
            ref = torch.ops.s2h.ca_kld(s, h, 4.0, None, standardize, 1e-7)
            for a, r in zip(got, ref):
                torch.testing.assert_close(a.cpu(), r, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("B,C", [(37, 5), (37, 100), (9, 300), (5, 2500)])
def test_triton_rows_per_program(B, C):
    """Short rows go several per program ([ROWS, BLOCK] tiles, kl_common.launch_config); a batch
    that is no multiple of ROWS leaves masked rows in the last program. (Compiling these kernels
    for sm_80 / sm_90 is tests/kernels/test_triton_compile.py's job.)"""
    from s2h_kernels._triton import ca_kld as K_cak, kl_gap as K_gap

    assert (K_gap.launch_config(C, torch.float32)["ROWS"] > 1) == (C < 256)
    s, h = logits((B, C), seed=60, scale=3.0).to(TRITON_DEVICE), logits((B, C), seed=61, scale=3.0).to(TRITON_DEVICE)
    for dtype, tol in ((torch.float32, 2e-5), (torch.float64, 1e-12)):
        s2, h2 = s.to(dtype), h.to(dtype)
        out = s2h_kernels.kl_gap_with_grads(s2, h2, 1.5, "none", backend="triton")
        ref = reference.kl_gap_with_grads(s2, h2, 1.5, "none")
        for a, b in zip(out, ref):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
        for standardize in (True, False):
            loss, g = run_cak(s2h_kernels.ca_kld, s2, h2, 2.0, None, standardize, backend="triton")
            rl, rg = run_cak(reference.ca_kld, s2, h2, 2.0, None, standardize)
            torch.testing.assert_close(loss, rl, rtol=tol, atol=tol)
            torch.testing.assert_close(g, rg, rtol=tol, atol=tol)
    assert K_cak.launch_config(C, torch.float64)["num_warps"] <= 4


def test_torch_func_grad_on_cpu():
    """torch.func.grad through the fused op equals it through the reference (both inputs)."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(5, 7, generator=g, dtype=torch.float64)
    h = torch.randn(5, 7, generator=g, dtype=torch.float64)
    got = torch.func.grad(lambda a, b: s2h_kernels.kl_gap(a, b, 2.0), argnums=(0, 1))(s, h)
    want = torch.func.grad(lambda a, b: reference.kl_gap(a, b, 2.0), argnums=(0, 1))(s, h)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# ---- the CUDA kernels' row algorithm, modelled on the CPU ------------------------------------------
# csrc/cuda/kl_gap.cu has never run on a GPU here. Everything it does but the warp shuffles and the
# shared-memory hand-off is host/device code in csrc/common/kl_gap.h (per-thread strided sweeps,
# state merges, the fold over warps, finalisation, gradients); s2h_internal::*_block_model runs that
# code for a block of `threads` threads with the butterfly replayed on arrays. The kernel's launcher
# picks 32, 128, 256 or 512 threads per row (with_threads).

MODEL_THREADS = (32, 128, 256, 512)


@pytest.mark.parametrize("threads", MODEL_THREADS)
@pytest.mark.parametrize("shape", [(3, 1), (2, 31), (3, 300), (2, 1300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_block_model_matches_reference(threads, shape, dtype):
    s, h = logits(shape, dtype, seed=70, scale=4.0), logits(shape, dtype, seed=71, scale=4.0)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    loss, gs, gh = torch.ops.s2h_internal.kl_gap_block_model(s, h, 1.5, 2.0, threads)
    ref = reference.kl_gap_with_grads(s, h, 1.5, "none")
    torch.testing.assert_close(loss.to(dtype), ref[0], rtol=tol, atol=tol)
    torch.testing.assert_close(gs, 2.0 * ref[1], rtol=tol, atol=tol)
    torch.testing.assert_close(gh, 2.0 * ref[2], rtol=tol, atol=tol)
    for standardize in (True, False):
        for gamma in (None, 0.3):
            loss, g, gam = torch.ops.s2h_internal.ca_kld_block_model(s, h, 2.0, gamma, standardize, 1e-7, 1.0, threads)
            rl, rg = run_cak(reference.ca_kld, s, h, 2.0, gamma, standardize, "none")
            cpu = torch.ops.s2h.ca_kld(s, h, 2.0, gamma, standardize, 1e-7, 1.0)
            torch.testing.assert_close(gam, cpu[2], rtol=tol, atol=tol)
            torch.testing.assert_close(loss, cpu[0], rtol=tol, atol=tol)
            torch.testing.assert_close(g, cpu[1], rtol=tol, atol=tol)
            torch.testing.assert_close(loss.to(dtype), rl, rtol=tol * 10, atol=tol * 10)


@pytest.mark.parametrize("threads", (32, 256))
@pytest.mark.parametrize("case", ["extreme", "near_one_hot", "one_class", "masked", "soft_masked"])
def test_cuda_block_model_edge_cases(threads, case):
    s, h = (t.double() for t in edge_inputs(case, "cpu"))
    for T in (1.0, 2.0):
        out = torch.ops.s2h_internal.kl_gap_block_model(s, h, T, 1.0, threads)
        cpu = torch.ops.s2h.kl_gap(s, h, T, 1.0)
        for a, b in zip(out, cpu):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, equal_nan=True)
    if case != "soft_masked":
        zt = h.masked_fill(torch.isinf(s), NINF) if case == "masked" else h
        for standardize in (True, False):
            out = torch.ops.s2h_internal.ca_kld_block_model(s, zt, 4.0, None, standardize, 1e-7, 1.0, threads)
            cpu = torch.ops.s2h.ca_kld(s, zt, 4.0, None, standardize, 1e-7, 1.0)
            for a, b in zip(out, cpu):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_cuda_block_model_nan_and_bad_threads():
    s, h = logits((2, 40), torch.float64, seed=72), logits((2, 40), torch.float64, seed=73)
    s[1, 5] = float("nan")
    loss, gs, gh = torch.ops.s2h_internal.kl_gap_block_model(s, h, 1.0, 1.0, 128)
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1]) and torch.isnan(gs[1]).all()
    with pytest.raises(RuntimeError, match="multiple of 32"):
        torch.ops.s2h_internal.kl_gap_block_model(s, h, 1.0, 1.0, 48)
