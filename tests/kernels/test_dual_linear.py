"""dual_linear: the Triton dual-GEMM (interpreter on the CPU) and the CPU path against an independent
computation.

The CPU backend IS the reference (two F.linear calls) and the Triton backward is plain torch matmuls,
so comparing either with s2h_kernels.reference would compare a computation with itself. The oracle
here, :func:`dual_linear_ref`, is written from the definition instead: an elementwise product
broadcast over (rows, out, in) and summed in fp64 (no GEMM, no F.linear), and
:func:`independent_grads` writes the gradients from their formulas the same way.
"""
import pytest
import torch

from s2h_kernels.dual_linear import dual_linear


def _linear_by_sums(x, w, b):
    """x @ w.T + b as a broadcast product summed over the input features, in fp64."""
    y = (x.double()[..., None, :] * w.double()).sum(-1)
    return y if b is None else y + b.double()


def dual_linear_ref(xs, xh, w, b, ko, ki):
    """The definition: y_soft = x_soft W^T + b, y_hard = x_hard W[:ko, :ki]^T + b[:ko]; fp64, in the
    inputs' dtype."""
    ys = _linear_by_sums(xs, w, b)
    yh = _linear_by_sums(xh, w[:ko, :ki], None if b is None else b[:ko])
    return ys.to(xs.dtype), yh.to(xh.dtype)


def independent_grads(xs, xh, w, b, ko, ki, gs, gh):
    """Gradients of <y_soft, gs> + <y_hard, gh> from the formulas (broadcast sums, fp64):
    dxs = gs W, dxh = gh W_h, dW = gs^T xs + pad(gh^T xh), db = sum gs + pad(sum gh)."""
    gs, gh, w, xs, xh = gs.double(), gh.double(), w.double(), xs.double(), xh.double()
    dxs = (gs[:, :, None] * w[None]).sum(1)
    dxh = (gh[:, :, None] * w[None, :ko, :ki]).sum(1)
    dw = (gs[:, :, None] * xs[:, None, :]).sum(0)
    dw[:ko, :ki] += (gh[:, :, None] * xh[:, None, :]).sum(0)
    out = [dxs, dxh, dw]
    if b is not None:
        db = gs.sum(0)
        db[:ko] += gh.sum(0)
        out.append(db)
    return out


BACKENDS = [
    pytest.param("cpu", id="cpu"),
    pytest.param("triton", id="triton"),
]

# (M_soft, M_hard, N, K, k_out, k_in): tile edges, partial tiles, hard block = whole, = 1x1,
# different row counts for the two branches, k_out beyond the first N tile.
SHAPES = [
    (4, 4, 16, 8, 7, 5),
    (33, 33, 90, 70, 41, 33),
    (5, 9, 64, 32, 64, 32),
    (3, 2, 130, 40, 1, 1),
    (70, 7, 20, 100, 20, 65),
]


def _device(backend):
    return torch.device("cuda") if torch.cuda.is_available() and backend == "triton" else torch.device("cpu")


def _make(shape, dtype, device, bias=True, seed=0):
    ms, mh, n, k, ko, ki = shape
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).to(device)  # noqa: E731
    return mk(ms, k), mk(mh, ki), mk(n, k), (mk(n) if bias else None), ko, ki


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_eager(backend, shape, dtype, bias):
    xs, xh, w, b, ko, ki = _make(shape, dtype, _device(backend), bias)
    ys, yh = dual_linear(xs, xh, w, b, ko, ki, backend=backend)
    rs, rh = dual_linear_ref(xs, xh, w, b, ko, ki)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    assert ys.shape == (shape[0], shape[2]) and yh.shape == (shape[1], ko)
    torch.testing.assert_close(ys, rs, **tol)
    torch.testing.assert_close(yh, rh, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_half_precision(backend, dtype, tol):
    """Half inputs accumulate in fp32: the result is the fp32 product rounded once."""
    xs, xh, w, b, ko, ki = _make(SHAPES[1], dtype, _device(backend))
    ys, yh = dual_linear(xs, xh, w, b, ko, ki, backend=backend)
    rs, rh = dual_linear_ref(xs.float(), xh.float(), w.float(), b.float(), ko, ki)
    assert ys.dtype == yh.dtype == dtype
    torch.testing.assert_close(ys.float(), rs, rtol=tol, atol=tol * float(rs.abs().max()))
    torch.testing.assert_close(yh.float(), rh, rtol=tol, atol=tol * float(rh.abs().max()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_matches_eager(backend):
    dev = _device(backend)
    xs, xh, w, b, ko, ki = _make(SHAPES[1], torch.float64, dev)
    leaves = [t.clone().requires_grad_(True) for t in (xs, xh, w, b)]
    g = torch.Generator().manual_seed(3)
    gs = torch.randn(xs.shape[0], w.shape[0], generator=g, dtype=torch.float64).to(dev)
    gh = torch.randn(xh.shape[0], ko, generator=g, dtype=torch.float64).to(dev)
    ys, yh = dual_linear(*leaves, ko, ki, backend=backend)
    ((ys * gs).sum() + (yh * gh).sum()).backward()
    expected = independent_grads(xs, xh, w, b, ko, ki, gs, gh)
    for a, r in zip(leaves, expected):
        torch.testing.assert_close(a.grad, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_oracle_can_fail(backend):
    """The independent oracle tells a wrong block apart: the hard output with W[:ko, :ki] shifted by one
    column is not accepted."""
    xs, xh, w, b, ko, ki = _make(SHAPES[1], torch.float64, _device(backend))
    _, yh = dual_linear(xs, xh, w, b, ko, ki, backend=backend)
    wrong = _linear_by_sums(xh, w[:ko, 1:ki + 1], b[:ko])
    assert not torch.allclose(yh, wrong)


def test_one_output_unused():
    """Only the hard output feeds the loss: the soft side gets zero gradient, nothing crashes."""
    xs, xh, w, b, ko, ki = _make(SHAPES[0], torch.float64, _device("triton"))
    w.requires_grad_(True)
    xs.requires_grad_(True)
    _, yh = dual_linear(xs, xh, w, b, ko, ki, backend="triton")
    yh.sum().backward()
    assert torch.count_nonzero(xs.grad) == 0
    expected = torch.zeros_like(w)
    expected[:ko, :ki] = xh.sum(0).expand(ko, ki)
    torch.testing.assert_close(w.grad, expected)


def test_gradcheck_fp64_triton():
    xs, xh, w, b, ko, ki = _make((3, 2, 9, 6, 4, 5), torch.float64, _device("triton"))
    args = [t.requires_grad_(True) for t in (xs, xh, w, b)]
    f = lambda a, c, d, e: dual_linear(a, c, d, e, ko, ki, backend="triton")  # noqa: E731
    assert torch.autograd.gradcheck(f, tuple(args), eps=1e-6, atol=1e-8)


def test_leading_dims():
    """[B, T, K] inputs (tokens): flattened for the kernel, reshaped back."""
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(2, 5, 24, generator=g)
    xh = torch.randn(2, 3, 10, generator=g)
    w = torch.randn(18, 24, generator=g)
    ys, yh = dual_linear(xs, xh, w, None, 7, 10, backend="triton")
    rs, rh = dual_linear_ref(xs, xh, w, None, 7, 10)
    assert ys.shape == (2, 5, 18) and yh.shape == (2, 3, 7)
    torch.testing.assert_close(ys, rs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(yh, rh, rtol=1e-5, atol=1e-5)


def test_non_contiguous_weight():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 30, generator=g).t()  # [30, 40], strides (1, 30)
    xs, xh = torch.randn(6, 40, generator=g), torch.randn(6, 12, generator=g)
    ys, yh = dual_linear(xs, xh, w, None, 9, 12, backend="triton")
    rs, rh = dual_linear_ref(xs, xh, w, None, 9, 12)
    torch.testing.assert_close(ys, rs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(yh, rh, rtol=1e-5, atol=1e-5)


def test_opcheck():
    xs, xh, w, b, ko, ki = _make((4, 3, 12, 10, 5, 6), torch.float32, _device("triton"))
    torch.library.opcheck(torch.ops.s2h.dual_linear_triton.default, (xs, xh, w, b, ko, ki))
    torch.library.opcheck(torch.ops.s2h.dual_linear_triton.default, (xs, xh, w, None, ko, ki))


def test_torch_compile_fullgraph():
    xs, xh, w, b, ko, ki = _make((4, 3, 12, 10, 5, 6), torch.float32, _device("triton"))

    def f(a, c):
        ys, yh = dual_linear(a, c, w, b, ko, ki, backend="triton")
        return ys.sum() + yh.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    rs, rh = dual_linear_ref(xs, xh, w, b, ko, ki)
    torch.testing.assert_close(compiled(xs, xh), rs.sum() + rh.sum(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(k_out=0), "k_out must be in"),
        (dict(k_out=13), "k_out must be in"),
        (dict(k_in=11), "k_in must be in"),
        (dict(x_hard=torch.randn(3, 5)), "x_hard must have k_in=6"),
        (dict(x_soft=torch.randn(4, 9)), "x_soft must have 10 features"),
        (dict(weight=torch.randn(12)), "weight must be 2-D"),
        (dict(bias=torch.randn(11)), r"bias must be a tensor of shape \(12,\)"),
        (dict(x_soft=torch.randn(4, 10, dtype=torch.float64)), "share one dtype"),
        (dict(x_soft=torch.ones(4, 10, dtype=torch.int64)), "floating-point"),
        (dict(backend="cuda"), "no CUDA C\\+\\+ kernel"),
        (dict(backend="tpu"), "unknown backend"),
    ],
)
def test_bad_input(kwargs, match):
    g = torch.Generator().manual_seed(0)
    args = dict(x_soft=torch.randn(4, 10, generator=g), x_hard=torch.randn(3, 6, generator=g),
                weight=torch.randn(12, 10, generator=g), bias=torch.randn(12, generator=g), k_out=5, k_in=6)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        dual_linear(**args)
