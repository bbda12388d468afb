// CPU sparse (CSR) x dense matmul and direct sparse conv2d.  Schemas in csrc/ops.cpp.
//
//   s2h::spmm(values, row_ptr, col_idx, x, bias?, relu)            y = act(W @ x + bias)
//   s2h::spmm_conv2d(values, row_ptr, col_idx, x, bias?, kernel_size, stride, padding,
//                    dilation, groups, relu)                        y = act(conv2d(x, W) + bias)
//
// Micro-kernel (in the style of XNNPACK's SpMM): one output row times one tile of N columns.
// For every nonzero w = W[r, k] the kernel broadcasts w and FMAs it into V accumulator vectors
// with V vectors of the X row k: the tile lives in registers (AVX-512: up to 16 vectors, so N up
// to 256 runs in one pass, else 8-vector tiles; AVX2: 8 vectors), X is read once per nonzero and
// W once per tile.  Short tiles keep enough independent FMA chains by splitting the nonzeros of a
// row over U accumulator sets.  N == 1 (a Linear layer at batch 1) uses a gather dot product.
//
// Memory: the kernel is bound by the X row segments it streams (from L2 once X outgrows L1).
// K panels (column ranges whose X rows of one tile fit in L1, partial sums kept in y) pay off
// for convs, whose kh*kw taps of an input channel read overlapping windows, and for plain
// GEMMs only at moderate sparsity with few rows per thread (rule and measurements in run()).
//
// Work split: nnz-balanced row ranges (or ranges of N tiles when X outweighs W), several chunks
// per thread taken from an atomic counter so that a preempted thread delays one chunk only.
// Convs split by tiles give each thread one contiguous run of output tiles instead: at batch 1
// each thread copies the padded input rows of its own tiles (Problem::own_input), else about
// the rows whose padded input that thread copied (fill_phases), so that its X is in its own L2.
// No dynamic balancing there.
// ISA: AVX-512 / AVX2+FMA / portable C++, chosen at run time with __builtin_cpu_supports
// (S2H_SPMM_ISA=avx512|avx2|scalar forces one, for tests).  float64 runs the portable kernel, and
// so do CPUs other than x86-64 (S2H_X86, common/macros.h).  The vector tile kernel is written
// once, in spmm_tile.inc, and compiled per ISA.
//
// Tuning knobs (environment, read per call; for tests and measurements, defaults measured on the
// development VM): S2H_SPMM_TILE_V (vectors per tile), S2H_SPMM_L1 / _PARTIALS / _PMIN (K panels),
// S2H_SPMM_WORK (work per thread before going parallel), S2H_SPMM_CHUNKS (chunks per thread),
// S2H_SPMM_ALIGN (reuse that pays the aligned copy of X), S2H_SPMM_TAIL_DOT / _TAIL_X (tail
// columns by the dot kernel), S2H_SPMM_STREAM (output bytes from which stores bypass the caches),
// S2H_SPMM_KEEP_SCRATCH (largest copy buffer kept per thread), S2H_SPMM_CONV_STATIC=0 (convs split
// tiles dynamically, like plain products, instead of one contiguous run per thread).
//
// Conv without im2col: the input is copied once into a zero-padded, stride-phase-split buffer
// (csrc/common/spmm.h, conv_tap_offset), every column of the packed (M, C/g*kh*kw) weight
// becomes an element offset into it, and the output is computed on the grid q = oh*wq + ow
// with contiguous loads along ow; the AVX-512 epilogue compresses the grid columns ow < wo into
// the output rows (other ISAs copy them out).  1x1 convs without padding read the input itself.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "common/spmm.h"
#include "cpu/spmm_isa.h"
#if S2H_X86
#include <immintrin.h>
#endif

// GCC flags the "undefined" lanes inside its own AVX-512 intrinsic headers.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace s2h::spmm {
namespace {

// ----------------------------------------------------------------------------------------------
// Kernel interface.  A "tile" call computes rows [r0, r1) of one tile of nv (<= tile width)
// columns:  y[r*ldy + i] = epilogue(sum_j vals[j] * xq[off[j] + i], bias[r], relu),  with the
// nonzeros of row r at j in [row_ptr[r], row_ptr[r+1]) and off indexed from nnz_base.
template <typename T>
struct TileArgs {
  const T* vals;
  const int32_t* rs;   // nonzeros of row r in this K panel: j in [rs[r], re[r])
  const int32_t* re;
  const int32_t* off;  // X element offset of each nonzero, off[j - nnz_base]
  int64_t nnz_base;
  int64_t r0, r1;
  const T* xq;  // X + batch offset + first column of the tile
  T* y;         // row r at y + r * ldy (r counted from 0, not r0)
  int64_t ldy;
  int64_t nv;   // valid columns in this tile
  const T* bias;
  bool relu;
  bool first;  // first K panel: start from the bias, else from the partial sums in y
  bool last;   // last K panel: apply the ReLU
  // Conv grid (AVX-512 only): vector v keeps the lanes in wmask[v] and stores them packed at
  // y + r*ldy + wdst[v] (compress on store, expand on reload).  Null: plain rows.
  const uint16_t* wmask;
  const int32_t* wdst;
  // Non-temporal stores (the output outgrows L2; plain rows, single K panel, 64-byte aligned
  // tiles): they skip the read-for-ownership of every output line, which is most of the time of
  // a 1x1 conv at 90-95% sparsity (the output is 3 MB against 0.2 MB of weights).
  bool stream = false;
};
template <typename T>
using TileFn = void (*)(const TileArgs<T>&);

// N == 1: y[r*ldy] = epilogue(sum_j vals[j] * x[col[j]], bias[r], relu) for r in [r0, r1).
template <typename T>
using DotFn = void (*)(const T* vals, const int32_t* row_ptr, const int32_t* col, int64_t r0, int64_t r1,
                       const T* x, T* y, int64_t ldy, const T* bias, bool relu);

template <typename T>
struct Kernels {
  int width;             // columns per vector
  int vmax;              // vectors per tile when N is large
  int vwide;             // most vectors in one tile: N up to width*vwide runs as a single tile
  TileFn<T> full[17];    // by vector count V = 1..vwide, every vector full
  TileFn<T> tail[17];    // by V, the last vector partial
  TileFn<T> wrap[17];    // by V, conv grid epilogue (null: compute into a buffer and copy out)
  DotFn<T> dot;
};

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
#define S2H_AVX512 __attribute__((target("avx512f,avx512vl,avx2,fma,popcnt")))

// Vector operations of each ISA for the tile kernel of spmm_tile.inc, which is compiled once
// per ISA inside a target region (S2H_TARGET_BEGIN, spmm_isa.h) and a namespace of its own.
#define S2H_VEC_OP [[gnu::always_inline]] static inline
S2H_TARGET_BEGIN("avx512f,avx512vl,avx2,fma,popcnt")
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

S2H_AVX512 void dot_avx512(const float* vals, const int32_t* row_ptr, const int32_t* col, int64_t r0, int64_t r1,
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
#define S2H_AVX2 __attribute__((target("avx2,fma")))

S2H_AVX2 inline __m256i tail_mask_avx2(int64_t n) {  // lanes i < n
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

S2H_TARGET_BEGIN("avx2,fma")
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

S2H_AVX2 inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

S2H_AVX2 void dot_avx2(const float* vals, const int32_t* row_ptr, const int32_t* col, int64_t r0, int64_t r1,
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

// Orders the streaming (non-temporal) stores of the x86 kernels before the caller reads y.
inline void fence_streaming_stores() {
#if S2H_X86
  _mm_sfence();
#endif
}

template <typename T>
const Kernels<T>& kernels_for(Isa isa) {
  static const Kernels<T> scalar = scalar_kernels<T>();
#if S2H_X86
  if constexpr (std::is_same_v<T, float>) {
    static const Kernels<float> k512 = avx512_kernels();
    static const Kernels<float> k2 = avx2_kernels();
    if (isa == Isa::avx512) return k512;
    if (isa == Isa::avx2) return k2;
  }
#endif
  return scalar;
}

// ----------------------------------------------------------------------------------------------
// Driver
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

// Per-thread scratch, reused across calls (no allocation in the hot path).
template <typename T>
struct Scratch {
  std::vector<int32_t> off;
  std::vector<int32_t> pp;
  std::vector<T> tile;
};
template <typename T>
Scratch<T>& scratch() {
  thread_local Scratch<T> s;
  return s;
}

// Per-thread, 64-byte aligned buffer for the copies of X the ops make (aligned rows, the padded
// conv input), kept across calls: a fresh allocation of that size is mmapped and page-faults on
// every call, which cost up to 40% of a call at 95% sparsity.  It grows up to 64 MB per thread
// (S2H_SPMM_KEEP_SCRATCH bytes; like oneDNN's scratchpad); larger copies get a fresh tensor each
// call, so that a big batch does not pin its buffer for the life of the thread.  The view is
// valid until the next call on the same thread.

template <typename T>
at::Tensor x_scratch(at::IntArrayRef sizes, at::IntArrayRef strides, int64_t numel, const at::TensorOptions& opts) {
  struct Buf {
    std::unique_ptr<void, decltype(&std::free)> p{nullptr, &std::free};
    size_t bytes = 0;
  };
  thread_local Buf buf;
  const size_t need = (static_cast<size_t>(std::max<int64_t>(numel, 1)) * sizeof(T) + 63) / 64 * 64;
  if (need > static_cast<size_t>(env_int("S2H_SPMM_KEEP_SCRATCH", int64_t(64) << 20)))
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

// Rows [r0, r1) x the tiles of the (batch x column-tile) grid that next_tiles(t0, t1) hands out
// (ranges, until it returns false).
template <typename T, typename NextTiles>
void run_part(const Problem<T>& p, const Kernels<T>& k, int64_t tc, int64_t panel_cols, int64_t r0, int64_t r1,
              NextTiles&& next_tiles) {
  if (r0 >= r1) return;
  const int64_t nnz0 = p.row_ptr[r0], nnz1 = p.row_ptr[r1];
  const int64_t ntiles = (p.n + tc - 1) / tc;

  if (p.n == 1 && p.batch == 1 && p.tab == nullptr && p.ldx == 1) {  // Linear at batch 1
    int64_t t0, t1;
    while (next_tiles(t0, t1)) k.dot(p.vals, p.row_ptr, p.col, r0, r1, p.x, p.y, p.ldy, p.bias, p.relu);
    return;
  }

  Scratch<T>& s = scratch<T>();
  s.off.resize(static_cast<size_t>(std::max<int64_t>(nnz1 - nnz0, 1)));
  int32_t* off = s.off.data();
  if (p.tab == nullptr) {
    for (int64_t j = nnz0; j < nnz1; ++j) off[j - nnz0] = static_cast<int32_t>(p.col[j] * p.ldx);
  } else {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t base = (r / p.group_rows) * p.group_stride;
      for (int64_t j = p.row_ptr[r]; j < p.row_ptr[r + 1]; ++j)
        off[j - nnz0] = static_cast<int32_t>(p.tab[p.col[j]] + base);
    }
  }
  // K panels: pp[q*rows + (r - r0)] = first nonzero of row r with column >= q*panel_cols.
  const int64_t rows = r1 - r0;
  const int64_t panels = std::max<int64_t>(1, (p.k + panel_cols - 1) / panel_cols);  // K == 0: one empty panel
  if (panels > 1) {
    s.pp.resize(static_cast<size_t>((panels + 1) * rows));
    int32_t* pp = s.pp.data();
    for (int64_t r = r0; r < r1; ++r) {
      int64_t j = p.row_ptr[r];
      const int64_t e = p.row_ptr[r + 1];
      for (int64_t q = 0; q < panels; ++q) {
        const int64_t lo = q * panel_cols;
        while (j < e && p.col[j] < lo) ++j;
        pp[q * rows + (r - r0)] = static_cast<int32_t>(j);
      }
      pp[panels * rows + (r - r0)] = static_cast<int32_t>(e);
    }
  }
  const bool wrap = p.wq > 0;
  const bool wrap_native = wrap && k.wrap[1] != nullptr;
  if (wrap && !wrap_native) s.tile.resize(static_cast<size_t>(rows * tc));
  uint16_t wmask[16];
  int32_t wdst[16];
  const int64_t y_bytes = p.batch * (p.y_bstride > 0 ? p.y_bstride : p.m * p.ldy) * (int64_t)sizeof(T);
  const bool stream = panels == 1 && !wrap && p.ldy % 16 == 0 && y_bytes >= env_int("S2H_SPMM_STREAM", 2 << 20);

  TileArgs<T> a{};
  a.vals = p.vals;
  a.off = off;
  a.nnz_base = nnz0;
  a.r0 = r0;
  a.r1 = r1;
  a.bias = p.bias;
  a.relu = p.relu;
  int64_t t0, t1;
  while (next_tiles(t0, t1))
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = t / ntiles, q0 = (t - b * ntiles) * tc;
    const int64_t nv = std::min(tc, p.n - q0);
    const int64_t nvec = (nv + k.width - 1) / k.width;
    TileFn<T> fn = (nv % k.width == 0) ? k.full[nvec] : k.tail[nvec];
    a.xq = p.x + b * p.x_bstride + q0;
    a.nv = nv;
    T* yb = p.y + b * p.y_bstride;
    if (!wrap) {
      a.y = yb + q0;
      a.ldy = p.ldy;
    } else if (wrap_native) {
      // Lanes of the grid q = oh*wq + ow with ow < wo, stored packed at oh*wo + ow.
      for (int64_t v = 0; v < nvec; ++v) {
        uint32_t mask = 0;
        int32_t dst = -1;
        for (int64_t l = 0; l < k.width; ++l) {
          const int64_t q = q0 + v * k.width + l;
          if (q >= q0 + nv) break;
          const int64_t oh = q / p.wq, ow = q - oh * p.wq;
          if (ow < p.wo) {
            mask |= 1u << l;
            if (dst < 0) dst = static_cast<int32_t>(oh * p.wo + ow);
          }
        }
        wmask[v] = static_cast<uint16_t>(mask);
        wdst[v] = dst < 0 ? 0 : dst;
      }
      a.wmask = wmask;
      a.wdst = wdst;
      a.y = yb;
      a.ldy = p.ldy;
      fn = k.wrap[nvec];
    } else {  // compute into the per-thread tile buffer, keep the columns ow < wo afterwards
      a.y = s.tile.data() - r0 * tc;
      a.ldy = tc;
    }
    for (int64_t q = 0; q < panels; ++q) {
      if (panels == 1) {
        a.rs = p.row_ptr;
        a.re = p.row_ptr + 1;
      } else {
        a.rs = s.pp.data() + q * rows - r0;
        a.re = s.pp.data() + (q + 1) * rows - r0;
      }
      a.first = q == 0;
      a.last = q == panels - 1;
      a.stream = stream && reinterpret_cast<uintptr_t>(a.y) % 64 == 0;
      fn(a);
    }
    if (!wrap || wrap_native) continue;
    for (int64_t r = r0; r < r1; ++r) {
      const T* src = s.tile.data() + (r - r0) * tc;
      T* dst = yb + r * p.ldy;
      int64_t q = q0;
      const int64_t qe = q0 + nv;
      while (q < qe) {
        const int64_t oh = q / p.wq, ow = q - oh * p.wq;
        const int64_t seg = std::min(p.wq - ow, qe - q);  // up to the end of this grid row
        if (ow < p.wo) std::memcpy(dst + oh * p.wo + ow, src + (q - q0), sizeof(T) * std::min(seg, p.wo - ow));
        q += seg;
      }
    }
  }
}

template <typename T>
void run(Problem<T> p) {  // a copy: shared_input() points p.x at the input copy it makes
  const Kernels<T>& k = kernels_for<T>(std::is_same_v<T, float> ? active_isa() : Isa::scalar);
  // Tile: all of N when it fits in vwide vectors (one pass over the rows: every nonzero reads
  // its X row once, whole), else vmax vectors.
  const int64_t nvec_all = (p.n + k.width - 1) / k.width;
  const int64_t vtile = env_int("S2H_SPMM_TILE_V", nvec_all <= k.vwide ? nvec_all : k.vmax);
  const int64_t tc = k.width * std::min<int64_t>(k.vwide, std::max<int64_t>(1, vtile));
  const int64_t ntiles = p.batch * ((p.n + tc - 1) / tc);
  if (p.m == 0 || ntiles == 0) return;
  const int64_t nnz = p.row_ptr[p.m];
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // Work of the whole problem in "nonzero x tile" units; tiny problems stay on one thread.
  const int64_t work = (nnz + 4 * p.m) * ntiles * std::min<int64_t>(p.n, tc);
  // 2^14 units: a 1000x512 Linear at batch 1 and 90% (51k nonzeros) runs on 2 threads in 0.6x the
  // time of 1 (measured), and OpenMP's few microseconds per region stay small against the work.
  int64_t parts = std::min<int64_t>(threads, std::max<int64_t>(1, work / env_int("S2H_SPMM_WORK", 1 << 14)));
  // Rows (nnz-balanced ranges, every thread walks all tiles) or tiles (every thread all rows).
  // Per thread, rows read all of X and 1/parts of W from memory, tiles 1/parts of X and all of
  // W (W is re-read per tile from L2 either way): split the tiles when X outweighs W and there
  // are enough of them to balance, or when there are too few rows.
  const int64_t x_bytes = (p.x_bstride > 0 ? p.batch * p.x_bstride : p.k * p.ldx) * (int64_t)sizeof(T);
  const int64_t w_bytes = nnz * (int64_t)(sizeof(T) + sizeof(int32_t));
  const bool by_tiles = parts > 1 && ((ntiles >= 3 * parts && (p.m < 8 * parts || x_bytes > w_bytes)) || p.m < parts);
  const bool by_rows = parts > 1 && !by_tiles;
  if (by_rows) parts = std::min(parts, p.m);
  const int64_t rows_per_thread = by_rows ? (p.m + parts - 1) / parts : p.m;

  // K panels: the X rows of one tile for a range of columns sized to stay in L1, all rows of a
  // thread walked per panel with their partial sums kept in y.  Worth it while a row still has
  // enough nonzeros per panel and (for a plain matmul) the partial sums of the thread's rows
  // stay near L1; a conv gains more (the kh*kw taps of a channel share its lines).
  int64_t panel_cols = std::max<int64_t>(p.k, 1);
  {
    const bool conv = p.col_group > 1;  // kh*kw > 1 taps per input channel
    const int64_t budget = env_int("S2H_SPMM_L1", 32 * 1024);
    const int64_t tile_bytes = std::min(tc, p.n) * (int64_t)sizeof(T);
    const int64_t per_group = p.group_phases * (std::min(tc, p.n) + p.group_span) * (int64_t)sizeof(T);
    const int64_t cols = std::max<int64_t>(1, budget / std::max<int64_t>(per_group, 1)) * p.col_group;
    const double per_row_panel = (double)nnz / p.m * (double)cols / std::max<int64_t>(p.k, 1);
    // Plain matmul: only when the X rows of a tile do not stay near L1 anyway and the partial
    // sums of the thread's rows are small (measured on ResNet GEMMs: 64-128 rows at 70% gain
    // 30%; 512x4608x49 and 2048x512x49 lose 12-30%, 512x4608x49 at 95% loses 2x).
    const bool partials_fit = conv || (rows_per_thread * tile_bytes <= env_int("S2H_SPMM_PARTIALS", 64 * 1024) &&
                                       p.k * tile_bytes > 256 * 1024);
    const int64_t pmin = env_int("S2H_SPMM_PMIN", conv ? 6 : 12);
    if (cols < p.k && partials_fit && per_row_panel >= (double)pmin) panel_cols = cols;
  }
  // Dynamic scheduling over nnz-balanced chunks (several per thread): a thread that the OS
  // preempts (a busy machine) delays the call by one chunk, not by half of it.
  auto once = [](int64_t lo, int64_t hi) {
    return [lo, hi, done = false](int64_t& t0, int64_t& t1) mutable {
      if (done || lo >= hi) return false;
      t0 = lo, t1 = hi, done = true;
      return true;
    };
  };
  // Convs split by tiles: one contiguous run of tiles per thread (see below).
  const bool conv_runs = by_tiles && p.tab != nullptr && p.x_bstride > 0 && env_int("S2H_SPMM_CONV_STATIC", 1);
  const bool own = p.own_input && conv_runs && p.batch == 1;
  // By rows every thread reads all of the input: at batch 1 each makes its whole copy itself
  // (3-10% faster at 2 threads on 14x14 and 7x7 convs than one shared copy, whose lines both
  // cores read and every call has to take back).
  const bool own_rows = p.own_input && by_rows && p.batch == 1;
  if (!own && !own_rows && p.shared_input) p.shared_input(p);
  if (parts <= 1) {
    run_part(p, k, tc, panel_cols, 0, p.m, once(0, ntiles));
    fence_streaming_stores();
    return;
  }
  const int64_t per_thread = std::max<int64_t>(1, env_int("S2H_SPMM_CHUNKS", 4));
  std::atomic<int64_t> counter{0};
  if (by_rows) {
    const int64_t chunks = std::min(p.m, parts * per_thread);
    at::parallel_for(0, parts, 1, [&](int64_t, int64_t) {
      Problem<T> local = p;
      if (own_rows) p.own_input(0, p.n, local);
      for (int64_t c; (c = counter.fetch_add(1)) < chunks;)
        run_part(local, k, tc, panel_cols, split_rows(p.row_ptr, p.m, chunks, c, 4),
                 split_rows(p.row_ptr, p.m, chunks, c + 1, 4), once(0, ntiles));
      fence_streaming_stores();
    });
  } else if (conv_runs) {
    // Conv: thread i takes the i-th contiguous run of tiles, about the output rows whose input
    // rows it copied in fill_phases (the same contiguous split when parts equals the thread
    // count), so most of its X is in its own L2.  1x1 convs read the input itself; contiguous
    // runs cost them nothing.
    // At batch 1 each thread also copies the input rows of its tiles itself (own_input): a
    // shared copy has lines that both threads read, and every call's copy then has to take them
    // back from the other core (on Zen 4 that made a 2-thread stride-2 copy as slow per thread
    // as the whole copy on one thread).  Interleaved, 2 threads: stride-2 64x56x56 at 95%
    // 0.207 to 0.161 ms, at 90% 0.281 to 0.214; stride-1 64x56x56 3-4%.  The halo rows (the
    // taps' row shift) are copied by both threads.
    at::parallel_for(0, parts, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t t0 = i * ntiles / parts, t1 = (i + 1) * ntiles / parts;
        if (!own) {
          run_part(p, k, tc, panel_cols, 0, p.m, once(t0, t1));
        } else if (t0 < t1) {
          Problem<T> local = p;
          p.own_input(t0 * tc, std::min(t1 * tc, p.n), local);
          run_part(local, k, tc, panel_cols, 0, p.m, once(t0, t1));
        }
      }
      fence_streaming_stores();
    });
  } else {
    const int64_t step = std::max<int64_t>(1, ntiles / (parts * per_thread));
    at::parallel_for(0, parts, 1, [&](int64_t, int64_t) {
      run_part(p, k, tc, panel_cols, 0, p.m, [&](int64_t& t0, int64_t& t1) {
        t0 = counter.fetch_add(step);
        if (t0 >= ntiles) return false;
        t1 = std::min(ntiles, t0 + step);
        return true;
      });
      fence_streaming_stores();
    });
  }
}

// ----------------------------------------------------------------------------------------------
// Ops
void check_csr(const at::Tensor& values, const at::Tensor& row_ptr, const at::Tensor& col_idx,
               const c10::optional<at::Tensor>& bias, const at::Tensor& x, const char* op) {
  TORCH_CHECK(row_ptr.dim() == 1 && row_ptr.numel() >= 1 && row_ptr.scalar_type() == at::kInt, op,
              ": row_ptr must be a 1-D int32 tensor of M+1 entries, got ", row_ptr.sizes(), " ", row_ptr.scalar_type());
  TORCH_CHECK(col_idx.dim() == 1 && col_idx.scalar_type() == at::kInt, op, ": col_idx must be a 1-D int32 tensor, got ",
              col_idx.sizes(), " ", col_idx.scalar_type());
  TORCH_CHECK(values.dim() == 1 && values.numel() == col_idx.numel(), op, ": values must be 1-D with nnz = ",
              col_idx.numel(), " entries, got ", values.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": x must be float32 or float64 on the CPU, got ", x.scalar_type());
  TORCH_CHECK(values.scalar_type() == x.scalar_type(), op, ": values (", values.scalar_type(), ") and x (",
              x.scalar_type(), ") must have the same dtype");
  TORCH_CHECK(values.is_contiguous() && row_ptr.is_contiguous() && col_idx.is_contiguous(), op,
              ": values, row_ptr and col_idx must be contiguous");
  const int64_t m = row_ptr.numel() - 1;
  const int32_t* rp = row_ptr.data_ptr<int32_t>();
  TORCH_CHECK(rp[m] == col_idx.numel() && rp[0] == 0, op,
              ": row_ptr must start at 0 and end at nnz = ", col_idx.numel());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->numel() == m, op, ": bias must have M = ", m, " entries, got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias dtype ", bias->scalar_type(), " != x dtype ",
                x.scalar_type());
  }
}

at::Tensor spmm_cpu(const at::Tensor& values, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                    const c10::optional<at::Tensor>& /*row_order: GPU only*/, const at::Tensor& x_in,
                    const c10::optional<at::Tensor>& bias_in, bool relu) {
  TORCH_CHECK(x_in.dim() == 2, "spmm: x must be 2-D (K, N), got shape ", x_in.sizes());
  check_csr(values, row_ptr, col_idx, bias_in, x_in, "spmm");
  const int64_t m = row_ptr.numel() - 1, n = x_in.size(1);
  // Unit stride along N (any row stride); N == 1 wants a contiguous column for the gather.
  const bool ok = x_in.stride(1) == 1 || n == 1;
  at::Tensor x = (ok && (n != 1 || x_in.stride(0) == 1)) ? x_in : x_in.contiguous();
  // Rows of X that do not start on a 64-byte line make every vector load a split load (about
  // 1.2-1.7x slower when X lives in L2): copy X once into 16-float aligned rows, when each row of
  // X is read often enough (nnz / K times) to repay the copy.  A last vector with only 1-2 valid
  // lanes (N = 17, 49, 50, ...) still costs a whole cache line of X per nonzero: those columns
  // are copied out as contiguous vectors and computed with the gather dot kernel, when that line
  // is a large share of the loads (N < 48) or comes from far (X over 512 KB).  Measured at 90%,
  // one thread: 512x4608x49 and 256x2304x49 gain 12%, 512x1024x17 11%; 1024x1024x49 (X 256 KB)
  // loses 7%, its rows being too short to repay the dot kernel's per-row cost.
  const int64_t nnz = col_idx.numel(), k = x.size(0);
  const bool reused = x.scalar_type() == at::kFloat && n >= 16 && k > 0 && nnz >= env_int("S2H_SPMM_ALIGN", 16) * k;
  const bool far_or_few = n < 48 || k * ((n + 15) / 16 * 16) * 4 > env_int("S2H_SPMM_TAIL_X", 512 * 1024);
  const int64_t tail = reused && n > 16 && far_or_few && n % 16 <= env_int("S2H_SPMM_TAIL_DOT", 2) ? n % 16 : 0;
  const bool misaligned = x.stride(0) % 16 != 0 || reinterpret_cast<uintptr_t>(x.data_ptr()) % 64 != 0;
  const int64_t n_main = n - tail;  // columns computed by the tile kernels
  const float* tail_cols = nullptr;  // tail columns c at tail_cols + c * k
  if (reused && (misaligned || tail > 0)) {
    const int64_t ld = (n_main + 15) / 16 * 16, lds = x.stride(0);
    at::Tensor xa = x_scratch<float>({k, n_main}, {ld, 1}, k * ld + tail * k, x.options());
    const float* src = x.data_ptr<float>();
    float* dst = xa.data_ptr<float>();
    float* dst_tail = dst + k * ld;
    // Row by row with memcpy: about twice as fast as Tensor.copy_ into the strided view.
    at::parallel_for(0, k, std::max<int64_t>(1, (1 << 16) / n), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        std::memcpy(dst + r * ld, src + r * lds, sizeof(float) * n_main);
        for (int64_t c = 0; c < tail; ++c) dst_tail[c * k + r] = src[r * lds + n_main + c];
      }
    });
    x = xa;
    tail_cols = dst_tail;
  }
  TORCH_CHECK(x.numel() == 0 || x.stride(0) * (x.size(0) - 1) + n <= INT32_MAX, "spmm: x is too large for 32-bit offsets");
  at::Tensor y = at::empty({m, n}, x.options());
  at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  if (m == 0 || n == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "spmm", [&] {
    Problem<scalar_t> p{};
    p.vals = values.data_ptr<scalar_t>();
    p.row_ptr = row_ptr.data_ptr<int32_t>();
    p.col = col_idx.data_ptr<int32_t>();
    p.m = m;
    p.x = x.data_ptr<scalar_t>();
    p.x_bstride = 0;
    p.batch = 1;
    p.ldx = n_main == 1 ? 1 : x.stride(0);
    p.n = n_main;
    p.k = x.size(0);
    p.y = y.data_ptr<scalar_t>();
    p.y_bstride = 0;
    p.ldy = n;
    p.bias = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
    p.relu = relu;
    run(p);
    TORCH_INTERNAL_ASSERT(tail == 0 || (std::is_same_v<scalar_t, float>));
    for (int64_t c = 0; c < tail; ++c) {  // one column each: N == 1, the dot kernel (float only)
      p.x = reinterpret_cast<const scalar_t*>(tail_cols) + c * k;
      p.ldx = 1;
      p.n = 1;
      p.y = y.data_ptr<scalar_t>() + n_main + c;
      run(p);
    }
  });
  return y;
}

// Both width phases of one stride-2 row in one pass over it: d0[j] = s[2*j] for j < n0 and
// d1[j] = s[2*j + 1] for j < n1.  One copy per ISA (the compiler vectorises each; vpermt2ps on
// AVX-512), picked with the kernels' ISA so that S2H_SPMM_ISA tests every one.
template <typename T>
using Stride2Fn = void (*)(const T* __restrict, T* __restrict, int64_t, T* __restrict, int64_t);
#define S2H_DEFINE_STRIDE2(NAME, ATTR)                                                           \
  template <typename T>                                                                          \
  ATTR void NAME(const T* __restrict s, T* __restrict d0, int64_t n0, T* __restrict d1, int64_t n1) { \
    const int64_t n = std::min(n0, n1);                                                          \
    for (int64_t j = 0; j < n; ++j) {                                                            \
      d0[j] = s[2 * j];                                                                          \
      d1[j] = s[2 * j + 1];                                                                      \
    }                                                                                            \
    for (int64_t j = n; j < n0; ++j) d0[j] = s[2 * j];                                           \
    for (int64_t j = n; j < n1; ++j) d1[j] = s[2 * j + 1];                                       \
  }
S2H_DEFINE_STRIDE2(copy_stride2_scalar, )
#if S2H_X86
S2H_DEFINE_STRIDE2(copy_stride2_avx512, __attribute__((target("avx512f"))))
S2H_DEFINE_STRIDE2(copy_stride2_avx2, __attribute__((target("avx2"))))
#endif
#undef S2H_DEFINE_STRIDE2

template <typename T>
Stride2Fn<T> stride2_for(Isa isa) {
#if S2H_X86
  if (isa == Isa::avx512) return copy_stride2_avx512<T>;
  if (isa == Isa::avx2) return copy_stride2_avx2<T>;
#endif
  return copy_stride2_scalar<T>;
}

// One input row into its padded row for stride 1, padding included, in whole vectors:
// d[j] = s[j - pw] where that is inside [0, w), else 0.  Masked loads read only the lanes inside
// the row (they do not fault on the others).  Against memset / memcpy per row (7-58 elements),
// 34 to 25 us for a 256x14x14 input, 36 to 28 for 512x7x7 (Zen 4).  For stride 2 the same with
// a vpermt2ps per vector was slower than copy_stride2 (76 against 65 us, 64x56x56).
template <typename T>
using PadRowFn = void (*)(const T* s, int64_t w, int64_t pw, T* d, int64_t wq);
#if S2H_X86
S2H_TARGET_BEGIN("avx512f")
// Lanes l of a 16-lane load at source index k0 with 0 <= k0 + l < w.
inline __mmask16 row_lanes(int64_t k0, int64_t w) {
  const int64_t lo = std::clamp<int64_t>(-k0, 0, 16), hi = std::clamp<int64_t>(w - k0, 0, 16);
  return static_cast<__mmask16>(((1u << hi) - 1u) & ~((1u << lo) - 1u));
}
inline __mmask16 first_lanes(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u); }

void pad_row_s1_avx512(const float* s, int64_t w, int64_t pw, float* d, int64_t wq) {
  for (int64_t j = 0; j < wq; j += 16) {
    const int64_t k0 = j - pw;
    _mm512_mask_storeu_ps(d + j, first_lanes(wq - j), _mm512_maskz_loadu_ps(row_lanes(k0, w), s + k0));
  }
}
S2H_TARGET_END
#endif

// The vector row filler for this dtype, ISA and stride, or null (the copy loops below).
template <typename T>
PadRowFn<T> pad_row_for(Isa isa, int64_t sw) {
#if S2H_X86
  if constexpr (std::is_same_v<T, float>) {
    if (isa == Isa::avx512 && sw == 1) return pad_row_s1_avx512;
  }
#endif
  (void)isa, (void)sw;
  return nullptr;
}

// Copy x (B, C, H, W) into the zero-padded, stride-phase-split buffer of conv_tap_offset.
// Per-row geometry is hoisted out of the copy loops: for 64x56x56 stride-2 inputs the per-row
// divisions used to cost as much as the whole sparse product at 95% sparsity.
// Threads split (image, row) ranges for stride 1 (see the split below): the product then gives
// each thread contiguous output tiles (run: the static conv split), whose input rows that thread
// wrote itself and finds in its own L2.  Split by channel, half of every tile's input sat in the
// other core's L2.
template <typename T>
void fill_phases(const T* x, T* buf, int64_t batch, int64_t c, int64_t h, int64_t w, int64_t sh, int64_t sw,
                 int64_t ph, int64_t pw, int64_t wq, int64_t row0, int64_t prows) {
  // Width phase b: columns j in [j0[b], j1[b]) hold input column j*sw + b - pw, the rest is padding.
  std::vector<int64_t> j0(static_cast<size_t>(sw)), j1(static_cast<size_t>(sw));
  for (int64_t b = 0; b < sw; ++b) {
    j0[b] = std::min<int64_t>(wq, std::max<int64_t>(0, (pw - b + sw - 1) / sw));
    const int64_t last = w - 1 + pw - b;  // j*sw <= last
    j1[b] = last < 0 ? j0[b] : std::max<int64_t>(j0[b], std::min<int64_t>(wq, last / sw + 1));
  }
  const int64_t plane = prows * wq;  // phase rows [row0, row0 + prows) of every plane
  const Stride2Fn<T> copy_stride2 = stride2_for<T>(active_isa());
  const PadRowFn<T> pad_row = pad_row_for<T>(active_isa(), sw);
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, c * sh * sw * wq));
  // Rows [i0, i1) of channels [c0, c1) of image img, every stride phase.
  auto fill = [&](int64_t img, int64_t i0, int64_t i1, int64_t c0, int64_t c1) {
    for (int64_t ch = c0; ch < c1; ++ch) {  // channel-major: sequential writes within a plane
      const T* src = x + (img * c + ch) * h * w;
      T* dst = buf + (img * c + ch) * sh * sw * plane;
      for (int64_t a = 0; a < sh; ++a) {
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t r = conv_src_index(i, a, sh, ph, h);
          T* row = dst + a * sw * plane + (i - row0) * wq;  // width phase b at row + b * plane
          if (r < 0) {
            for (int64_t b = 0; b < sw; ++b) std::memset(row + b * plane, 0, sizeof(T) * wq);
            continue;
          }
          const T* sr = src + r * w;
          if (pad_row) {
            pad_row(sr, w, pw, row, wq);
            continue;
          }
          if (sw == 2) {
            // Phase b starts at input column lo*2 + b - pw, which is 0 or 1: the phase whose
            // columns are even and the one whose columns are odd come from one pass.
            const int64_t be = (pw % 2 == 0) ? 0 : 1;  // the phase of the even columns
            T* de = row + be * plane;
            T* dd = row + (1 - be) * plane;
            copy_stride2(sr, de + j0[be], j1[be] - j0[be], dd + j0[1 - be], j1[1 - be] - j0[1 - be]);
            for (int64_t b = 0; b < 2; ++b) {
              T* d = row + b * plane;
              for (int64_t j = 0; j < j0[b]; ++j) d[j] = T(0);
              for (int64_t j = j1[b]; j < wq; ++j) d[j] = T(0);
            }
            continue;
          }
          for (int64_t b = 0; b < sw; ++b) {
            T* d = row + b * plane;
            const int64_t lo = j0[b], hi = j1[b];
            const T* sp = sr + lo * sw + b - pw;
            std::memset(d, 0, sizeof(T) * lo);
            if (sw == 1) {
              std::memcpy(d + lo, sp, sizeof(T) * (hi - lo));
            } else {
              for (int64_t j = 0; j < hi - lo; ++j) d[lo + j] = sp[j * sw];
            }
            std::memset(d + hi, 0, sizeof(T) * (wq - hi));
          }
        }
      }
    }
  };
  // Stride 1: threads split (image, row) ranges, matching the contiguous runs of output tiles
  // the product gives each thread.  Strided: (image, channel) ranges.  Each thread's rows end
  // mid cache line in every phase plane, and with 4 planes per channel the lines both threads
  // write cost more than the locality gains.  Measured at 2 threads, 95%, interleaved: stride-2
  // 64x56x56 0.221 (rows) against 0.203 ms (channels); stride-1 64x56x56 0.186 against 0.197.
  if (sh * sw > 1) {
    at::parallel_for(0, batch * c, 1, [&](int64_t begin, int64_t end) {
      for (int64_t img = begin / c; img * c < end; ++img)
        fill(img, row0, row0 + prows, std::max(begin - img * c, int64_t(0)), std::min(end - img * c, c));
    });
    return;
  }
  at::parallel_for(0, batch * prows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t img = begin / prows; img * prows < end; ++img)
      fill(img, row0 + std::max(begin - img * prows, int64_t(0)), row0 + std::min(end - img * prows, prows), 0, c);
  });
}

at::Tensor spmm_conv2d_cpu(const at::Tensor& values, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                           const at::Tensor& x_in, const c10::optional<at::Tensor>& bias_in, at::IntArrayRef kernel_size,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                           bool relu) {
  TORCH_CHECK(x_in.dim() == 4, "spmm_conv2d: x must be 4-D (B, C, H, W), got shape ", x_in.sizes());
  check_csr(values, row_ptr, col_idx, bias_in, x_in, "spmm_conv2d");
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "spmm_conv2d: kernel_size, stride, padding and dilation must have 2 entries");
  const int64_t kh = kernel_size[0], kw = kernel_size[1], sh = stride[0], sw = stride[1];
  const int64_t ph = padding[0], pw = padding[1], dh = dilation[0], dw = dilation[1];
  TORCH_CHECK(kh > 0 && kw > 0 && sh > 0 && sw > 0 && dh > 0 && dw > 0 && ph >= 0 && pw >= 0,
              "spmm_conv2d: kernel_size, stride and dilation must be positive and padding non-negative");
  const int64_t m = row_ptr.numel() - 1;
  const int64_t batch = x_in.size(0), c = x_in.size(1), h = x_in.size(2), w = x_in.size(3);
  TORCH_CHECK(groups > 0 && c % groups == 0 && m % groups == 0, "spmm_conv2d: groups=", groups,
              " must divide the input channels (", c, ") and the output channels (", m, ")");
  const int64_t cg = c / groups;
  const int64_t ho = conv_out_size(h, kh, sh, ph, dh), wo = conv_out_size(w, kw, sw, pw, dw);
  TORCH_CHECK(ho > 0 && wo > 0, "spmm_conv2d: input ", x_in.sizes(), " is too small for the kernel");
  at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty({batch, m, ho, wo}, x.options());
  at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  if (batch == 0 || m == 0) return y;
  const int64_t kcols = cg * kh * kw;

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "spmm_conv2d", [&] {
    Problem<scalar_t> p{};
    p.vals = values.data_ptr<scalar_t>();
    p.row_ptr = row_ptr.data_ptr<int32_t>();
    p.col = col_idx.data_ptr<int32_t>();
    p.m = m;
    p.batch = batch;
    p.y = y.data_ptr<scalar_t>();
    p.y_bstride = m * ho * wo;
    p.ldy = ho * wo;
    p.bias = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
    p.relu = relu;
    p.group_rows = m / groups;
    p.k = kcols;
    p.col_group = kh * kw;
    std::vector<int64_t> tab(static_cast<size_t>(kcols));
    at::Tensor buf;
    if (kh == 1 && kw == 1 && ph == 0 && pw == 0) {
      // 1x1: the input itself (strided convs read a subsampled copy); no padding, no grid wrap.
      at::Tensor xs = (sh == 1 && sw == 1) ? x : x.slice(2, 0, h, sh).slice(3, 0, w, sw).contiguous();
      buf = xs;
      const int64_t hw = ho * wo;
      for (int64_t k = 0; k < kcols; ++k) tab[k] = k * hw;
      p.x = buf.data_ptr<scalar_t>();
      p.x_bstride = c * hw;
      p.group_stride = cg * hw;
      p.n = hw;
    } else {
      const int64_t hq = conv_phase_size(h, sh, ph), wq = conv_phase_size(w, sw, pw);
      const int64_t per_item = c * sh * sw * hq * wq;
      // Tap offsets into planes of `rows` phase rows, starting at phase row row0: the taps of
      // channel 0, then a channel stride (no divisions per column: for 512 channels the
      // per-column formula cost 16 us a call).
      auto tap_table = [=](int64_t* t, int64_t row0, int64_t rows) {
        const int64_t taps = std::min(kh * kw, kcols), chan = sh * sw * rows * wq;  // kcols = 0: no channels
        for (int64_t j = 0; j < taps; ++j) t[j] = conv_tap_offset(j, kh, kw, sh, sw, dh, dw, rows, wq) - row0 * wq;
        for (int64_t j = taps; j < kcols; ++j) t[j] = t[j - taps] + chan;
      };
      // The padded phase rows [row0, row0 + rows) of `items` images into a scratch buffer (the
      // calling thread's), with the tap table `t` and into's pointers made to match.
      const scalar_t* xp = x.data_ptr<scalar_t>();
      const at::TensorOptions opts = x.options();
      auto copy_input = [=](Problem<scalar_t>& into, int64_t items, int64_t row0, int64_t rows, int64_t* t) {
        // Slack after the last item: grid columns ow >= wo may read up to wq elements past a
        // phase, and the AVX-512 grid kernels load whole vectors past the grid end (< 16).
        const int64_t item = c * sh * sw * rows * wq, slack = wq + 64;
        into.input = x_scratch<scalar_t>({items * item + slack}, {1}, items * item + slack, opts);
        scalar_t* b = into.input.data_ptr<scalar_t>();
        fill_phases<scalar_t>(xp, b, items, c, h, w, sh, sw, ph, pw, wq, row0, rows);
        std::fill(b + items * item, b + items * item + slack, scalar_t(0));
        tap_table(t, row0, rows);
        into.x = b;
        into.tab = t;
        into.x_bstride = item;
        into.group_stride = cg * sh * sw * rows * wq;
      };
      int64_t* shared_tab = tab.data();
      p.shared_input = [=](Problem<scalar_t>& shared) { copy_input(shared, batch, 0, hq, shared_tab); };
      // Phase rows that output rows [oh0, oh1] read: up to the taps' largest row shift below.
      const int64_t shift_h = (kh - 1) * dh / sh;
      p.own_input = [=](int64_t q0, int64_t q1, Problem<scalar_t>& local) {
        const int64_t row0 = q0 / wq, rows = std::min(hq, (q1 - 1) / wq + shift_h + 1) - row0;
        thread_local std::vector<int64_t> own_tab;
        own_tab.resize(static_cast<size_t>(kcols));
        copy_input(local, 1, row0, rows, own_tab.data());
      };
      p.x = nullptr;  // x and tab's contents: set by shared_input or own_input
      p.x_bstride = per_item;
      p.group_stride = cg * sh * sw * hq * wq;
      p.n = ho * wq;
      p.group_phases = std::min(sh, kh) * std::min(sw, kw);
      p.group_span = ((kh - 1) * dh / sh) * wq + (kw - 1) * dw / sw;
      if (wq != wo) {
        p.wq = wq;
        p.wo = wo;
      }
    }
    TORCH_CHECK(p.x_bstride + p.n <= INT32_MAX, "spmm_conv2d: one input image is too large for 32-bit offsets");
    p.tab = tab.data();
    run(p);
  });
  return y;
}

}  // namespace
}  // namespace s2h::spmm

TORCH_LIBRARY_IMPL(s2h, CPU, m) {
  m.impl("spmm", &s2h::spmm::spmm_cpu);
  m.impl("spmm_conv2d", &s2h::spmm::spmm_conv2d_cpu);
}
