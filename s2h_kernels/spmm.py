"""Sparse (unstructured) weight x dense matmul for pruned models (DESIGN §4).

``y = act(W @ X + bias)`` with W (M x K) sparse and X (K x N) dense, and a direct sparse conv2d
built on the same kernels.

Packing, :class:`SparseWeight`: CSR by output row -- int32 ``row_ptr`` (M+1), int32 ``col_idx``
(nnz, sorted within a row), ``values`` (nnz) -- plus ``row_order`` (rows by decreasing nnz, the
"row swizzle" the GPU kernels schedule by).  CSR was kept over a column-delta encoding: the CPU
kernel turns columns into X element offsets once per call (per thread, for its own rows), which
costs one pass over nnz and leaves the inner loop a plain load + FMA.  Conv weights
(M, C/groups, kh, kw) are packed as the (M, C/groups*kh*kw) matrix in ``F.unfold`` column order.

Backends:
  * CPU, C++ (csrc/cpu/spmm.cpp): a micro-kernel vectorised along N.  Per output row and tile of
    N it keeps the tile in registers (AVX-512: all of N up to 256 columns = 16 zmm accumulators,
    else 128-column tiles; AVX2: 64 columns), and per nonzero broadcasts the weight and FMAs one
    X row segment into it; short tiles split a row's nonzeros over several accumulator sets to
    keep ~8 FMA chains in flight.  K panels sized to L1 when a row keeps enough nonzeros per panel
    (always worth it for a conv: the kh*kw taps of a channel share cache lines).  Threads: an
    nnz-balanced partition of the rows (or of the N tiles, when X outweighs W), in several chunks
    per thread pulled dynamically.  Runtime ISA dispatch AVX-512 / AVX2 / portable through
    ``__builtin_cpu_supports`` (no -march=native); ``S2H_SPMM_ISA=avx2|scalar`` forces a lower
    one.  N == 1 (a Linear layer at batch 1) in float32 runs ``s2h::spmv_sell`` on a SELL-16
    packing (:meth:`SparseWeight.sell`, built once and cached): one gather and one FMA per 16
    nonzeros of 16 rows; float64 runs a gather dot product per row.  X rows that do not start on
    a cache line are copied aligned once when each is reused enough (nnz >= 16 K).
  * CUDA tensors: Triton by default (the kernel below), CUDA C++ (csrc/cuda/spmm.cu, warp per
    row with the row swizzle) with ``backend="cuda"``.

Conv on the CPU never builds im2col: the input is copied once into a zero-padded, stride-phase
split buffer and every nonzero becomes an offset into it (csrc/common/spmm.h).  On CUDA the conv
runs as ``F.unfold`` + spmm.

Inference only: there is no autograd.  Calling with a tensor that requires grad while grad mode
is on raises ``RuntimeError``; run under ``torch.no_grad()`` / ``torch.inference_mode()``.
float32 and float64 run natively (float64 on the portable kernel); float16 / bfloat16 inputs are
computed in float32 and rounded once.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ._backend import check_float, check_same_device, resolve_backend

__all__ = ["SparseWeight", "spmm", "spmm_conv2d"]


# ----------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------


class SparseWeight:
    """A 2-D weight packed for :func:`spmm` (CSR by output row; see the module docstring).

    Build one with :meth:`from_dense`.  The tensors are plain attributes; ``to()`` moves them.
    """

    __slots__ = ("values", "row_ptr", "col_idx", "row_order", "shape", "_sell")

    def __init__(self, values: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                 shape: Sequence[int], row_order: Optional[torch.Tensor] = None):
        shape = tuple(int(s) for s in shape)
        if len(shape) != 2 or min(shape) < 0:
            raise ValueError(f"SparseWeight: shape must be (M, K), got {shape}")
        if row_ptr.dtype != torch.int32 or col_idx.dtype != torch.int32:
            raise ValueError(f"SparseWeight: row_ptr and col_idx must be int32, got {row_ptr.dtype}, {col_idx.dtype}")
        if row_ptr.dim() != 1 or row_ptr.numel() != shape[0] + 1:
            raise ValueError(f"SparseWeight: row_ptr must have M+1 = {shape[0] + 1} entries, got {tuple(row_ptr.shape)}")
        if values.dim() != 1 or col_idx.dim() != 1 or values.numel() != col_idx.numel():
            raise ValueError(f"SparseWeight: values and col_idx must be 1-D of equal length, got "
                             f"{tuple(values.shape)}, {tuple(col_idx.shape)}")
        self.values = values
        self.row_ptr = row_ptr
        self.col_idx = col_idx
        self.shape = shape
        if row_order is None:
            counts = (row_ptr[1:] - row_ptr[:-1]).long()
            row_order = torch.argsort(counts, descending=True, stable=True).to(torch.int32)
        self.row_order = row_order
        self._sell = None  # (packed tensors, values' version, packing) of sell(), built on first use

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: Optional[torch.Tensor] = None) -> "SparseWeight":
        """Pack the nonzeros of a 2-D weight (or the entries where ``mask`` is true).

        Explicit zeros inside ``mask`` are kept (the pattern is the mask's); without a mask the
        pattern is ``weight != 0``.
        """
        if not isinstance(weight, torch.Tensor):
            raise ValueError(f"SparseWeight.from_dense: weight must be a tensor, got {type(weight).__name__}")
        if weight.dim() != 2:
            raise ValueError(f"SparseWeight.from_dense: weight must be 2-D (M, K), got shape {tuple(weight.shape)}; "
                             "reshape conv weights to (out_channels, -1) or use s2h.sparse.SparseConv2d")
        check_float("SparseWeight.from_dense", "weight", weight)
        if weight.shape[0] * weight.shape[1] >= 2**31:
            raise ValueError(f"SparseWeight.from_dense: weight {tuple(weight.shape)} is too large for int32 indices")
        w = weight.detach()
        keep = (w != 0) if mask is None else mask.to(device=w.device, dtype=torch.bool)
        if keep.shape != w.shape:
            raise ValueError(f"SparseWeight.from_dense: mask shape {tuple(keep.shape)} != weight shape {tuple(w.shape)}")
        counts = keep.sum(dim=1)
        row_ptr = torch.zeros(w.shape[0] + 1, dtype=torch.int32, device=w.device)
        row_ptr[1:] = torch.cumsum(counts, 0).to(torch.int32)
        col_idx = keep.nonzero()[:, 1].to(torch.int32).contiguous()  # row-major: sorted within a row
        values = w[keep].contiguous()
        return cls(values, row_ptr, col_idx, w.shape)

    @property
    def nnz(self) -> int:
        return self.col_idx.numel()

    @property
    def density(self) -> float:
        total = self.shape[0] * self.shape[1]
        return self.nnz / total if total else 0.0

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def to(self, device=None, dtype=None) -> "SparseWeight":
        """A copy on ``device`` and/or with float ``dtype`` for the values."""
        values = self.values.to(device=device, dtype=dtype)
        return SparseWeight(values, self.row_ptr.to(device), self.col_idx.to(device), self.shape,
                            self.row_order.to(device))

    def sell(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The SELL-16 packing the CPU batch-1 kernel (``s2h::spmv_sell``) reads: built on first
        use, cached, rebuilt when ``values`` is replaced or modified in place.

        Returns ``(values, cols, slice_ptr, rows)``: the rows, longest first (``row_order``), are
        taken 16 at a time; slice s holds the j-th nonzero of each of its 16 rows side by side at
        ``[slice_ptr[s] + 16*j + lane]``, padded with zeros (column 0) to its longest row;
        ``rows[16*s + lane]`` is the output row of a lane, -1 past M.
        """
        tensors = (self.values, self.row_ptr, self.col_idx, self.row_order)
        # Inference tensors keep no version counter; they cannot be modified in place either.
        version = -1 if self.values.is_inference() else self.values._version
        cached = getattr(self, "_sell", None)  # (pickles made before the slot existed lack it)
        if cached is None or cached[1] != version or any(a is not b for a, b in zip(cached[0], tensors)):
            cached = self._sell = (tensors, version, _pack_sell(self))
        return cached[2]

    def to_dense(self) -> torch.Tensor:
        m, k = self.shape
        rows = torch.repeat_interleave(torch.arange(m, device=self.device),
                                       (self.row_ptr[1:] - self.row_ptr[:-1]).long())
        dense = torch.zeros(m, k, dtype=self.dtype, device=self.device)
        dense[rows, self.col_idx.long()] = self.values
        return dense

    def __repr__(self) -> str:
        return (f"SparseWeight(shape={self.shape}, nnz={self.nnz}, sparsity={self.sparsity:.1%}, "
                f"dtype={self.dtype}, device={self.device})")


def sell_applies(n: int, dtype: torch.dtype) -> bool:
    """Whether a CPU product with ``n`` columns in ``dtype`` runs ``s2h::spmv_sell`` (the SELL-16
    packing is built from data, so not while torch.compile traces)."""
    return n == 1 and dtype is torch.float32 and not torch.compiler.is_compiling()


def _pack_sell(sw: SparseWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SELL-16 packing of ``sw`` (see :meth:`SparseWeight.sell`), with torch ops."""
    m, dev = sw.shape[0], sw.device
    slices = (m + 15) // 16
    counts = (sw.row_ptr[1:] - sw.row_ptr[:-1]).long()
    order = sw.row_order.long()
    if order.shape != (m,) or not torch.equal(torch.sort(order).values, torch.arange(m, device=dev)):
        raise ValueError(f"SparseWeight.sell: row_order must be a permutation of the {m} rows")
    rows = torch.full((slices * 16,), -1, dtype=torch.int32, device=dev)
    rows[:m] = order.to(torch.int32)
    lengths = torch.zeros(slices * 16, dtype=torch.long, device=dev)
    lengths[:m] = counts[order]
    slice_ptr = torch.zeros(slices + 1, dtype=torch.long, device=dev)
    slice_ptr[1:] = torch.cumsum(lengths.view(slices, 16).amax(dim=1) * 16, 0)
    total = int(slice_ptr[-1])
    values = torch.zeros(total, dtype=sw.values.dtype, device=dev)
    cols = torch.zeros(total, dtype=torch.int32, device=dev)
    if sw.nnz:
        lane_of_row = torch.empty(m, dtype=torch.long, device=dev)
        lane_of_row[order] = torch.arange(m, device=dev)  # position of each row in the sorted order
        row = torch.repeat_interleave(torch.arange(m, device=dev), counts)
        step = torch.arange(sw.nnz, device=dev) - sw.row_ptr[:-1].long()[row]
        q = lane_of_row[row]
        pos = slice_ptr[q // 16] + 16 * step + q % 16
        values[pos] = sw.values
        cols[pos] = sw.col_idx
    return values, cols, slice_ptr, rows


# ----------------------------------------------------------------------------------------------
# Triton kernel: one program per (row, BLOCK_N columns); rows scheduled longest first.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _spmm_kernel(
    vals_ptr, row_ptr_ptr, col_ptr, order_ptr, x_ptr, bias_ptr, y_ptr, N, ldx, ldy,
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    row = tl.load(order_ptr + tl.program_id(0)).to(tl.int64)
    start = tl.load(row_ptr_ptr + row)
    end = tl.load(row_ptr_ptr + row + 1)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N], ACC)
    for j in range(start, end, BLOCK_K):
        mask_k = j + ks < end
        cols = tl.load(col_ptr + j + ks, mask=mask_k, other=0).to(tl.int64)
        w = tl.load(vals_ptr + j + ks, mask=mask_k, other=0.0).to(ACC)
        xt = tl.load(x_ptr + cols[:, None] * ldx + offs_n[None, :], mask=mask_k[:, None] & mask_n[None, :],
                     other=0.0).to(ACC)
        acc += tl.sum(w[:, None] * xt, axis=0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + row).to(ACC)
    if RELU:
        acc = tl.maximum(acc, 0.0)
    tl.store(y_ptr + row * ldy + offs_n, acc.to(y_ptr.dtype.element_ty), mask=mask_n)


@torch.library.custom_op("s2h::spmm_triton", mutates_args=())
def _spmm_triton(values: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor, row_order: torch.Tensor,
                 x: torch.Tensor, bias: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
    m, n = row_ptr.shape[0] - 1, x.shape[1]
    if x.stride(1) != 1:
        x = x.contiguous()
    y = x.new_empty((m, n))
    if m == 0 or n == 0:
        return y
    interpreted = x.device.type == "cpu"
    block_n = 32 if interpreted else max(16, min(128, triton.next_power_of_2(n)))
    block_k = 16 if interpreted else 32
    acc = tl.float64 if x.dtype == torch.float64 else tl.float32
    grid = (m, triton.cdiv(n, block_n))
    _spmm_kernel[grid](
        values, row_ptr, col_idx, row_order, x, bias if bias is not None else values, y, n, x.stride(0), n,
        HAS_BIAS=bias is not None, RELU=relu, BLOCK_N=block_n, BLOCK_K=block_k, ACC=acc,
    )
    return y


# ----------------------------------------------------------------------------------------------
# Fake kernels (torch.compile / meta).  No autograd: inference only (see the module docstring).
# ----------------------------------------------------------------------------------------------


@torch.library.register_fake("s2h::spmm")
def _spmm_fake(values, row_ptr, col_idx, row_order, x, bias, relu):
    return x.new_empty((row_ptr.shape[0] - 1, x.shape[1]))


@torch.library.register_fake("s2h::spmv_sell")
def _spmv_sell_fake(values, cols, slice_ptr, rows, m, x, bias, relu):
    return x.new_empty((m, 1))


@torch.library.register_fake("s2h::spmm_triton")
def _spmm_triton_fake(values, row_ptr, col_idx, row_order, x, bias, relu):
    return x.new_empty((row_ptr.shape[0] - 1, x.shape[1]))


def _conv_out(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


@torch.library.register_fake("s2h::spmm_conv2d")
def _spmm_conv2d_fake(values, row_ptr, col_idx, x, bias, kernel_size, stride, padding, dilation, groups, relu):
    ho = _conv_out(x.shape[2], kernel_size[0], stride[0], padding[0], dilation[0])
    wo = _conv_out(x.shape[3], kernel_size[1], stride[1], padding[1], dilation[1])
    return x.new_empty((x.shape[0], row_ptr.shape[0] - 1, ho, wo))


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------

_NATIVE = (torch.float32, torch.float64)


def _check_weight(op: str, sw) -> None:
    if not isinstance(sw, SparseWeight):
        raise ValueError(f"{op}: sparse_weight must be an s2h_kernels.SparseWeight (SparseWeight.from_dense(W)), "
                         f"got {type(sw).__name__}")


def _check_no_grad(op: str, *tensors) -> None:
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(f"{op}: inference only, there is no backward; run under torch.no_grad() or "
                           "torch.inference_mode() (or train with the dense layer)")


def _compute_dtype(op: str, sw: SparseWeight, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.dtype:
    """The dtype the kernel runs in: x's for float32/float64, float32 for half types."""
    check_float(op, "x", x)
    check_float(op, "sparse_weight values", sw.values)
    if bias is not None:
        check_float(op, "bias", bias)
    if x.dtype in _NATIVE:
        if sw.dtype != x.dtype:
            raise ValueError(f"{op}: sparse_weight dtype {sw.dtype} != x dtype {x.dtype} "
                             f"(use sparse_weight.to(dtype={x.dtype}))")
        return x.dtype
    return torch.float32


def _check_operands(op: str, sw, x) -> None:
    _check_weight(op, sw)
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{op}: x must be a tensor, got {type(x).__name__}")


def _resolve(op: str, sw: SparseWeight, x: torch.Tensor, bias: Optional[torch.Tensor],
             backend: Optional[str]) -> tuple[str, torch.dtype]:
    """Checks shared by spmm and spmm_conv2d (bias shape, dtypes, one device, no autograd).

    Returns the backend and the dtype the kernel runs in."""
    m = sw.shape[0]
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (m,)):
        raise ValueError(f"{op}: bias must be a tensor of shape ({m},), got "
                         f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
    values = sw.values
    # Common case first (float32/float64 everywhere, one device): no conversions, few checks.
    if x.dtype in _NATIVE and values.dtype is x.dtype and (bias is None or bias.dtype is x.dtype):
        cdt = x.dtype
    else:
        cdt = _compute_dtype(op, sw, x, bias)
    device = x.device
    if values.device != device or sw.row_ptr.device != device or (bias is not None and bias.device != device):
        check_same_device(op, values=values, row_ptr=sw.row_ptr, x=x, bias=bias)
    chosen = "cpu" if backend is None and device.type == "cpu" else resolve_backend(backend, device, op)
    _check_no_grad(op, x, values, bias)
    return chosen, cdt


def spmm(sparse_weight: SparseWeight, x: torch.Tensor, bias: Optional[torch.Tensor] = None, relu: bool = False,
         backend: Optional[str] = None) -> torch.Tensor:
    """``act(W @ x + bias)`` with W packed as a :class:`SparseWeight`.

    Args:
        sparse_weight: W (M x K).
        x: dense (K, N), any strides, or a vector (K,) (then the result is (M,)).
        bias: optional (M,).
        relu: fuse a ReLU after the bias.
        backend: ``"cpu"``, ``"cuda"`` (CUDA C++) or ``"triton"``; default by device.
    Returns:
        (M, N) in x's dtype.
    """
    op = "spmm"
    _check_operands(op, sparse_weight, x)
    vector = x.dim() == 1
    if vector:
        x = x.unsqueeze(1)
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D (K, N) or 1-D (K,), got shape {tuple(x.shape)}")
    m, k = sparse_weight.shape
    if x.shape[0] != k:
        raise ValueError(f"{op}: x has {x.shape[0]} rows but the weight has K = {k} columns "
                         f"(weight {sparse_weight.shape}, x {tuple(x.shape)})")
    chosen, cdt = _resolve(op, sparse_weight, x, bias, backend)
    values = sparse_weight.values
    out_dtype = x.dtype
    if cdt is not x.dtype:
        values, x = values.to(cdt), x.to(cdt)
        bias = bias.to(cdt) if bias is not None else None
    xc, b = x, bias
    if chosen == "triton":
        y = torch.ops.s2h.spmm_triton(values, sparse_weight.row_ptr, sparse_weight.col_idx, sparse_weight.row_order,
                                      xc, b, bool(relu))
    elif chosen == "cpu" and values is sparse_weight.values and sell_applies(x.shape[1], values.dtype):
        y = torch.ops.s2h.spmv_sell(*sparse_weight.sell(), m, xc, b, bool(relu))  # batch-1 Linear: SELL-16
    else:
        y = torch.ops.s2h.spmm(values, sparse_weight.row_ptr, sparse_weight.col_idx,
                               sparse_weight.row_order if chosen == "cuda" else None, xc, b, bool(relu))
    if y.dtype is not out_dtype:
        y = y.to(out_dtype)
    return y.squeeze(1) if vector else y


def _pair(name: str, v) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(a) for a in v)
    if len(v) != 2:
        raise ValueError(f"spmm_conv2d: {name} must be an int or a pair, got {v}")
    return v


def _grouped_full_weight(sw: SparseWeight, groups: int, kcols: int) -> SparseWeight:
    """The block-diagonal (M, groups*kcols) CSR of a grouped conv weight (for unfold + spmm)."""
    if groups == 1:
        return sw
    m = sw.shape[0]
    counts = (sw.row_ptr[1:] - sw.row_ptr[:-1]).long()
    group_of_row = torch.arange(m, device=sw.device) // (m // groups)
    shift = torch.repeat_interleave(group_of_row * kcols, counts)
    return SparseWeight(sw.values, sw.row_ptr, (sw.col_idx.long() + shift).to(torch.int32), (m, groups * kcols),
                        sw.row_order)


def spmm_conv2d(sparse_weight: SparseWeight, x: torch.Tensor, kernel_size, bias: Optional[torch.Tensor] = None,
                stride=1, padding=0, dilation=1, groups: int = 1, relu: bool = False,
                backend: Optional[str] = None) -> torch.Tensor:
    """``act(conv2d(x, W) + bias)`` with W (M, C/groups*kh*kw) packed in ``F.unfold`` column order.

    Same semantics as ``F.conv2d`` for integer or pair ``stride`` / ``padding`` / ``dilation``
    (zero padding) and ``groups``.  x is (B, C, H, W) or (C, H, W).
    """
    op = "spmm_conv2d"
    _check_operands(op, sparse_weight, x)
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be 4-D (B, C, H, W) or 3-D (C, H, W), got shape {tuple(x.shape)}")
    kh, kw = _pair("kernel_size", kernel_size)
    sh, sw_ = _pair("stride", stride)
    ph, pw = _pair("padding", padding)
    dh, dw = _pair("dilation", dilation)
    if min(kh, kw, sh, sw_, dh, dw) < 1 or min(ph, pw) < 0:
        raise ValueError(f"{op}: kernel_size, stride, dilation must be >= 1 and padding >= 0")
    m, k = sparse_weight.shape
    c = x.shape[1]
    if groups < 1 or c % groups or m % groups:
        raise ValueError(f"{op}: groups={groups} must divide the input channels ({c}) and output channels ({m})")
    if k != (c // groups) * kh * kw:
        raise ValueError(f"{op}: weight has K = {k} columns, expected C/groups*kh*kw = {c // groups}*{kh}*{kw} "
                         f"for x {tuple(x.shape)}")
    ho, wo = _conv_out(x.shape[2], kh, sh, ph, dh), _conv_out(x.shape[3], kw, sw_, pw, dw)
    if ho < 1 or wo < 1:
        raise ValueError(f"{op}: input {tuple(x.shape)} is smaller than the (dilated) kernel")
    chosen, cdt = _resolve(op, sparse_weight, x, bias, backend)
    values = sparse_weight.values
    out_dtype = x.dtype
    xc = x if cdt is x.dtype else x.to(cdt)
    b = bias if bias is None or cdt is bias.dtype else bias.to(cdt)
    if chosen == "cpu":
        y = torch.ops.s2h.spmm_conv2d(values if cdt is values.dtype else values.to(cdt), sparse_weight.row_ptr,
                                      sparse_weight.col_idx, xc, b, (kh, kw), (sh, sw_), (ph, pw), (dh, dw),
                                      int(groups), bool(relu))
    else:
        # GPU: unfold + spmm over the (M, C*kh*kw) block-diagonal weight, all images as columns.
        full = _grouped_full_weight(sparse_weight.to(dtype=cdt), groups, k)
        cols = torch.nn.functional.unfold(xc, (kh, kw), dilation=(dh, dw), padding=(ph, pw), stride=(sh, sw_))
        bsz, kk, length = cols.shape
        cols = cols.permute(1, 0, 2).reshape(kk, bsz * length)
        y = spmm(full, cols, b, relu, backend=chosen)
        y = y.reshape(m, bsz, ho, wo).permute(1, 0, 2, 3).contiguous()
    if y.dtype is not out_dtype:
        y = y.to(out_dtype)
    return y.squeeze(0) if unbatched else y
