// Sparse (CSR) x dense matmul: the math shared by the CPU (csrc/cpu/spmm_*.cpp) and CUDA
// (csrc/cuda/spmm.cu) kernels, so the epilogue, the conv geometry and the partition the CUDA
// kernels use are the ones the CPU tests check.
//
// Format (s2h_kernels.SparseWeight): W (M x K) as CSR by output row, int32 row_ptr [M+1],
// int32 col_idx [nnz] (sorted within a row), values [nnz], plus row_order [M] (rows by
// decreasing nnz, the "row swizzle" the GPU kernels schedule by).
//
// Conv weights (M, C/groups, kh, kw) are packed as the (M, C/groups*kh*kw) matrix of
// F.unfold's column order: col = (c*kh + i)*kw + j.  The CPU conv kernel never builds im2col:
// it maps every column to an element offset into a zero-padded, stride-phase-split copy of the
// input (conv_tap_offset below), so the "row" of X a nonzero multiplies is a shifted window of
// one input channel and stays contiguous along the output width.
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace s2h::spmm {

// Epilogue for one output element: bias then optional ReLU.
S2H_HD float epilogue(float acc, float bias, bool relu) {
  const float v = acc + bias;
  return (relu && v < 0.f) ? 0.f : v;
}
S2H_HD double epilogue(double acc, double bias, bool relu) {
  const double v = acc + bias;
  return (relu && v < 0.0) ? 0.0 : v;
}

// First row r in [0, m] with row_ptr[r] >= target (row_ptr is non-decreasing).
S2H_HD int64_t lower_row(const int32_t* row_ptr, int64_t m, int64_t target) {
  int64_t lo = 0, hi = m;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (row_ptr[mid] < target) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// nnz-balanced partition of rows into `parts` contiguous ranges: part p owns rows
// [split_rows(p), split_rows(p+1)).  The cost of a row is its nnz plus `row_cost` (the fixed
// epilogue/loop work per row), so empty rows still spread out.  Uses the cost prefix
// row_ptr[r] + r*row_cost, which is non-decreasing, by binary search.
S2H_HD int64_t split_rows(const int32_t* row_ptr, int64_t m, int64_t parts, int64_t p, int64_t row_cost) {
  if (p <= 0) return 0;
  if (p >= parts) return m;
  const int64_t total = (int64_t)row_ptr[m] - row_ptr[0] + m * row_cost;
  const int64_t target = total * p / parts;
  int64_t lo = 0, hi = m;
  while (lo < hi) {  // first r with cost(r) >= target
    const int64_t mid = (lo + hi) / 2;
    const int64_t cost = (int64_t)row_ptr[mid] - row_ptr[0] + mid * row_cost;
    if (cost < target) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// ---- conv geometry (direct, im2col-free) ----
// Output size of a convolution along one axis.
S2H_HD int64_t conv_out_size(int64_t in, int64_t k, int64_t stride, int64_t pad, int64_t dil) {
  return (in + 2 * pad - dil * (k - 1) - 1) / stride + 1;
}
// Size of one stride phase of the padded input along one axis: ceil((in + 2*pad) / stride).
S2H_HD int64_t conv_phase_size(int64_t in, int64_t stride, int64_t pad) {
  return (in + 2 * pad + stride - 1) / stride;
}

// The padded input is split into sh*sw stride phases:
//   buf[c][a][b][i][j] = x_padded[c][i*sh + a][j*sw + b]      (a < sh, b < sw, i < hq, j < wq)
// so that output (oh, ow) of tap (ki, kj) reads phase ((ki*dh) % sh, (kj*dw) % sw) at
// (oh + (ki*dh)/sh, ow + (kj*dw)/sw): contiguous along ow for any stride and dilation.
// The kernels compute outputs on the grid q = oh*wq + ow (ow < wq; columns ow >= wo are
// computed and dropped), so a nonzero at unfold column `col` multiplies buf + offset + q.
S2H_HD int64_t conv_tap_offset(int64_t col, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                               int64_t dh, int64_t dw, int64_t hq, int64_t wq) {
  const int64_t kk = kh * kw;
  const int64_t c = col / kk, tap = col - c * kk;
  const int64_t ki = tap / kw, kj = tap - ki * kw;
  const int64_t a = (ki * dh) % sh, shift_h = (ki * dh) / sh;
  const int64_t b = (kj * dw) % sw, shift_w = (kj * dw) / sw;
  return ((c * sh * sw + a * sw + b) * hq + shift_h) * wq + shift_w;
}

// Value of the phase-split padded buffer at [c][a][b][i][j] (zero in the padding).
S2H_HD int64_t conv_src_index(int64_t i, int64_t a, int64_t stride, int64_t pad, int64_t in) {
  const int64_t r = i * stride + a - pad;  // row (or column) in the unpadded input
  return (r >= 0 && r < in) ? r : -1;
}

}  // namespace s2h::spmm
