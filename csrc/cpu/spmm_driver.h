// The driver of the sparse CPU ops (csrc/cpu/spmm_driver.cpp): one problem description for the
// plain matmul (csrc/cpu/spmm.cpp) and the direct conv (csrc/cpu/spmm_conv2d.cpp), and run(), which
// picks the tile width and the K panels, partitions the work between threads and calls the
// micro-kernels (csrc/cpu/spmm_kernels.h).
//
// Memory: the kernels are bound by the X row segments they stream (from L2 once X outgrows L1).
// K panels (column ranges whose X rows of one tile fit in L1, partial sums kept in y) pay off for
// convs, whose kh*kw taps of an input channel read overlapping windows, and for plain GEMMs only
// at moderate sparsity with few rows per thread.
//
// Work split: nnz-balanced row ranges (or ranges of N tiles when X outweighs W), several chunks
// per thread taken from an atomic counter so that a preempted thread delays one chunk only.
// Convs split by tiles give each thread one contiguous run of output tiles instead: at batch 1
// each thread copies the padded input rows of its own tiles (Problem::own_input), else about the
// rows whose padded input that thread copied (fill_phases in spmm_conv2d.cpp), so that its X is in
// its own L2. No dynamic balancing there.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <optional>

namespace s2h::spmm {

// One sparse product for run(): the plain matmul (spmm.cpp) and the conv (spmm_conv2d.cpp) fill it in.
template <typename T>
struct Problem {
  const T* vals;
  const int32_t* row_ptr;
  const int32_t* col;
  int64_t m;
  // X: nonzero (r, col) of batch item b reads x + b*x_bstride + offset(r, col) + q
  const T* x;
  int64_t x_bstride;
  int64_t batch;
  int64_t ldx = 0;                // plain: offset = col * ldx
  const int64_t* tab = nullptr;   // conv:  offset = tab[col] + (r / group_rows) * group_stride
  int64_t group_rows = 1, group_stride = 0;
  int64_t n;                      // grid columns per batch item
  int64_t k;                      // columns of W
  // L1 footprint of the X rows of one tile: col_group columns (one input channel of a conv)
  // read group_phases windows of (tile + group_span) elements.
  int64_t col_group = 1, group_phases = 1, group_span = 0;
  // Y: row r of batch item b at y + b*y_bstride + r*ldy
  T* y;
  int64_t y_bstride, ldy;
  int64_t wq = 0, wo = 0;         // wq > 0: grid column q = oh*wq + ow is stored at oh*wo + ow if ow < wo
  const T* bias;
  bool relu;
  // Padded convs: the copy of the input the kernels read, made by run() once it knows the split.
  // shared_input(p) makes one copy for all threads and points p.x at it.  At batch 1 on several
  // threads each thread instead calls own_input(q0, q1, local): a copy of only the input rows
  // that grid columns [q0, q1) read, in a buffer of its own, with local.x / tab / group_stride /
  // x_bstride pointing at it.  `input` keeps the copy alive (a fresh tensor over the scratch
  // limit).
  std::function<void(Problem&)> shared_input;
  std::function<void(int64_t, int64_t, Problem&)> own_input;
  at::Tensor input;
};

// Computes p (a copy: shared_input() points p.x at the input copy it makes). Defined for float
// and double.
template <typename T>
void run(Problem<T> p);

// The checks both ops make of the CSR operands (op names the op in the messages).
void check_csr(const at::Tensor& values, const at::Tensor& row_ptr, const at::Tensor& col_idx,
               const std::optional<at::Tensor>& bias, const at::Tensor& x, const char* op);

}  // namespace s2h::spmm
