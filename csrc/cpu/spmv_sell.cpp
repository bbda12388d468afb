// CPU sparse matrix x vector for a Linear layer at batch 1, on the SELL-16 packing of
// s2h_kernels.SparseWeight.sell().  Schema in csrc/ops.cpp:
//
//   s2h::spmv_sell(values, cols, slice_ptr, rows, m, x, bias?, relu) -> y = act(W @ x + bias)
//
// x is one column of K values, in the layout of the caller: (K,) gives y (m,), (K, 1) gives
// (m, 1), and (1, K) with K > 1 (a Linear layer's input at batch 1) gives (1, m), so that no
// caller reshapes (a view from Python costs about 0.5 us, this kernel about 2 us on a 1000 x 512
// weight at 98% sparsity).
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
#include <cstring>

#include "common/spmm.h"
#include "cpu/cpu_isa.h"
#include "cpu/spmm_tuning.h"
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
// The x values of 4 / 8 / 16 lanes: scalar loads put together with inserts, the alternative to the
// gather instructions.  AMD CPUs run those as microcode, slower than separate loads: on a Zen 5
// (EPYC, 2 vCPUs) one 16-lane gather took about 20 cycles, and this kernel alone at r18.fc 98%
// (1000 x 512, 10k nonzeros) ran 2.74 us with gathers, 2.20 with these loads and 1.95 with the
// column indices read two at a time (AVX2: 4.00 against 2.25 us), timed in a standalone copy.
// Same products in the same order: the same bits either way (tests/kernels/test_spmm.py).
S2H_TARGET_AVX2 inline __m128 load4(const float* x, const int32_t* c) {
  uint64_t c01, c23;  // two column indices per load (both >= 0)
  std::memcpy(&c01, c, sizeof c01);
  std::memcpy(&c23, c + 2, sizeof c23);
  __m128 q = _mm_load_ss(x + static_cast<uint32_t>(c01));
  q = _mm_insert_ps(q, _mm_load_ss(x + (c01 >> 32)), 0x10);
  q = _mm_insert_ps(q, _mm_load_ss(x + static_cast<uint32_t>(c23)), 0x20);
  return _mm_insert_ps(q, _mm_load_ss(x + (c23 >> 32)), 0x30);
}

S2H_TARGET_AVX2 inline __m256 load8(const float* x, const int32_t* c) {
  return _mm256_insertf128_ps(_mm256_castps128_ps256(load4(x, c)), load4(x, c + 4), 1);
}

template <bool kLoads>
S2H_TARGET_AVX2 inline __m256 gather8(const float* x, const int32_t* c) {
  if constexpr (kLoads) return load8(x, c);
  return _mm256_i32gather_ps(x, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c)), 4);
}

template <bool kLoads>
S2H_TARGET_AVX512 inline __m512 gather16(const float* x, const int32_t* c) {
  if constexpr (kLoads) return _mm512_insertf32x8(_mm512_castps256_ps512(load8(x, c)), load8(x, c + 8), 1);
  return _mm512_i32gather_ps(_mm512_loadu_si512(c), x, 4);
}

template <bool kLoads>
S2H_TARGET_AVX2 void sell_avx2(const Sell& a, int64_t s0, int64_t s1) {
  alignas(32) float out[kSlice];
  for (int64_t s = s0; s < s1; ++s) {
    const int64_t begin = a.slice_ptr[s], end = a.slice_ptr[s + 1];
    for (int half = 0; half < 2; ++half) {  // lanes 0-7, then 8-15
      __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
      int64_t j = begin + 8 * half;
      for (; j + kSlice < end; j += 2 * kSlice) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a.vals + j), gather8<kLoads>(a.x, a.cols + j), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a.vals + j + kSlice), gather8<kLoads>(a.x, a.cols + j + kSlice), acc1);
      }
      if (j < end) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a.vals + j), gather8<kLoads>(a.x, a.cols + j), acc0);
      _mm256_store_ps(out + 8 * half, _mm256_add_ps(acc0, acc1));
    }
    for (int lane = 0; lane < kSlice; ++lane) {  // AVX2 has no scatter
      const int32_t row = a.rows[s * kSlice + lane];
      if (row >= 0) a.y[row] = epilogue(out[lane], a.bias ? a.bias[row] : 0.f, a.relu);
    }
  }
}

template <bool kLoads>
S2H_TARGET_AVX512 void sell_avx512(const Sell& a, int64_t s0, int64_t s1) {
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t s = s0; s < s1; ++s) {
    const int64_t end = a.slice_ptr[s + 1];
    __m512 acc0 = zero, acc1 = zero;
    int64_t j = a.slice_ptr[s];
    for (; j + kSlice < end; j += 2 * kSlice) {
      acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a.vals + j), gather16<kLoads>(a.x, a.cols + j), acc0);
      acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a.vals + j + kSlice), gather16<kLoads>(a.x, a.cols + j + kSlice), acc1);
    }
    if (j < end) acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a.vals + j), gather16<kLoads>(a.x, a.cols + j), acc0);
    const __m512i rows = _mm512_loadu_si512(a.rows + s * kSlice);
    const __mmask16 live = _mm512_cmpge_epi32_mask(rows, _mm512_setzero_si512());
    __m512 o = _mm512_add_ps(acc0, acc1);
    if (a.bias) {  // a whole slice (all but maybe the last) takes its bias like x
      o = _mm512_add_ps(o, kLoads && live == 0xFFFF ? gather16<true>(a.bias, a.rows + s * kSlice)
                                                    : _mm512_mask_i32gather_ps(zero, live, rows, a.bias, 4));
    }
    if (a.relu) o = _mm512_max_ps(zero, o);  // zero first: a NaN passes through, as in torch.relu
    _mm512_mask_i32scatter_ps(a.y, live, rows, o, 4);
  }
}

// Whether the kernels load x lane by lane instead of gathering (S2H_SPMM_SELL_LOADS=1 / 0; by
// default on AMD CPUs).
bool loads_not_gathers() {
  const int64_t knob = tuning().sell_loads;
  if (knob >= 0) return knob != 0;
  static const bool amd = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("amd");
  }();
  return amd;
}
#endif  // S2H_X86

// The largest of n values (-1 when n == 0): the check of rows, every call.
int32_t largest(const int32_t* p, int64_t n) {
  int32_t top = -1;
  for (int64_t i = 0; i < n; ++i) top = std::max(top, p[i]);
  return top;
}

#if S2H_X86
S2H_TARGET_AVX2 int32_t largest_avx2(const int32_t* p, int64_t n) {  // vectorised: 4x fewer steps than SSE2
  int32_t top = -1;
  for (int64_t i = 0; i < n; ++i) top = std::max(top, p[i]);
  return top;
}
#else
int32_t largest_avx2(const int32_t* p, int64_t n) { return largest(p, n); }
#endif

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
  // O(slices) and O(M) checks, every call (the kernels read 16 entries per step, the scatter
  // trusts rows): branch-free passes that vectorise, the message searched for only on failure.
  bool ragged = false;
  for (int64_t s = 0; s < slices; ++s) ragged |= sp[s + 1] < sp[s] || (sp[s + 1] - sp[s]) % kSlice != 0;
  for (int64_t s = 0; ragged && s < slices; ++s)
    TORCH_CHECK(sp[s + 1] >= sp[s] && (sp[s + 1] - sp[s]) % kSlice == 0, op, ": slice ", s,
                " must span a non-negative multiple of 16 entries, got ", sp[s + 1] - sp[s]);
  // x: one column of K values, as (K,), (K, 1) or (1, K); read in place when its values are one
  // apart in memory.
  const bool row = x_in.dim() == 2 && x_in.size(0) == 1 && x_in.size(1) != 1;
  TORCH_CHECK(x_in.dim() == 1 || (x_in.dim() == 2 && (x_in.size(1) == 1 || row)), op,
              ": x must be one column, (K,), (K, 1) or (1, K), got ", x_in.sizes());
  const int64_t x_step = x_in.numel() <= 1 ? 1 : x_in.stride(row ? 1 : 0);
  const at::Tensor x = x_step == 1 ? x_in : x_in.contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  if (bias.defined())
    TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.dim() == 1 && bias.numel() == m, op,
                ": bias must be float32 of M = ", m, " entries, got ", bias.sizes(), " ", bias.scalar_type());
  const int32_t* rp = rows.data_ptr<int32_t>();
  const int64_t lanes = rows.numel();
  using cpu::Isa;
  const Isa isa = cpu::active_isa();
  const int32_t top = (isa == Isa::scalar ? largest : largest_avx2)(rp, lanes);
  for (int64_t i = 0; top >= m && i < lanes; ++i)
    TORCH_CHECK(rp[i] < m, op, ": rows[", i, "] = ", rp[i], " is not below M = ", m);
  at::Tensor y = x_in.dim() == 1 ? at::empty({m}, x.options())
                 : row            ? at::empty({1, m}, x.options())
                                  : at::empty({m, 1}, x.options());
  if (m == 0) return y;

  Sell a{values.data_ptr<float>(), cols.data_ptr<int32_t>(), sp, rp, x.data_ptr<float>(),
         bias.defined() ? bias.data_ptr<float>() : nullptr, y.data_ptr<float>(), relu};
  void (*kernel)(const Sell&, int64_t, int64_t) = sell_scalar;
#if S2H_X86
  const bool loads = isa != Isa::scalar && loads_not_gathers();
  if (isa == Isa::avx512) kernel = loads ? sell_avx512<true> : sell_avx512<false>;
  if (isa == Isa::avx2) kernel = loads ? sell_avx2<true> : sell_avx2<false>;
#else
  (void)isa;
#endif
  // Threads over slice ranges of equal packed length, from tuning().sell_work packed entries per
  // thread (S2H_SPMM_SELL_WORK).
  const int64_t total = sp[slices];
  const int64_t per_thread = std::max<int64_t>(1, tuning().sell_work);
  const int64_t parts = std::min<int64_t>({at::get_num_threads(), slices, std::max<int64_t>(1, total / per_thread)});
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
