// Scratch memory of the sparse CPU ops, per thread and reused across calls, so that the hot path
// allocates nothing: the kernels' index buffers (Scratch) and the buffer the ops copy X into
// (x_scratch).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace s2h::spmm {

// The calling thread's index buffers: X offsets of its nonzeros, K-panel starts, a tile buffer.
template <typename T>
struct Scratch {
  std::vector<int32_t> off;
  std::vector<int32_t> pp;
  std::vector<T> tile;
};
template <typename T>
Scratch<T>& scratch();

// A view (sizes, strides) of numel elements of the calling thread's 64-byte aligned copy buffer
// (aligned rows of X, the padded conv input), kept across calls: a fresh allocation of that size
// is mmapped and page-faults on every call, a large share of a call at high sparsity. It grows up
// to SpmmTuning::keep_scratch bytes per thread (like oneDNN's scratchpad); larger copies get a
// fresh tensor each call, so that a big batch does not pin its buffer for the life of the thread.
// The view is valid until the next call on the same thread (a fresh tensor: while it is held).
template <typename T>
at::Tensor x_scratch(at::IntArrayRef sizes, at::IntArrayRef strides, int64_t numel, const at::TensorOptions& opts);

}  // namespace s2h::spmm
