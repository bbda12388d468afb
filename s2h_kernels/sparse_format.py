"""The packed weight of the sparse ops: :class:`SparseWeight` (CSR by output row) and its SELL-16
form for the CPU batch-1 kernel (docs/DESIGN.md §4).

CSR by output row: int32 ``row_ptr`` (M+1), int32 ``col_idx`` (nnz, sorted within a row),
``values`` (nnz), plus ``row_order`` (rows by decreasing nnz, the "row swizzle" the GPU kernels
schedule by). CSR was kept over a column-delta encoding: the CPU kernel turns columns into X
element offsets once per call (per thread, for its own rows), which costs one pass over nnz and
leaves the inner loop a plain load + FMA. Conv weights (M, C/groups, kh, kw) are packed as the
(M, C/groups*kh*kw) matrix in ``F.unfold`` column order.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ._backend import check_float

__all__ = ["SparseWeight", "sell_applies"]


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
        self._sell = None  # (values, row_ptr, col_idx, row_order, values' version, packing) of sell()

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
        # Per call on the batch-1 path: plain comparisons, no tuple or generator built.
        v = self.values
        c = getattr(self, "_sell", None)  # (pickles made before the slot existed lack it)
        if (c is None or c[0] is not v or c[1] is not self.row_ptr or c[2] is not self.col_idx
                or c[3] is not self.row_order or (c[4] >= 0 and c[4] != v._version)):
            # Inference tensors keep no version counter (-1); they cannot be modified in place either.
            version = -1 if v.is_inference() else v._version
            c = self._sell = (v, self.row_ptr, self.col_idx, self.row_order, version, pack_sell(self))
        return c[5]

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


def pack_sell(sw: SparseWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
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
