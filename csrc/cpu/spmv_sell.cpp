// CPU sparse matrix x vector for a Linear layer at batch 1, on the SELL-16 packing of
// s2h_kernels.SparseWeight.sell().  Schema in csrc/ops.cpp:
//
//   s2h::spmv_sell(values, cols, slice_ptr, rows, m, x, bias?, relu) -> y (m, 1) = act(W @ x + bias)
//
// SELL-16 ("sliced ELLPACK"): the rows, sorted by nonzero count (longest first, so that the
// padding is small), are taken 16 at a time; slice s holds the j-th nonzero of each of its 16
// rows side by side at values/cols[slice_ptr[s] + 16*j + lane], padded with (0, column 0) up to
// its longest row; rows[16*s + lane] is the output row of a lane (-1: a padding lane past M).
// One gather of x and one FMA handle 16 nonzeros of 16 rows, with no per-row reduction and no
// ragged tail: faster than the CSR gather-dot kernel of spmm_kernels.cpp on classifier-sized
// weights at high sparsity (benchmarks/results/spmm_cpu.md).  ISA: csrc/cpu/cpu_isa.h.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "common/spmm.h"
#include "cpu/cpu_isa.h"
#if S2H_X86
#include <immintrin.h>
#endif

// GCC flags the "undefined" lanes inside its own AVX-512 intrinsic headers.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace s2h::spmm {
namespace {

constexpr int kSlice = 16;

struct Sell {
  const float* vals;
  const int32_t* cols;
  const int64_t* slice_ptr;
  const int32_t* rows;
  const float* x;
  const float* bias;  // may be null
  float* y;
  bool relu;
};

// Slices [s0, s1).
void sell_scalar(const Sell& a, int64_t s0, int64_t s1) {
  for (int64_t s = s0; s < s1; ++s) {
    const int64_t begin = a.slice_ptr[s], end = a.slice_ptr[s + 1];
    for (int lane = 0; lane < kSlice; ++lane) {
      const int32_t row = a.rows[s * kSlice + lane];
      if (row < 0) continue;
      float acc = 0.f;
      for (int64_t j = begin + lane; j < end; j += kSlice) acc += a.vals[j] * a.x[a.cols[j]];
      a.y[row] = epilogue(acc, a.bias ? a.bias[row] : 0.f, a.relu);
    }
  }
}

#if S2H_X86
S2H_TARGET_AVX2 void sell_avx2(const Sell& a, int64_t s0, int64_t s1) {
  alignas(32) float out[kSlice];
  for (int64_t s = s0; s < s1; ++s) {
    const int64_t begin = a.slice_ptr[s], end = a.slice_ptr[s + 1];
    for (int half = 0; half < 2; ++half) {  // lanes 0-7, then 8-15
      __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
      int64_t j = begin + 8 * half;
      for (; j + kSlice < end; j += 2 * kSlice) {
        const __m256i c0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.cols + j));
        const __m256i c1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.cols + j + kSlice));
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a.vals + j), _mm256_i32gather_ps(a.x, c0, 4), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a.vals + j + kSlice), _mm256_i32gather_ps(a.x, c1, 4), acc1);
      }
      if (j < end) {
        const __m256i c0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.cols + j));
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a.vals + j), _mm256_i32gather_ps(a.x, c0, 4), acc0);
      }
      _mm256_store_ps(out + 8 * half, _mm256_add_ps(acc0, acc1));
    }
    for (int lane = 0; lane < kSlice; ++lane) {  // AVX2 has no scatter
      const int32_t row = a.rows[s * kSlice + lane];
      if (row >= 0) a.y[row] = epilogue(out[lane], a.bias ? a.bias[row] : 0.f, a.relu);
    }
  }
}

S2H_TARGET_AVX512 void sell_avx512(const Sell& a, int64_t s0, int64_t s1) {
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t s = s0; s < s1; ++s) {
    const int64_t end = a.slice_ptr[s + 1];
    __m512 acc0 = zero, acc1 = zero;
    int64_t j = a.slice_ptr[s];
    for (; j + kSlice < end; j += 2 * kSlice) {
      acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a.vals + j), _mm512_i32gather_ps(_mm512_loadu_si512(a.cols + j), a.x, 4),
                             acc0);
      acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a.vals + j + kSlice),
                             _mm512_i32gather_ps(_mm512_loadu_si512(a.cols + j + kSlice), a.x, 4), acc1);
    }
    if (j < end)
      acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a.vals + j), _mm512_i32gather_ps(_mm512_loadu_si512(a.cols + j), a.x, 4),
                             acc0);
    const __m512i rows = _mm512_loadu_si512(a.rows + s * kSlice);
    const __mmask16 live = _mm512_cmpge_epi32_mask(rows, _mm512_setzero_si512());
    __m512 o = _mm512_add_ps(acc0, acc1);
    if (a.bias) o = _mm512_add_ps(o, _mm512_mask_i32gather_ps(zero, live, rows, a.bias, 4));
    if (a.relu) o = _mm512_max_ps(zero, o);  // zero first: a NaN passes through, as in torch.relu
    _mm512_mask_i32scatter_ps(a.y, live, rows, o, 4);
  }
}
#endif  // S2H_X86

at::Tensor spmv_sell_cpu(const at::Tensor& values, const at::Tensor& cols, const at::Tensor& slice_ptr,
                         const at::Tensor& rows, int64_t m, const at::Tensor& x_in, const c10::optional<at::Tensor>& bias_in,
                         bool relu) {
  const char* op = "spmv_sell";
  TORCH_CHECK(values.scalar_type() == at::kFloat && x_in.scalar_type() == at::kFloat, op,
              ": values and x must be float32, got ", values.scalar_type(), " and ", x_in.scalar_type());
  TORCH_CHECK(cols.scalar_type() == at::kInt && rows.scalar_type() == at::kInt && slice_ptr.scalar_type() == at::kLong,
              op, ": cols and rows must be int32 and slice_ptr int64");
  TORCH_CHECK(values.dim() == 1 && cols.dim() == 1 && values.numel() == cols.numel() && slice_ptr.dim() == 1 &&
                  slice_ptr.numel() >= 1 && rows.dim() == 1,
              op, ": values and cols must be 1-D of one length, slice_ptr 1-D with S+1 entries, rows 1-D");
  TORCH_CHECK(values.is_contiguous() && cols.is_contiguous() && slice_ptr.is_contiguous() && rows.is_contiguous(), op,
              ": the packed tensors must be contiguous");
  const int64_t slices = slice_ptr.numel() - 1;
  TORCH_CHECK(rows.numel() == kSlice * slices && m >= 0 && m <= rows.numel() && rows.numel() < m + kSlice + (m == 0),
              op, ": rows must have 16 entries per slice covering M = ", m, " rows, got ", rows.numel(), " for ", slices,
              " slices");
  const int64_t* sp = slice_ptr.data_ptr<int64_t>();
  TORCH_CHECK(sp[0] == 0 && sp[slices] == values.numel(), op, ": slice_ptr must run from 0 to the packed length ",
              values.numel());
  for (int64_t s = 0; s < slices; ++s)  // O(slices): the kernels read 16 entries per step
    TORCH_CHECK(sp[s + 1] >= sp[s] && (sp[s + 1] - sp[s]) % kSlice == 0, op, ": slice ", s,
                " must span a non-negative multiple of 16 entries, got ", sp[s + 1] - sp[s]);
  TORCH_CHECK((x_in.dim() == 1) || (x_in.dim() == 2 && x_in.size(1) == 1), op, ": x must be (K,) or (K, 1), got ",
              x_in.sizes());
  at::Tensor x = x_in.reshape({-1}).contiguous();
  at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  if (bias.defined())
    TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.dim() == 1 && bias.numel() == m, op,
                ": bias must be float32 of M = ", m, " entries, got ", bias.sizes(), " ", bias.scalar_type());
  const int32_t* rp = rows.data_ptr<int32_t>();
  for (int64_t i = 0; i < rows.numel(); ++i)  // O(M): the scatter trusts these
    TORCH_CHECK(rp[i] < m, op, ": rows[", i, "] = ", rp[i], " is not below M = ", m);
  at::Tensor y = at::empty({m, 1}, x.options());
  if (m == 0) return y;

  Sell a{values.data_ptr<float>(), cols.data_ptr<int32_t>(), sp, rp, x.data_ptr<float>(),
         bias.defined() ? bias.data_ptr<float>() : nullptr, y.data_ptr<float>(), relu};
  using cpu::Isa;
  const Isa isa = cpu::active_isa();
  void (*kernel)(const Sell&, int64_t, int64_t) = sell_scalar;
#if S2H_X86
  if (isa == Isa::avx512) kernel = sell_avx512;
  if (isa == Isa::avx2) kernel = sell_avx2;
#else
  (void)isa;
#endif
  // Threads over slice ranges of equal packed length, from 2^14 packed entries per thread (the
  // threshold of spmm's kernels).
  const int64_t total = sp[slices];
  const int64_t parts = std::min<int64_t>({at::get_num_threads(), slices, std::max<int64_t>(1, total >> 14)});
  if (parts <= 1) {
    kernel(a, 0, slices);
    return y;
  }
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t s0 = std::lower_bound(sp, sp + slices, total * p / parts) - sp;
      const int64_t s1 = p + 1 == parts ? slices : std::lower_bound(sp, sp + slices, total * (p + 1) / parts) - sp;
      kernel(a, s0, s1);
    }
  });
  return y;
}

}  // namespace
}  // namespace s2h::spmm

TORCH_LIBRARY_IMPL(s2h, CPU, m) {
  m.impl("spmv_sell", &s2h::spmm::spmv_sell_cpu);
}
