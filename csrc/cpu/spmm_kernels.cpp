// The sparse CPU micro-kernels (interface and design: csrc/cpu/spmm_kernels.h): the portable set,
// and on x86-64 the AVX-512 and AVX2+FMA sets, their tile kernel compiled from spmm_tile.inc.
#include "cpu/spmm_kernels.h"

#include <cstdint>
#include <type_traits>

#include "common/spmm.h"
#if S2H_X86
#include <immintrin.h>
#endif

// GCC flags the "undefined" lanes inside its own AVX-512 intrinsic headers.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace s2h::spmm {
namespace {

// ----------------------------------------------------------------------------------------------
// Portable kernels (any dtype).  The tile is a plain array the compiler vectorises with the
// baseline ISA.
constexpr int kScalarTile = 32;

template <typename T>
void tile_scalar(const TileArgs<T>& a) {
  for (int64_t r = a.r0; r < a.r1; ++r) {
    const int64_t s = a.rs[r], e = a.re[r];
    if (s == e && !a.first && !(a.last && a.relu)) continue;
    T* yr = a.y + r * a.ldy;
    T acc[kScalarTile];
    const T b = a.bias ? a.bias[r] : T(0);
    for (int i = 0; i < kScalarTile; ++i) acc[i] = T(0);
    if (!a.first)
      for (int64_t i = 0; i < a.nv; ++i) acc[i] = yr[i];
    for (int64_t j = s; j < e; ++j) {
      const T w = a.vals[j];
      const T* xr = a.xq + a.off[j - a.nnz_base];
      if (a.nv == kScalarTile) {
        for (int i = 0; i < kScalarTile; ++i) acc[i] += w * xr[i];
      } else {
        for (int64_t i = 0; i < a.nv; ++i) acc[i] += w * xr[i];
      }
    }
    for (int64_t i = 0; i < a.nv; ++i) yr[i] = epilogue(acc[i], a.first ? b : T(0), a.relu && a.last);
  }
}

template <typename T>
void dot_scalar(const T* vals, const int32_t* row_ptr, const int32_t* col, int64_t r0, int64_t r1, const T* x,
                T* y, int64_t ldy, const T* bias, bool relu) {
  for (int64_t r = r0; r < r1; ++r) {
    T acc0 = 0, acc1 = 0;
    int64_t j = row_ptr[r];
    const int64_t e = row_ptr[r + 1];
    for (; j + 2 <= e; j += 2) {
      acc0 += vals[j] * x[col[j]];
      acc1 += vals[j + 1] * x[col[j + 1]];
    }
    if (j < e) acc0 += vals[j] * x[col[j]];
    y[r * ldy] = epilogue(acc0 + acc1, bias ? bias[r] : T(0), relu);
  }
}

template <typename T>
Kernels<T> scalar_kernels() {
  Kernels<T> k{};
  k.width = kScalarTile;
  k.vmax = 1;
  k.vwide = 1;
  k.full[1] = tile_scalar<T>;
  k.tail[1] = tile_scalar<T>;
  k.dot = dot_scalar<T>;
  return k;
}

// Accumulator sets per tile: about 8 independent FMA chains hide the FMA latency (4 cycles,
// 2 per cycle) whatever the tile width.
constexpr int chains(int v) { return v >= 8 ? 1 : v >= 4 ? 2 : v >= 2 ? 4 : 8; }

#if S2H_X86
// ----------------------------------------------------------------------------------------------
// AVX-512
// Vector operations of each ISA for the tile kernel of spmm_tile.inc, which is compiled once
// per ISA inside a target region (S2H_TARGET_BEGIN, cpu_isa.h) and a namespace of its own.
#define S2H_VEC_OP [[gnu::always_inline]] static inline
S2H_TARGET_BEGIN(S2H_ISA_AVX512)
namespace isa_avx512 {
struct Ops {
  using Vec = __m512;
  using Mask = __mmask16;
  static constexpr int kLanes = 16;
  static constexpr bool kCompress = true;  // the conv grid epilogue (compress / expand)
  S2H_VEC_OP Mask tail_mask(int64_t n) { return static_cast<Mask>((1u << n) - 1u); }  // lanes i < n
  S2H_VEC_OP Vec zero() { return _mm512_setzero_ps(); }
  S2H_VEC_OP Vec set1(float v) { return _mm512_set1_ps(v); }
  S2H_VEC_OP Vec bcast(const float* p) { return _mm512_set1_ps(*p); }
  S2H_VEC_OP Vec load(const float* p) { return _mm512_loadu_ps(p); }
  S2H_VEC_OP Vec load_tail(const float* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
  S2H_VEC_OP void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
  S2H_VEC_OP void store_tail(float* p, Mask m, Vec v) { _mm512_mask_storeu_ps(p, m, v); }
  S2H_VEC_OP void stream(float* p, Vec v) { _mm512_stream_ps(p, v); }
  S2H_VEC_OP Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  S2H_VEC_OP Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
  S2H_VEC_OP Vec relu(Vec v) { return _mm512_max_ps(_mm512_setzero_ps(), v); }  // NaN passes, as in torch.relu
  // Conv grid: the kept lanes of a vector live packed in y (compress on store, expand on reload).
  S2H_VEC_OP Vec expand_load(uint16_t keep, uint16_t packed, const float* p) {
    return _mm512_maskz_expand_ps(keep, _mm512_maskz_loadu_ps(packed, p));
  }
  S2H_VEC_OP void compress_store(float* p, uint16_t keep, uint16_t packed, Vec v) {
    _mm512_mask_storeu_ps(p, packed, _mm512_maskz_compress_ps(keep, v));
  }
};
#include "cpu/spmm_tile.inc"
}  // namespace isa_avx512
S2H_TARGET_END

S2H_TARGET_AVX512 void dot_avx512(const float* vals, const int32_t* row_ptr, const int32_t* col, int64_t r0, int64_t r1,
                           const float* x, float* y, int64_t ldy, const float* bias, bool relu) {
  for (int64_t r = r0; r < r1; ++r) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t j = row_ptr[r];
    const int64_t e = row_ptr[r + 1];
    for (; j + 32 <= e; j += 32) {
      const __m512i i0 = _mm512_loadu_si512(col + j), i1 = _mm512_loadu_si512(col + j + 16);
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(vals + j), _mm512_i32gather_ps(i0, x, 4), a0);
      a1 = _mm512_fmadd_ps(_mm512_loadu_ps(vals + j + 16), _mm512_i32gather_ps(i1, x, 4), a1);
    }
    for (; j < e; j += 16) {
      const int64_t left = e - j;
      const __mmask16 m = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
      const __m512i i0 = _mm512_maskz_loadu_epi32(m, col + j);
      const __m512 g = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, i0, x, 4);
      a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, vals + j), g, a0);
    }
    y[r * ldy] = epilogue(_mm512_reduce_add_ps(_mm512_add_ps(a0, a1)), bias ? bias[r] : 0.f, relu);
  }
}

Kernels<float> avx512_kernels() {
  Kernels<float> k{};
  k.width = 16;
  k.vmax = 8;
  k.vwide = 16;  // 16 accumulators of the 32 zmm registers
  isa_avx512::set_tiles<isa_avx512::Ops, 16>(k);
  k.dot = dot_avx512;
  return k;
}

// ----------------------------------------------------------------------------------------------
// AVX2 + FMA
S2H_TARGET_AVX2 inline __m256i tail_mask_avx2(int64_t n) {  // lanes i < n
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

S2H_TARGET_BEGIN(S2H_ISA_AVX2)
namespace isa_avx2 {
struct Ops {
  using Vec = __m256;
  using Mask = __m256i;
  static constexpr int kLanes = 8;
  static constexpr bool kCompress = false;
  S2H_VEC_OP Mask tail_mask(int64_t n) { return tail_mask_avx2(n); }
  S2H_VEC_OP Vec zero() { return _mm256_setzero_ps(); }
  S2H_VEC_OP Vec set1(float v) { return _mm256_set1_ps(v); }
  S2H_VEC_OP Vec bcast(const float* p) { return _mm256_broadcast_ss(p); }
  S2H_VEC_OP Vec load(const float* p) { return _mm256_loadu_ps(p); }
  S2H_VEC_OP Vec load_tail(const float* p, Mask m) { return _mm256_maskload_ps(p, m); }
  S2H_VEC_OP void store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
  S2H_VEC_OP void store_tail(float* p, Mask m, Vec v) { _mm256_maskstore_ps(p, m, v); }
  S2H_VEC_OP void stream(float* p, Vec v) { _mm256_stream_ps(p, v); }
  S2H_VEC_OP Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  S2H_VEC_OP Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
  S2H_VEC_OP Vec relu(Vec v) { return _mm256_max_ps(_mm256_setzero_ps(), v); }  // NaN passes, as in torch.relu
};
#include "cpu/spmm_tile.inc"
}  // namespace isa_avx2
S2H_TARGET_END

S2H_TARGET_AVX2 inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

S2H_TARGET_AVX2 void dot_avx2(const float* vals, const int32_t* row_ptr, const int32_t* col, int64_t r0, int64_t r1,
                       const float* x, float* y, int64_t ldy, const float* bias, bool relu) {
  for (int64_t r = r0; r < r1; ++r) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t j = row_ptr[r];
    const int64_t e = row_ptr[r + 1];
    for (; j + 16 <= e; j += 16) {
      const __m256i i0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col + j));
      const __m256i i1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col + j + 8));
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(vals + j), _mm256_i32gather_ps(x, i0, 4), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(vals + j + 8), _mm256_i32gather_ps(x, i1, 4), a1);
    }
    for (; j < e; j += 8) {
      const __m256i m = tail_mask_avx2(e - j);
      const __m256i i0 = _mm256_maskload_epi32(col + j, m);
      const __m256 g = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), x, i0, _mm256_castsi256_ps(m), 4);
      a0 = _mm256_fmadd_ps(_mm256_maskload_ps(vals + j, m), g, a0);
    }
    y[r * ldy] = epilogue(hsum_avx2(_mm256_add_ps(a0, a1)), bias ? bias[r] : 0.f, relu);
  }
}

Kernels<float> avx2_kernels() {
  Kernels<float> k{};
  k.width = 8;
  k.vmax = 8;
  k.vwide = 8;   // 16 ymm registers
  isa_avx2::set_tiles<isa_avx2::Ops, 8>(k);
  k.dot = dot_avx2;
  return k;
}
#endif  // S2H_X86

}  // namespace

void fence_streaming_stores() {
#if S2H_X86
  _mm_sfence();
#endif
}

template <typename T>
const Kernels<T>& kernels_for(cpu::Isa isa) {
  using cpu::Isa;
  static const Kernels<T> scalar = scalar_kernels<T>();
#if S2H_X86
  if constexpr (std::is_same_v<T, float>) {
    static const Kernels<float> k512 = avx512_kernels();
    static const Kernels<float> k2 = avx2_kernels();
    if (isa == Isa::avx512) return k512;
    if (isa == Isa::avx2) return k2;
  }
#else
  (void)isa;
#endif
  return scalar;
}
template const Kernels<float>& kernels_for<float>(cpu::Isa);
template const Kernels<double>& kernels_for<double>(cpu::Isa);

}  // namespace s2h::spmm
