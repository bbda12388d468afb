"""spmm / spmm_conv2d: every backend against the dense reference (docs/DESIGN.md §4)."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import s2h_kernels
from s2h_kernels import SparseWeight, _cpu_config, reference

# The CPU kernel's ISAs; those the machine lacks are skipped.
_LEVELS = ("scalar", "avx2", "avx512")
_SUPPORTED = set(_LEVELS[: _LEVELS.index(_cpu_config.best_isa()) + 1])
ISAS = [pytest.param(i, marks=pytest.mark.skipif(i not in _SUPPORTED, reason=f"CPU lacks {i}"))
        for i in ("avx512", "avx2", "scalar")]


def sparse_matrix(m, k, sparsity, dtype=torch.float32, seed=0, empty_rows=()):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, k, generator=g, dtype=torch.float64)
    w = w * (torch.rand(m, k, generator=g, dtype=torch.float64) >= sparsity)
    for r in empty_rows:
        w[r] = 0
    return w.to(dtype)


def randn(*shape, dtype=torch.float32, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(device)


@contextlib.contextmanager
def num_threads(n):
    """torch's CPU thread count set to n inside the block, restored after."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)


def assert_matches_dense(backend, device, w, x, bias=None, relu=False):
    sw = SparseWeight.from_dense(w).to(device)
    x = x.to(device)
    b = bias.to(device) if bias is not None else None
    y = s2h_kernels.spmm(sw, x, b, relu, backend=backend)
    ref = reference.spmm(sw, x, b, relu)
    assert y.shape == ref.shape and y.dtype == x.dtype and y.device == x.device
    torch.testing.assert_close(y, ref, **tol(x.dtype))
    return y


# Small shapes: every backend (Triton runs through the interpreter on the CPU).
SMALL = [
    (1, 1, 1, 0.0),
    (7, 13, 1, 0.5),     # a single column: the gather dot product
    (9, 31, 5, 0.7),     # K, N not multiples of 8/16
    (33, 70, 17, 0.9),
    (16, 24, 33, 0.0),   # 0% sparsity (dense)
    (12, 20, 19, 1.0),   # 100% sparsity: every row empty
    (5, 40, 129, 0.8),   # N over one AVX-512 tile, with a partial vector
]


@pytest.mark.parametrize("m,k,n,sparsity", SMALL)
@pytest.mark.parametrize("bias,relu", [(False, False), (True, True)])
def test_matches_dense(backend, device_for, m, k, n, sparsity, bias, relu):
    w = sparse_matrix(m, k, sparsity)
    b = randn(m, seed=3) if bias else None
    assert_matches_dense(backend, device_for(backend), w, randn(k, n), b, relu)


def test_empty_rows(backend, device_for):
    w = sparse_matrix(24, 37, 0.6, empty_rows=(0, 5, 6, 23))
    y = assert_matches_dense(backend, device_for(backend), w, randn(37, 21), randn(24, seed=2), relu=False)
    torch.testing.assert_close(y[5], torch.full_like(y[5], float(randn(24, seed=2)[5])))


@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded_rows"])
def test_non_contiguous_x(backend, device_for, layout):
    device = device_for(backend)
    w = sparse_matrix(19, 23, 0.7)
    if layout == "transposed":
        x = randn(17, 23).t()                 # column stride != 1
    elif layout == "sliced":
        x = randn(23, 40)[:, 3:30:2]          # strided columns
    else:
        x = randn(46, 18)[::2]                # row stride 2*N
    assert not x.is_contiguous()
    assert_matches_dense(backend, device, w, x)


def test_vector_x(backend, device_for):
    device = device_for(backend)
    w = sparse_matrix(11, 29, 0.5)
    sw = SparseWeight.from_dense(w).to(device)
    x = randn(29, device=device)
    y = s2h_kernels.spmm(sw, x, backend=backend)
    assert y.shape == (11,)
    torch.testing.assert_close(y, w.to(device) @ x, rtol=1e-5, atol=1e-5)


def test_float64(backend, device_for):
    w = sparse_matrix(21, 35, 0.6, dtype=torch.float64)
    assert_matches_dense(backend, device_for(backend), w, randn(35, 13, dtype=torch.float64), randn(21, dtype=torch.float64), True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_fp32(backend, device_for, dtype):
    device = device_for(backend)
    w = sparse_matrix(16, 40, 0.7)
    sw = SparseWeight.from_dense(w).to(device)
    x = randn(40, 9).to(dtype).to(device)
    y = s2h_kernels.spmm(sw, x, backend=backend)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), (w.to(device) @ x.float()), rtol=1e-2, atol=1e-2)


# ---- CPU kernel: every ISA, shapes that exercise tiles, K panels, threads and tails ----

LARGE = [
    (64, 576, 200, 0.7),    # K panels (rows long enough), partial last tile
    (256, 300, 49, 0.9),    # N = 49: 4 vectors, masked tail
    (64, 200, 34, 0.5),     # N = 34: two vectors + two dot-kernel tail columns
    (64, 100, 17, 0.3),     # N = 17: one vector + one tail column
    (300, 500, 1, 0.9),     # N = 1 gather path, many rows
    (3, 1000, 700, 0.95),   # few rows: the tiles are split over threads
    (130, 64, 300, 0.98),   # nearly empty rows
    (40, 129, 16, 0.5),
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m,k,n,sparsity", LARGE)
def test_cpu_isas(cpu_env, isa, m, k, n, sparsity):
    cpu_env(S2H_CPU_ISA=isa)
    w = sparse_matrix(m, k, sparsity, seed=m + k)
    assert_matches_dense("cpu", torch.device("cpu"), w, randn(k, n, seed=n), randn(m, seed=7), relu=True)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n", [17, 34, 49, 50, 64])
def test_cpu_tail_columns_by_dot_kernel(cpu_env, isa, n):
    # S2H_SPMM_TAIL_X=0: take the dot-kernel path for the 1-2 last columns whatever the size of X.
    cpu_env(S2H_CPU_ISA=isa, S2H_SPMM_TAIL_X="0")
    w = sparse_matrix(48, 150, 0.6, seed=n)
    assert_matches_dense("cpu", torch.device("cpu"), w, randn(150, n + 5, seed=n)[:, 5:], randn(48, seed=3), relu=True)


@pytest.mark.parametrize("keep", ["default", "0"])
def test_cpu_scratch_reused_across_calls(cpu_env, keep):
    # The aligned copy of X (and its tail columns) lives in a per-thread buffer that the next call
    # reuses: a smaller call after a larger one must read only its own X.  keep=0: no buffer is
    # kept, every copy gets a fresh tensor (the path of copies over 64 MB).
    if keep != "default":
        cpu_env(S2H_SPMM_KEEP_SCRATCH=keep)
    cases = [(96, 400, 196, 0.6), (48, 64, 17, 0.2), (96, 400, 34, 0.5), (48, 64, 17, 0.2), (20, 30, 40, 0.0)]
    for i, (m, k, n, sp) in enumerate(cases):
        w, x = sparse_matrix(m, k, sp, seed=i), randn(k, n + 3, seed=i)[:, 3:]  # misaligned rows
        assert_matches_dense("cpu", torch.device("cpu"), w, x, randn(m, seed=i), relu=i % 2 == 1)


@pytest.mark.parametrize("n", [1, 5, 20, 49])
def test_cpu_empty_k(n):
    # K == 0: W @ X is zero, the output is the bias (after ReLU) in every column.
    sw = SparseWeight.from_dense(torch.zeros(6, 0))
    bias = randn(6, seed=4)
    y = s2h_kernels.spmm(sw, torch.zeros(0, n), bias, relu=True)
    torch.testing.assert_close(y, torch.relu(bias)[:, None].expand(6, n))


@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_threads_agree(threads):
    with num_threads(threads):
        assert_matches_dense("cpu", torch.device("cpu"), sparse_matrix(97, 333, 0.8), randn(333, 150), randn(97), relu=True)


def test_cpu_isa_env_rejects_unknown(cpu_env):
    # Every op refusing it while it is set: tests/kernels/test_cpu_config.py.
    with pytest.raises(RuntimeError, match="S2H_CPU_ISA=sse9 is not one of avx512, avx2, scalar, auto"):
        cpu_env(S2H_CPU_ISA="sse9")


# ---- conv ----

CONVS = [
    # (batch, c_in, h, w, c_out, kernel, stride, padding, dilation, groups)
    (2, 4, 9, 11, 6, 3, 1, 1, 1, 1),
    (1, 6, 10, 7, 4, 3, 2, 1, 1, 2),
    (2, 3, 8, 8, 5, 1, 1, 0, 1, 1),        # 1x1 direct
    (1, 4, 9, 9, 8, 1, 2, 0, 1, 1),        # 1x1 strided
    (1, 4, 12, 13, 4, 3, 2, 2, 2, 4),      # depthwise, dilated, strided
    (1, 3, 7, 7, 5, 5, 3, 2, 1, 1),
    (2, 8, 6, 6, 8, 1, 1, 1, 1, 2),        # 1x1 with padding
    (1, 5, 11, 6, 7, (3, 1), (1, 2), (1, 0), (2, 1), 1),  # non-square everything
    (3, 16, 5, 5, 16, 3, 1, 0, 1, 1),      # no padding
    (1, 2, 4, 5, 3, 3, 1, 17, 1, 1),       # padding wider than a vector
]


def _pair(v):
    return (v, v) if isinstance(v, int) else v


def assert_conv_matches(backend, device, batch, cin, h, w_, cout, kernel, stride, padding, dilation, groups,
                        sparsity=0.6, dtype=torch.float32, relu=True):
    kh, kw = _pair(kernel)
    weight = sparse_matrix(cout, cin // groups * kh * kw, sparsity, dtype=dtype, seed=cin + cout)
    sw = SparseWeight.from_dense(weight).to(device)
    x = randn(batch, cin, h, w_, dtype=dtype, device=device)
    bias = randn(cout, dtype=dtype, seed=5, device=device)
    y = s2h_kernels.spmm_conv2d(sw, x, (kh, kw), bias, stride, padding, dilation, groups, relu, backend=backend)
    ref = F.conv2d(x, weight.to(device).reshape(cout, cin // groups, kh, kw), bias, stride, padding, dilation, groups)
    ref = torch.relu(ref) if relu else ref
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=1e-4 if dtype == torch.float32 else 1e-9,
                               atol=1e-4 if dtype == torch.float32 else 1e-9)


@pytest.mark.parametrize("cfg", CONVS)
def test_conv_matches_conv2d(backend, device_for, cfg):
    assert_conv_matches(backend, device_for(backend), *cfg)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("cfg", [
    (2, 64, 14, 14, 32, 3, 1, 1, 1, 1),
    (1, 32, 15, 17, 64, 3, 2, 1, 1, 1),
    (4, 64, 7, 7, 128, 3, 1, 1, 1, 1),
    (2, 64, 8, 8, 64, 1, 2, 0, 1, 1),
])
@pytest.mark.parametrize("sparsity", [0.0, 0.7, 0.95])
def test_conv_cpu_isas(cpu_env, isa, cfg, sparsity):
    cpu_env(S2H_CPU_ISA=isa)
    assert_conv_matches("cpu", torch.device("cpu"), *cfg, sparsity=sparsity)


@pytest.mark.parametrize("isa", ISAS)
def test_cpu_streaming_stores(cpu_env, isa):
    # S2H_SPMM_STREAM=0: non-temporal stores for every output size (by default above 2 MB),
    # on the plain-row paths they apply to: a matmul with aligned rows and a batched 1x1 conv.
    cpu_env(S2H_CPU_ISA=isa, S2H_SPMM_STREAM="0")
    assert_matches_dense("cpu", torch.device("cpu"), sparse_matrix(40, 90, 0.8), randn(90, 160), randn(40, seed=2), relu=True)
    assert_conv_matches("cpu", torch.device("cpu"), 3, 24, 8, 8, 48, 1, 1, 0, 1, 1, sparsity=0.9)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("cfg", [
    (3, 16, 30, 30, 24, 3, 1, 1, 1, 1),   # many output tiles: contiguous tile runs per thread
    (3, 16, 31, 61, 24, 3, 2, 1, 1, 2),   # the same, stride 2 and groups
    (2, 64, 8, 8, 128, 3, 1, 1, 1, 1),    # few tiles, many rows: rows split between threads
    (1, 16, 30, 30, 24, 3, 1, 1, 1, 1),   # batch 1: each thread copies the input rows of its tiles
    (1, 16, 31, 61, 24, 3, 2, 1, 1, 2),   # the same, stride 2 and groups
    (1, 8, 20, 40, 16, 3, 1, 2, 2, 1),    # the same, dilated (taps shift rows by 2)
    (1, 4, 4, 5, 3, 3, 1, 17, 1, 1),      # the same, padding wider than the input
    (1, 64, 8, 8, 128, 3, 1, 1, 1, 1),    # batch 1, rows split: each thread copies all the input
])
def test_conv_cpu_threads(threads, cfg):
    # Large enough to run on several threads. Batch > 1: the padded input is copied once, by
    # (image, row) or (image, channel) ranges, and each thread computes a contiguous run of output
    # tiles. Batch 1: each thread copies the input rows its tiles read (all of them when the
    # threads split the output rows) into its own buffer.
    with num_threads(threads):
        assert_conv_matches("cpu", torch.device("cpu"), *cfg, sparsity=0.7)


@pytest.mark.parametrize("cfg", [
    (1, 16, 30, 30, 24, 3, 1, 1, 1, 1),   # tiles split: each thread copies its rows
    (1, 64, 8, 8, 128, 3, 1, 1, 1, 1),    # rows split: each thread copies all of the input
])
def test_conv_cpu_threads_fresh_buffers(cpu_env, cfg):
    # A 1 KB scratch limit: every copy of the input is a fresh tensor, which must stay alive
    # until the thread's product has read it (it did not: a copy over 64 MB was read freed).
    cpu_env(S2H_SPMM_KEEP_SCRATCH="1024")
    with num_threads(2):
        for _ in range(3):  # freed memory gets reused by the next call's allocations
            assert_conv_matches("cpu", torch.device("cpu"), *cfg, sparsity=0.7)


def test_conv_cpu_no_input_channels():
    # C = 0: W @ X is empty, the output is the bias.
    sw = SparseWeight.from_dense(torch.zeros(3, 0))
    bias = randn(3, seed=7)
    y = s2h_kernels.spmm_conv2d(sw, torch.zeros(1, 0, 6, 6), 3, bias, padding=1)
    torch.testing.assert_close(y, bias[None, :, None, None].expand(1, 3, 6, 6))


def test_conv_float64_and_unbatched(backend, device_for):
    device = device_for(backend)
    assert_conv_matches(backend, device, 2, 4, 7, 9, 6, 3, 2, 1, 1, 2, dtype=torch.float64)
    weight = sparse_matrix(5, 3 * 9, 0.5)
    sw = SparseWeight.from_dense(weight).to(device)
    x = randn(3, 8, 8, device=device)
    y = s2h_kernels.spmm_conv2d(sw, x, 3, padding=1, backend=backend)
    torch.testing.assert_close(y, F.conv2d(x[None], weight.to(device).reshape(5, 3, 3, 3), padding=1)[0],
                               rtol=1e-4, atol=1e-4)


# ---- torch.library: schema / fake kernels, torch.compile ----

# ---- N == 1 on the CPU: the SELL-16 kernel (s2h::spmv_sell) ----

SELL = [
    (1, 5, 0.0),
    (15, 40, 0.7),     # one partial slice
    (16, 33, 0.9),     # exactly one slice
    (17, 64, 0.5),     # a slice of one row
    (100, 300, 0.95),  # uneven rows, sorted into slices
    (40, 20, 1.0),     # every row empty: bias only
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m,k,sparsity", SELL)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("loads", ["0", "1"])  # x by gather instructions / by lane loads
def test_spmv_sell_matches_dense(cpu_env, isa, m, k, sparsity, threads, loads):
    cpu_env(S2H_CPU_ISA=isa, S2H_SPMM_SELL_LOADS=loads)
    with num_threads(threads):
        w = sparse_matrix(m, k, sparsity, seed=m + k, empty_rows=(0,) if m > 2 else ())
        sw, x, bias = SparseWeight.from_dense(w), randn(k, 1, seed=k), randn(m, seed=5)
        ref = reference.spmm(sw, x, bias, relu=True)
        y = torch.ops.s2h.spmv_sell(*sw.sell(), m, x, bias, True)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s2h_kernels.spmm(sw, x[:, 0]), reference.spmm(sw, x[:, 0]), rtol=1e-5, atol=1e-5)


def test_spmv_sell_many_threads_balanced():
    # Enough packed entries for the slice ranges of several threads (2^14 per thread).
    with num_threads(2):
        assert_matches_dense("cpu", torch.device("cpu"), sparse_matrix(700, 400, 0.8, seed=3), randn(400, 1, seed=3)[::1], randn(700))


@pytest.mark.parametrize("layout", ["(K,)", "(K, 1)", "(1, K)", "strided (K, 1)", "strided (1, K)"])
def test_spmv_sell_output_follows_x_layout(layout):
    # y in x's layout, with no reshape by the caller: (K,) -> (M,), (K, 1) -> (M, 1), (1, K) -> (1, M);
    # x whose values are not one apart is copied first.
    m, k = 37, 50
    sw = SparseWeight.from_dense(sparse_matrix(m, k, 0.7, seed=4))
    col, bias = randn(k, 1, seed=2), randn(m, seed=6)
    strided = randn(k, 3, seed=2)[:, 1:2]  # values 3 apart
    x = {"(K,)": col[:, 0], "(K, 1)": col, "(1, K)": col.t().contiguous(),
         "strided (K, 1)": strided, "strided (1, K)": strided.t()}[layout]
    if layout.startswith("strided"):
        col = strided
    y = torch.ops.s2h.spmv_sell(*sw.sell(), m, x, bias, True)
    shape = {1: (m,), 2: (1, m) if x.shape[0] == 1 else (m, 1)}[x.dim()]
    assert y.shape == shape and y.is_contiguous()
    torch.testing.assert_close(y.reshape(m, 1), reference.spmm(sw, col, bias, relu=True), rtol=1e-5, atol=1e-5)
    # The fake kernel agrees (torch.compile / export).
    torch.library.opcheck(torch.ops.s2h.spmv_sell.default, (*sw.sell(), m, x, bias, True))


def test_spmv_sell_single_column_weight():
    # K == 1: a (1, 1) x is a column, y is (M, 1).
    sw = SparseWeight.from_dense(sparse_matrix(20, 1, 0.5, seed=1))
    x = randn(1, 1)
    y = torch.ops.s2h.spmv_sell(*sw.sell(), 20, x, None, False)
    assert y.shape == (20, 1)
    torch.testing.assert_close(y, reference.spmm(sw, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", [i for i in ISAS if i.values[0] != "scalar"])
def test_spmv_sell_loads_equal_gathers(cpu_env, isa):
    # x by lane loads (S2H_SPMM_SELL_LOADS=1, the default on AMD) and by gather instructions: the
    # same products in the same order, so the same bits.
    w = sparse_matrix(300, 200, 0.9, seed=9, empty_rows=(0, 7))
    sw, x, bias = SparseWeight.from_dense(w), randn(200, 1, seed=2), randn(300, seed=3)
    out = []
    for loads in ("0", "1"):
        cpu_env(S2H_CPU_ISA=isa, S2H_SPMM_SELL_LOADS=loads)
        out.append(torch.ops.s2h.spmv_sell(*sw.sell(), 300, x, bias, True))
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("work", ["1", "256", "default"])
def test_spmv_sell_parallel_threshold(cpu_env, threads, work):
    # S2H_SPMM_SELL_WORK: packed entries per thread before the batch-1 kernel splits the slices.
    if work != "default":
        cpu_env(S2H_SPMM_SELL_WORK=work)
    with num_threads(threads):
        for m, k, sp in [(1000, 512, 0.98), (50, 64, 0.5), (17, 9, 0.9)]:
            w = sparse_matrix(m, k, sp, seed=m)
            assert_matches_dense("cpu", torch.device("cpu"), w, randn(k, 1, seed=k), randn(m, seed=2), relu=True)


def test_sell_packing_follows_the_weight():
    w = sparse_matrix(20, 30, 0.6)
    sw = SparseWeight.from_dense(w)
    x = randn(30, 1)
    first = s2h_kernels.spmm(sw, x)
    values, cols, slice_ptr, rows = sw.sell()
    assert sw.sell()[0] is values  # cached
    assert sorted(rows[rows >= 0].tolist()) == list(range(20)) and slice_ptr[-1] == values.numel()
    sw.values.mul_(2)  # in place: the packing is rebuilt
    torch.testing.assert_close(s2h_kernels.spmm(sw, x), 2 * first)


def test_sell_custom_row_order_and_bad_order():
    w = sparse_matrix(37, 50, 0.7, seed=2)
    base = SparseWeight.from_dense(w)
    x = randn(50, 1)
    # Any permutation is a valid order (only the padding changes): reversed, longest last.
    rev = SparseWeight(base.values, base.row_ptr, base.col_idx, base.shape, base.row_order.flip(0).contiguous())
    torch.testing.assert_close(s2h_kernels.spmm(rev, x), w @ x, rtol=1e-5, atol=1e-5)
    dup = base.row_order.clone()
    dup[1] = dup[0]
    bad = SparseWeight(base.values, base.row_ptr, base.col_idx, base.shape, dup)
    with pytest.raises(ValueError, match="permutation"):
        s2h_kernels.spmm(bad, x)


def test_sell_inference_tensors():
    # Weights packed under inference_mode have no version counter; the packing still caches.
    with torch.inference_mode():
        sw = SparseWeight.from_dense(sparse_matrix(20, 30, 0.6))
        x = randn(30, 1)
        y = s2h_kernels.spmm(sw, x)
        assert sw.sell()[0] is sw.sell()[0]
    torch.testing.assert_close(y, reference.spmm(sw, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n", [1, 40])
def test_relu_keeps_nan_like_torch(cpu_env, isa, n):
    cpu_env(S2H_CPU_ISA=isa)
    # A NaN in row 3 of x reaches the outputs of the rows with a nonzero in column 3 (a sparse
    # product never multiplies the pruned zeros), and the ReLU must keep it, as torch.relu does.
    w = sparse_matrix(24, 10, 0.5, seed=1)
    x, bias = randn(10, n), randn(24)
    sw = SparseWeight.from_dense(w)
    expected = reference.spmm(sw, x.index_fill(0, torch.tensor([3]), 0.0), bias, relu=True)
    expected[w[:, 3] != 0] = float("nan")
    x[3] = float("nan")
    y = s2h_kernels.spmm(sw, x, bias, relu=True)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert 0 < int(y.isnan().any(dim=1).sum()) < 24


def test_spmv_sell_rejects_bad_input():
    sw = SparseWeight.from_dense(sparse_matrix(20, 30, 0.6))
    values, cols, slice_ptr, rows = sw.sell()
    x = randn(30, 1)
    with pytest.raises(RuntimeError, match="rows"):
        torch.ops.s2h.spmv_sell(values, cols, slice_ptr, torch.where(rows == 3, 25, rows), 20, x, None, False)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.s2h.spmv_sell(values.double(), cols, slice_ptr, rows, 20, x.double(), None, False)
    with pytest.raises(RuntimeError, match=r"one column, \(K,\), \(K, 1\) or \(1, K\)"):
        torch.ops.s2h.spmv_sell(values, cols, slice_ptr, rows, 20, randn(30, 2), None, False)
    with pytest.raises(RuntimeError, match=r"one column"):
        torch.ops.s2h.spmv_sell(values, cols, slice_ptr, rows, 20, randn(1, 30, 1), None, False)
    with pytest.raises(RuntimeError, match="slice_ptr"):
        torch.ops.s2h.spmv_sell(values, cols, slice_ptr + 1, rows, 20, x, None, False)
    ragged = slice_ptr.clone()
    ragged[1] += 1  # a slice that is not whole steps of 16 lanes
    with pytest.raises(RuntimeError, match="multiple of 16"):
        torch.ops.s2h.spmv_sell(values, cols, ragged, rows, 20, x, None, False)


def test_opcheck_cpu():
    sw = SparseWeight.from_dense(sparse_matrix(10, 12, 0.5))
    x = randn(12, 7)
    torch.library.opcheck(torch.ops.s2h.spmm.default, (sw.values, sw.row_ptr, sw.col_idx, None, x, randn(10), True))
    sw2 = SparseWeight.from_dense(sparse_matrix(6, 4 * 9, 0.5))
    xc = randn(2, 4, 7, 8)
    torch.library.opcheck(torch.ops.s2h.spmm_conv2d.default,
                          (sw2.values, sw2.row_ptr, sw2.col_idx, xc, None, [3, 3], [2, 1], [1, 1], [1, 1], 1, False))
    torch.library.opcheck(torch.ops.s2h.spmv_sell.default, (*sw.sell(), 10, randn(12, 1), randn(10), True))


def test_opcheck_triton(device_for):
    device = device_for("triton")
    sw = SparseWeight.from_dense(sparse_matrix(10, 12, 0.5)).to(device)
    torch.library.opcheck(torch.ops.s2h.spmm_triton.default,
                          (sw.values, sw.row_ptr, sw.col_idx, sw.row_order, randn(12, 7, device=device), None, False))


@pytest.mark.parametrize("n", [11, 1])
def test_torch_compile_fullgraph(n):
    # n == 1 takes the SELL-16 kernel eagerly and the CSR op under torch.compile (the SELL
    # packing is built from data and cannot be traced).
    sw = SparseWeight.from_dense(sparse_matrix(20, 30, 0.8))
    bias = randn(20)

    def f(x):
        return s2h_kernels.spmm(sw, torch.sin(x), bias, relu=True) * 2

    x = randn(30, n)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), f(x))


# ---- packing and bad input ----

def test_sparse_weight_round_trip():
    w = sparse_matrix(13, 17, 0.6, empty_rows=(4,))
    sw = SparseWeight.from_dense(w)
    assert sw.nnz == int((w != 0).sum())
    assert sw.shape == (13, 17)
    torch.testing.assert_close(sw.to_dense(), w)
    counts = (sw.row_ptr[1:] - sw.row_ptr[:-1])
    assert (counts[sw.row_order.long()].diff() <= 0).all()   # row swizzle: longest rows first
    mask = torch.zeros(13, 17, dtype=torch.bool)
    mask[0, :3] = True
    assert SparseWeight.from_dense(w, mask=mask).nnz == 3


def test_bad_input():
    sw = SparseWeight.from_dense(sparse_matrix(8, 10, 0.5))
    x = randn(10, 4)
    with pytest.raises(ValueError, match="2-D"):
        SparseWeight.from_dense(torch.randn(4, 3, 3))
    with pytest.raises(ValueError, match="K = 10"):
        s2h_kernels.spmm(sw, randn(9, 4))
    with pytest.raises(ValueError, match="floating-point"):
        s2h_kernels.spmm(sw, torch.ones(10, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="floating-point"):
        SparseWeight.from_dense(torch.ones(3, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="SparseWeight"):
        s2h_kernels.spmm(torch.randn(8, 10), x)
    with pytest.raises(ValueError, match="bias"):
        s2h_kernels.spmm(sw, x, bias=torch.randn(7))
    with pytest.raises(ValueError, match="dtype"):
        s2h_kernels.spmm(sw, x.double())
    with pytest.raises(ValueError, match="2-D"):
        s2h_kernels.spmm(sw, torch.randn(2, 10, 4))
    with pytest.raises(ValueError, match="backend"):
        s2h_kernels.spmm(sw, x, backend="tpu")
    with pytest.raises(RuntimeError, match="inference only"):
        s2h_kernels.spmm(sw, x.clone().requires_grad_(True))
    with torch.no_grad():
        s2h_kernels.spmm(sw, x.clone().requires_grad_(True))   # fine without grad mode
    csw = SparseWeight.from_dense(sparse_matrix(6, 4 * 9, 0.5))
    with pytest.raises(ValueError, match="expected C/groups"):
        s2h_kernels.spmm_conv2d(csw, randn(1, 5, 8, 8), 3)
    with pytest.raises(ValueError, match="groups"):
        s2h_kernels.spmm_conv2d(csw, randn(1, 4, 8, 8), 3, groups=3)
    with pytest.raises(ValueError, match="smaller than"):
        s2h_kernels.spmm_conv2d(csw, randn(1, 4, 2, 2), 3)


def test_cpp_op_rejects_bad_csr():
    sw = SparseWeight.from_dense(sparse_matrix(4, 6, 0.5))
    with pytest.raises(RuntimeError, match="row_ptr"):
        torch.ops.s2h.spmm(sw.values, sw.row_ptr.long(), sw.col_idx, None, randn(6, 3), None, False)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.s2h.spmm(sw.values, sw.row_ptr, sw.col_idx, None, torch.ones(6, 3, dtype=torch.int32), None, False)
    bad = sw.row_ptr.clone()
    bad[-1] += 1
    with pytest.raises(RuntimeError, match="nnz"):
        torch.ops.s2h.spmm(sw.values, bad, sw.col_idx, None, randn(6, 3), None, False)
