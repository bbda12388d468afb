// Per-thread scratch of the sparse CPU ops (csrc/cpu/spmm_scratch.h).
#include "cpu/spmm_scratch.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <memory>

#include "cpu/spmm_tuning.h"

namespace s2h::spmm {

template <typename T>
Scratch<T>& scratch() {
  thread_local Scratch<T> s;
  return s;
}

template <typename T>
at::Tensor x_scratch(at::IntArrayRef sizes, at::IntArrayRef strides, int64_t numel, const at::TensorOptions& opts) {
  struct Buf {
    std::unique_ptr<void, decltype(&std::free)> p{nullptr, &std::free};
    size_t bytes = 0;
  };
  thread_local Buf buf;
  const size_t need = (static_cast<size_t>(std::max<int64_t>(numel, 1)) * sizeof(T) + 63) / 64 * 64;
  if (need > static_cast<size_t>(tuning().keep_scratch))
    return at::empty({static_cast<int64_t>(need / sizeof(T))}, opts).as_strided(sizes, strides);
  if (need > buf.bytes) {
    buf.p.reset();
    buf.bytes = 0;
    void* q = std::aligned_alloc(64, need);
    TORCH_CHECK(q, "spmm: out of memory for a ", need, "-byte scratch buffer");
    buf.p.reset(q);
    buf.bytes = need;
  }
  return at::from_blob(buf.p.get(), sizes, strides, opts);
}

template Scratch<float>& scratch<float>();
template Scratch<double>& scratch<double>();
template at::Tensor x_scratch<float>(at::IntArrayRef, at::IntArrayRef, int64_t, const at::TensorOptions&);
template at::Tensor x_scratch<double>(at::IntArrayRef, at::IntArrayRef, int64_t, const at::TensorOptions&);

}  // namespace s2h::spmm
