"""The per-call paths of the sparse product: the fast path of ``s2h_kernels.spmm`` (CPU, the weight's
dtype, no autograd) and the batch-1 path of ``s2h.sparse.SparseLinear`` (the SELL-16 op on the
(1, K) input as it is) give the results and the errors of the general path."""
import pytest
import torch
from torch import nn

import s2h_kernels
from s2h.sparse import SparseLinear
from s2h_kernels import SparseWeight, reference

from test_spmm import randn, sparse_matrix


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [None, 1, 7])
@pytest.mark.parametrize("bias,relu", [(False, False), (True, True)])
def test_fast_path_matches_reference(dtype, n, bias, relu):
    m, k = 40, 70
    sw = SparseWeight.from_dense(sparse_matrix(m, k, 0.9, dtype=dtype, seed=3))
    x = randn(k, dtype=dtype, seed=4) if n is None else randn(k, n, dtype=dtype, seed=4)
    b = randn(m, dtype=dtype, seed=5) if bias else None
    with torch.no_grad():
        y = s2h_kernels.spmm(sw, x, b, relu)
    ref = reference.spmm(sw, x if n is not None else x[:, None], b, relu)
    ref = ref if n is not None else ref[:, 0]
    assert y.shape == ref.shape and y.dtype == dtype
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    # Same result as the general path (backend given: no fast path).
    torch.testing.assert_close(y, s2h_kernels.spmm(sw, x, b, relu, backend="cpu"), rtol=0, atol=0)


def test_fast_path_keeps_the_errors():
    sw = SparseWeight.from_dense(sparse_matrix(8, 10, 0.5))
    with pytest.raises(ValueError, match="2-D"):
        s2h_kernels.spmm(sw, torch.tensor(1.0))
    with pytest.raises(ValueError, match="K = 10"):
        s2h_kernels.spmm(sw, randn(9))
    with pytest.raises(ValueError, match="bias"):
        s2h_kernels.spmm(sw, randn(10, 1), bias=randn(8, 1))
    with pytest.raises(ValueError, match="bias"):
        s2h_kernels.spmm(sw, randn(10, 1), bias=[0.0] * 8)
    with pytest.raises(ValueError, match="dtype"):
        s2h_kernels.spmm(sw, randn(10, 1, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="inference only"):
        s2h_kernels.spmm(sw, randn(10, 1).requires_grad_(True))
    weighted = SparseWeight(sw.values.clone().requires_grad_(True), sw.row_ptr, sw.col_idx, sw.shape)
    with pytest.raises(RuntimeError, match="inference only"):
        s2h_kernels.spmm(weighted, randn(10, 3))
    with pytest.raises(RuntimeError, match="inference only"):
        s2h_kernels.spmm(sw, randn(10, 3), bias=randn(8).requires_grad_(True))
    with torch.no_grad():
        s2h_kernels.spmm(weighted, randn(10, 3))  # fine without grad mode
    with pytest.raises(RuntimeError, match="bias dtype"):  # float64 bias, float32 weight and x: C++
        s2h_kernels.spmm(sw, randn(10, 3), bias=randn(8, dtype=torch.float64))


def test_fast_path_follows_in_place_values():
    sw = SparseWeight.from_dense(sparse_matrix(30, 20, 0.8))
    x = randn(20)
    first = s2h_kernels.spmm(sw, x)
    sw.values.mul_(-3)
    torch.testing.assert_close(s2h_kernels.spmm(sw, x), -3 * first)


def linear_pair(k=64, m=30, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, m, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(m, k) > 0.9)
    return lin, SparseLinear.from_dense(lin)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("relu", [False, True])
def test_sparse_linear_batch1_row_input(bias, relu):
    lin, sl = linear_pair(bias=bias)
    sl.relu = relu
    x = torch.randn(1, 64)
    with torch.no_grad():
        y = sl(x)
        ref = torch.relu(lin(x)) if relu else lin(x)
        assert y.shape == (1, 30) and y.is_contiguous()
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        # The same values as the general path's (K, 1) column.
        torch.testing.assert_close(y, s2h_kernels.spmm(sl.sparse_weight, x.t(), sl.bias, relu).t(), rtol=0, atol=0)
        torch.testing.assert_close(sl(x[0]), ref[0], rtol=1e-5, atol=1e-5)  # (K,): the general path


def test_sparse_linear_batch1_follows_in_place_changes():
    lin, sl = linear_pair()
    x = torch.randn(1, 64)
    with torch.no_grad():
        first = sl(x)
        sl.values.mul_(2)  # in place: the SELL packing is rebuilt
        torch.testing.assert_close(sl(x), 2 * (first - lin.bias) + lin.bias, rtol=1e-5, atol=1e-5)
        other, _ = linear_pair(seed=0)
        other.weight.mul_(-1)
        sl.load_state_dict(SparseLinear.from_dense(other).state_dict())  # copies into the buffers
        torch.testing.assert_close(sl(x), other(x), rtol=1e-5, atol=1e-5)
        sl.bias.zero_()
        torch.testing.assert_close(sl(x), x @ other.weight.t(), rtol=1e-5, atol=1e-5)


def test_sparse_linear_batch1_single_feature_and_inference_mode():
    lin, sl = linear_pair(k=1, m=12)
    x = torch.randn(1, 1)
    with torch.no_grad():
        assert sl(x).shape == (1, 12)
        torch.testing.assert_close(sl(x), lin(x), rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        lin, sl = linear_pair()
        x = torch.randn(1, 64)
        torch.testing.assert_close(sl(x), lin(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sl(x), lin(x), rtol=1e-5, atol=1e-5)


def test_sparse_linear_batch1_errors():
    _, sl = linear_pair()
    with torch.no_grad():
        sl(torch.randn(1, 64))  # the cache is built
    with pytest.raises(ValueError, match="expected 64"):
        sl(torch.randn(1, 63))
    with pytest.raises(RuntimeError, match="inference only"):
        sl(torch.randn(1, 64, requires_grad=True))
    with pytest.raises(ValueError, match="dtype"):
        sl(torch.randn(1, 64, dtype=torch.float64))
