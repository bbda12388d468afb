// Channel masks for all groups in one call, on the CPU (parallel over groups when there are many
// buckets; ResNet-50's 11k run on one thread: waking the pool costs more than the work).
// Math: csrc/common/channel_masks.h; reference: s2h_kernels/reference/channel_masks.py.
//
// A group is swept in blocks of L buckets, one vector of the ISA (L = 16 floats for AVX-512, 8 for
// AVX2, 4 for the baseline); its last, partial block goes through a padded copy (logit -inf:
// probability 0; gradient 0), so every sweep runs the same vector body and no loop ends in scalar
// iterations of the exponential. Per group, three sweeps each way:
// * forward: the maximum; exp into w (or a scratch) with the sums s = sum_k e_k and
//   sum_k (k + 1) e_k, which is s * sum_j w_j, so mean(w) is known before the last sweep; then, from
//   the last block back, the reverse scan (in a vector: log2(L) shifts and adds; across blocks: one
//   scalar carry), w = scan / s written out and counted against the threshold.
// * backward: the maximum; exp kept in a scratch, with s; the inclusive scan of the bucket
//   gradients gp (into grad_u) with sum_j e_j gp_j; then grad_u from e, gp and that sum.
// Lane accumulators are reduced once per group by a tree of shuffles, never element by element.
// The per-group code is compiled for AVX-512, AVX2 and the baseline (csrc/cpu/cpu_isa.h) and chosen
// at run time; nothing needs -march=native.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/channel_masks.h"
#include "common/fast_exp.h"
#include "cpu/cpu_isa.h"

namespace s2h {
namespace {

// Below this many buckets in total a single thread is faster than waking the pool.
constexpr int64_t kParallelBuckets = 32768;

// ---- layout checks -----------------------------------------------------------------------------

struct Layout {
  std::vector<int64_t> starts;  // each group's first channel, then the channel count (G + 1)
  int64_t max_buckets = 0;      // the largest group, in buckets
};

// Checks offsets/divisors against u; each group's first channel and the largest group.
Layout check_layout(const at::Tensor& u, const at::Tensor& off, const at::Tensor& div, int64_t num_channels) {
  TORCH_CHECK(u.dim() == 1, "s2h::channel_masks: u must be 1-D (all groups packed), got shape ", u.sizes());
  TORCH_CHECK(at::isFloatingType(u.scalar_type()), "s2h::channel_masks: u must be floating point, got ", u.scalar_type());
  TORCH_CHECK(off.dim() == 1 && off.scalar_type() == at::kLong,
              "s2h::channel_masks: offsets must be a 1-D int64 tensor, got ", off.scalar_type(), " of shape ", off.sizes());
  TORCH_CHECK(off.numel() >= 2, "s2h::channel_masks: offsets needs at least 2 entries (one group), got ", off.numel());
  const int64_t groups = off.numel() - 1;
  TORCH_CHECK(div.dim() == 1 && div.scalar_type() == at::kLong && div.numel() == groups,
              "s2h::channel_masks: divisors must be a 1-D int64 tensor with one entry per group (", groups, "), got ",
              div.scalar_type(), " of shape ", div.sizes());
  TORCH_CHECK(off.device() == u.device() && div.device() == u.device(),
              "s2h::channel_masks: u, offsets and divisors must be on one device, got ", u.device(), ", ",
              off.device(), ", ", div.device());
  TORCH_CHECK(off.is_contiguous() && div.is_contiguous(), "s2h::channel_masks: internal: layout not contiguous");
  const int64_t* o = off.const_data_ptr<int64_t>();
  const int64_t* d = div.const_data_ptr<int64_t>();
  TORCH_CHECK(o[0] == 0, "s2h::channel_masks: offsets[0] must be 0, got ", o[0]);
  TORCH_CHECK(o[groups] == u.numel(), "s2h::channel_masks: offsets[-1] (", o[groups],
              ") must equal the number of buckets in u (", u.numel(), ")");
  Layout out;
  out.starts.resize(groups + 1);
  out.starts[0] = 0;
  for (int64_t g = 0; g < groups; ++g) {
    TORCH_CHECK(o[g + 1] > o[g], "s2h::channel_masks: group ", g, " is empty or offsets decrease (offsets[", g,
                "] = ", o[g], ", offsets[", g + 1, "] = ", o[g + 1], ")");
    TORCH_CHECK(d[g] >= 1, "s2h::channel_masks: divisors[", g, "] must be >= 1, got ", d[g]);
    out.starts[g + 1] = out.starts[g] + group_channels(o, d, g);
    out.max_buckets = std::max(out.max_buckets, o[g + 1] - o[g]);
  }
  TORCH_CHECK(out.starts[groups] == num_channels, "s2h::channel_masks: num_channels (", num_channels,
              ") does not match offsets and divisors (", out.starts[groups], " channels)");
  return out;
}

// ---- lanes -------------------------------------------------------------------------------------

#define CM_INLINE inline __attribute__((always_inline))

// L lanes of A as one vector of the ISA's width (GCC/clang vector extension): a block of L buckets.
// The in-block scans and the lane reductions are shuffles of it; everything else runs as `omp simd`
// loops over lane arrays. Passed by reference only (clang rejects vector arguments whose ABI
// depends on the caller's target).
template <int L, typename A>
struct LaneVec {
  typedef A type __attribute__((vector_size(L * sizeof(A))));
};
template <int L, typename A>
using Vec = typename LaneVec<L, A>::type;

template <int L, typename A>
CM_INLINE void to_vec(Vec<L, A>& v, const A* a) { std::memcpy(&v, a, sizeof v); }
template <int L, typename A>
CM_INLINE void from_vec(A* a, const Vec<L, A>& v) { std::memcpy(a, &v, sizeof v); }

// x += x shifted by S lanes: towards lane 0 (kDown: x[l + S]) or away from it (x[l - S]); zeros enter.
template <int S, bool kDown, int L, typename A, int... I>
CM_INLINE void add_shifted(Vec<L, A>& x, std::integer_sequence<int, I...>) {
  const Vec<L, A> z{};
  if constexpr (kDown)
    x += __builtin_shufflevector(x, z, (I + S < L ? I + S : L)...);
  else
    x += __builtin_shufflevector(x, z, (I >= S ? I - S : L)...);
}

// In-block inclusive scans (log2(L) shifts and adds): kDown, x[l] <- sum_{i >= l} x[i] (suffix);
// else x[l] <- sum_{i <= l} x[i] (prefix).
template <bool kDown, int L, typename A, int S = 1>
CM_INLINE void block_scan(Vec<L, A>& x) {
  if constexpr (S < L) {
    add_shifted<S, kDown, L, A>(x, std::make_integer_sequence<int, L>{});
    block_scan<kDown, L, A, 2 * S>(x);
  }
}

// x += x rotated by S lanes.
template <int S, int L, typename A, int... I>
CM_INLINE void add_rotated(Vec<L, A>& x, std::integer_sequence<int, I...>) {
  x += __builtin_shufflevector(x, x, ((I + S) % L)...);
}

// The sum of the lanes: a tree of log2(L) rotations and adds.
template <int L, typename A, int S = L / 2>
CM_INLINE A lanes_sum(const Vec<L, A>& v) {
  Vec<L, A> x = v;
  if constexpr (S >= 1) {
    add_rotated<S, L, A>(x, std::make_integer_sequence<int, L>{});
    return lanes_sum<L, A, S / 2>(x);
  } else {
    return x[0];
  }
}

// The maximum of the lanes, a tree of selects (a NaN may or may not survive it: NaN reaches the
// group's sums through exp anyway).
template <int L, typename A>
CM_INLINE A lanes_max(A* m) {
#pragma GCC unroll 8
  for (int w = L / 2; w >= 1; w /= 2) {
#pragma GCC unroll 16
    for (int l = 0; l < w; ++l) m[l] = m[l] > m[l + w] ? m[l] : m[l + w];
  }
  return m[0];
}

// Block data flows through vectors and through lane arrays (the operands of `omp simd` loops, which
// vectorise the scalar math such as exp). The arrays are aligned locals: a lane array read as a
// vector must have been written whole, not in pieces (GCC splits unaligned 256-bit moves for AVX2,
// and a vector load from two half-width stores waits for both to retire). Inputs and outputs are
// read and written in place, except in a group's last, partial block (kTail: buckets [j0, n)),
// which goes through a padded local copy.
#define CM_LANES(L, A) alignas(sizeof(Vec<L, A>)) A

// The L lanes of x from bucket j0 on: x itself, or (kTail) `buf` holding x's lanes before n and
// `pad` after them.
template <int L, bool kTail, typename T>
CM_INLINE const T* lanes_in(const T* x, int64_t j0, int64_t n, T pad, T* buf) {
  if constexpr (kTail) {
    for (int l = 0; l < L; ++l) buf[l] = l < n - j0 ? x[j0 + l] : pad;
    return buf;
  } else {
    return x + j0;
  }
}

// Lanes of v to x from bucket j0 on, as T (kTail: only those before n).
template <int L, bool kTail, typename T, typename A>
CM_INLINE void store_lanes(T* __restrict x, int64_t j0, int64_t n, const A* __restrict v) {
  if constexpr (kTail) {
    for (int l = 0; l < n - j0; ++l) x[j0 + l] = T(v[l]);
  } else {
#pragma omp simd
    for (int l = 0; l < L; ++l) x[j0 + l] = T(v[l]);
  }
}

// The vector v to x (in A) from bucket j0 on (kTail: only the lanes before n).
template <int L, bool kTail, typename A>
CM_INLINE void store_vec(A* x, int64_t j0, int64_t n, const Vec<L, A>& v) {
  if constexpr (kTail) {
    CM_LANES(L, A) y[L];
    from_vec<L, A>(y, v);
    for (int l = 0; l < n - j0; ++l) x[j0 + l] = y[l];
  } else {
    std::memcpy(x + j0, &v, sizeof v);
  }
}

// ---- per-group sweeps --------------------------------------------------------------------------

template <typename A>
CM_INLINE A neg_inf() { return -std::numeric_limits<A>::infinity(); }

// Where a group's whole blocks end: its last, partial block is [full_end, n) (none when equal).
template <int L>
CM_INLINE int64_t full_end(int64_t n) { return n - n % L; }

template <int L, bool kTail, typename T, typename A>
CM_INLINE void max_block(const T* __restrict u, int64_t j0, int64_t n, A inv_tau, A* __restrict mx) {
  T buf[L];
  const T* __restrict x = lanes_in<L, kTail>(u, j0, n, T(neg_inf<A>()), buf);
#pragma omp simd
  for (int l = 0; l < L; ++l) {
    const A v = A(x[l]) * inv_tau;
    mx[l] = mx[l] > v ? mx[l] : v;  // a select, not std::max: a branch would keep the loop scalar
  }
}

// First sweep: the softmax shift m of a group, softmax_shift(max_j u_j / tau).
template <int L, typename T, typename A>
CM_INLINE A group_shift(const T* __restrict u, int64_t n, A inv_tau) {
  CM_LANES(L, A) mx[L];
  for (int l = 0; l < L; ++l) mx[l] = neg_inf<A>();
  const int64_t nf = full_end<L>(n);
  for (int64_t j0 = 0; j0 < nf; j0 += L) max_block<L, false>(u, j0, n, inv_tau, mx);
  if (nf < n) max_block<L, true>(u, nf, n, inv_tau, mx);
  return softmax_shift(lanes_max<L>(mx));
}

// Second sweep, one block: the unnormalised softmax weights exp(u / tau - m) into e (the lanes
// before n) and as a vector (0 in padded lanes).
template <int L, bool kTail, typename T, typename A>
CM_INLINE void exp_block(const T* __restrict u, int64_t j0, int64_t n, A inv_tau, A m, A* __restrict e,
                         Vec<L, A>& ev) {
  T buf[L];
  const T* __restrict x = lanes_in<L, kTail>(u, j0, n, T(neg_inf<A>()), buf);
  CM_LANES(L, A) y[L];
#pragma omp simd
  for (int l = 0; l < L; ++l) y[l] = bucket_exp(A(x[l]), inv_tau, m);
  to_vec<L, A>(ev, y);
  store_vec<L, kTail>(e, j0, n, ev);
}

template <typename T, typename A>
struct FwdArgs {
  const T* u;
  const int64_t* offsets;
  const int64_t* divisors;
  const int64_t* starts;
  T* w;
  T* expected;
  int64_t* keep;
  A inv_tau;
  int64_t mode;
};

// Forward, second sweep, one block: e, and its sums plain and weighted by bucket number + 1 (pos).
template <int L, bool kTail, typename T, typename A>
CM_INLINE void forward_exp_block(const T* __restrict u, int64_t j0, int64_t n, A inv_tau, A m, A* __restrict e,
                                 Vec<L, A>& e_sum, Vec<L, A>& weighted, Vec<L, A>& pos) {
  Vec<L, A> ev;
  exp_block<L, kTail>(u, j0, n, inv_tau, m, e, ev);
  e_sum += ev;
  weighted += ev * pos;  // padded lanes: e = 0
  pos += A(L);
}

// Forward, third sweep, one block (the sweep runs from the group's last block back): w_j =
// (carry + sum_{k >= j in the block} e_k) / s, counted against the threshold and written out; the
// block's e added to carry. kUnit: one channel per bucket (d == 1).
template <int L, bool kTail, bool kUnit, typename T, typename A>
CM_INLINE void forward_scan_block(const A* e, int64_t j0, int64_t n, int64_t d, A inv_s, A mean_w, A& carry, T* w,
                                  int32_t* __restrict above) {
  A buf[L];
  Vec<L, A> run;
  to_vec<L, A>(run, lanes_in<L, kTail>(e, j0, n, A(0), buf));
  block_scan<true, L, A>(run);
  const A block_total = run[0];
  run += carry;
  carry += block_total;
  run *= inv_s;
  const int64_t valid = kTail ? n - j0 : L;
  CM_LANES(L, A) v[L];
  from_vec<L, A>(v, run);
#pragma omp simd
  for (int l = 0; l < L; ++l) above[l] += (kept_by_threshold(v[l], mean_w) & (!kTail || l < valid)) ? 1 : 0;
  if constexpr (kUnit && std::is_same_v<T, A>) {
    store_vec<L, kTail>(w, j0, n, run);
  } else if constexpr (kUnit) {
    store_lanes<L, kTail>(w, j0, n, v);
  } else {
    for (int l = 0; l < valid; ++l) write_bucket_channels(w, j0 + l, d, v[l]);
  }
}

template <int L, bool kUnit, typename T, typename A>
CM_INLINE void forward_scan(const A* e, int64_t n, int64_t d, A inv_s, A mean_w, T* w, int32_t* __restrict above) {
  const int64_t nf = full_end<L>(n);
  A carry = 0;
  if (nf < n) forward_scan_block<L, true, kUnit>(e, nf, n, d, inv_s, mean_w, carry, w, above);
  for (int64_t j0 = nf - L; j0 >= 0; j0 -= L)
    forward_scan_block<L, false, kUnit>(e, j0, n, d, inv_s, mean_w, carry, w, above);
}

// One group's masks. `scratch` holds n values of A (unused when w is fp32/fp64 with one channel
// per bucket: the exponentials then wait in w). s and sum_j w_j come from the second sweep, so the
// third writes w at once: sum_j w_j = sum_j (sum_{k >= j} e_k) / s = sum_k (k + 1) e_k / s.
template <int L, typename T, typename A>
CM_INLINE void masks_group(const FwdArgs<T, A>& a, int64_t g, A* __restrict scratch) {
  const int64_t j_begin = a.offsets[g], n = a.offsets[g + 1] - j_begin, d = a.divisors[g];
  const T* __restrict u = a.u + j_begin;
  T* w = a.w + a.starts[g];
  const A inv_tau = a.inv_tau;
  A* e = std::is_same_v<T, A> && d == 1 ? reinterpret_cast<A*>(w) : scratch;  // w itself when it can
  const A m = group_shift<L>(u, n, inv_tau);
  Vec<L, A> e_sum{}, weighted{}, pos;  // pos: bucket number + 1, per lane
  for (int l = 0; l < L; ++l) pos[l] = A(l + 1);
  const int64_t nf = full_end<L>(n);
  for (int64_t j0 = 0; j0 < nf; j0 += L) forward_exp_block<L, false>(u, j0, n, inv_tau, m, e, e_sum, weighted, pos);
  if (nf < n) forward_exp_block<L, true>(u, nf, n, inv_tau, m, e, e_sum, weighted, pos);
  const A inv_s = A(1) / lanes_sum<L, A>(e_sum);
  const A sum_w = lanes_sum<L, A>(weighted) * inv_s;
  const A mean_w = mean_keep_probability(sum_w, n);
  CM_LANES(L, int32_t) above_lanes[L] = {};
  if (d == 1)
    forward_scan<L, true>(e, n, d, inv_s, mean_w, w, above_lanes);
  else
    forward_scan<L, false>(e, n, d, inv_s, mean_w, w, above_lanes);
  int64_t above = 0;
  for (int l = 0; l < L; ++l) above += above_lanes[l];
  const GroupOut<A> out = finalize_group(sum_w, above, n, d, a.mode);
  a.expected[g] = T(out.expected);
  a.keep[g] = out.keep;
}

template <typename T, typename A>
struct BwdArgs {
  const T* grad_w;
  const T* grad_expected;
  const T* u;
  const int64_t* offsets;
  const int64_t* divisors;
  const int64_t* starts;
  T* grad_u;
  A inv_tau;
};

// Backward, third sweep, one block: gp = carry + the in-block inclusive scan of the bucket
// gradients (into gp), and sum_j e_j gp_j by lanes. kUnit: one channel per bucket, a whole block.
template <int L, bool kTail, bool kUnit, typename T, typename A>
CM_INLINE void backward_scan_block(const T* __restrict gw, const A* __restrict ex, int64_t j0, int64_t n, int64_t d,
                                   A ge, A* gp, A& carry, Vec<L, A>& dot_lanes) {
  static_assert(!(kTail && kUnit), "the tail block runs the general loop");
  CM_LANES(L, A) y[L];
  if constexpr (kUnit) {
#pragma omp simd
    for (int l = 0; l < L; ++l) y[l] = bucket_grad_at(gw, j0 + l, 1, ge);
  } else {
    for (int l = 0; l < L; ++l) y[l] = !kTail || l < n - j0 ? bucket_grad_at(gw, j0 + l, d, ge) : A(0);
  }
  Vec<L, A> c, e;
  to_vec<L, A>(c, y);
  block_scan<false, L, A>(c);
  const A block_total = c[L - 1];
  c += carry;
  carry += block_total;
  A buf[L];
  to_vec<L, A>(e, lanes_in<L, kTail>(ex, j0, n, A(0), buf));
  dot_lanes += e * c;  // padded lanes: e = 0
  store_vec<L, kTail>(gp, j0, n, c);
}

template <int L, bool kUnit, typename T, typename A>
CM_INLINE void backward_scan(const T* __restrict gw, const A* __restrict ex, int64_t n, int64_t d, A ge, A* gp,
                             Vec<L, A>& dot_lanes) {
  const int64_t nf = full_end<L>(n);
  A carry = 0;
  for (int64_t j0 = 0; j0 < nf; j0 += L)
    backward_scan_block<L, false, kUnit>(gw, ex, j0, n, d, ge, gp, carry, dot_lanes);
  if (nf < n) backward_scan_block<L, true, false>(gw, ex, nf, n, d, ge, gp, carry, dot_lanes);
}

// One group's input gradient. `scratch` holds 2 n values of A: the kept exponentials, then (when
// grad_u is not in A) the scanned bucket gradients.
template <int L, typename T, typename A>
CM_INLINE void masks_backward_group(const BwdArgs<T, A>& a, int64_t g, A* __restrict scratch) {
  const int64_t j_begin = a.offsets[g], n = a.offsets[g + 1] - j_begin, d = a.divisors[g];
  const T* __restrict u = a.u + j_begin;
  const T* __restrict gw = a.grad_w + a.starts[g];
  T* gu = a.grad_u + j_begin;
  const A ge = A(a.grad_expected[g]);
  const A inv_tau = a.inv_tau;
  A* __restrict ex = scratch;
  A* gp = std::is_same_v<T, A> ? reinterpret_cast<A*>(gu) : scratch + n;  // grad_u itself when in A
  const A m = group_shift<L>(u, n, inv_tau);
  // e_j and s = sum e; then gp_j = sum_{k <= j} gb_k (gb: bucket gradients) and dot = sum e gp.
  Vec<L, A> s_lanes{}, dot_lanes{}, ev;
  const int64_t nf = full_end<L>(n);
  for (int64_t j0 = 0; j0 < nf; j0 += L) {
    exp_block<L, false>(u, j0, n, inv_tau, m, ex, ev);
    s_lanes += ev;
  }
  if (nf < n) {
    exp_block<L, true>(u, nf, n, inv_tau, m, ex, ev);
    s_lanes += ev;
  }
  if (d == 1)
    backward_scan<L, true>(gw, ex, n, d, ge, gp, dot_lanes);
  else
    backward_scan<L, false>(gw, ex, n, d, ge, gp, dot_lanes);
  const A inv_s = A(1) / lanes_sum<L, A>(s_lanes);
  const A dot = lanes_sum<L, A>(dot_lanes) * inv_s;
  if constexpr (std::is_same_v<T, A>) {  // gp is grad_u: in place
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) gp[j] = softmax_input_grad(ex[j] * inv_s, gp[j], dot, inv_tau);
  } else {
    for (int64_t j = 0; j < n; ++j) gu[j] = T(softmax_input_grad(ex[j] * inv_s, gp[j], dot, inv_tau));
  }
}

// One noinline function per group and ISA, with blocks of one vector of BYTES (the lane loops
// vectorise in it), and the loops over a range of groups that call them.
#define S2H_DEFINE_RANGES(NS, ATTR, BYTES)                                                           \
  namespace NS {                                                                                    \
  template <typename A>                                                                             \
  constexpr int kLanes = BYTES / int(sizeof(A));                                                    \
  template <typename T, typename A>                                                                 \
  ATTR __attribute__((noinline)) void fwd_group(const FwdArgs<T, A>& a, int64_t g, A* scratch) {    \
    masks_group<kLanes<A>, T, A>(a, g, scratch);                                                    \
  }                                                                                                 \
  template <typename T, typename A>                                                                 \
  ATTR __attribute__((noinline)) void bwd_group(const BwdArgs<T, A>& a, int64_t g, A* scratch) {    \
    masks_backward_group<kLanes<A>, T, A>(a, g, scratch);                                           \
  }                                                                                                 \
  template <typename T, typename A>                                                                 \
  void fwd_range(const FwdArgs<T, A>& a, int64_t g0, int64_t g1, A* scratch) {                      \
    for (int64_t g = g0; g < g1; ++g) fwd_group<T, A>(a, g, scratch);                               \
  }                                                                                                 \
  template <typename T, typename A>                                                                 \
  void bwd_range(const BwdArgs<T, A>& a, int64_t g0, int64_t g1, A* scratch) {                      \
    for (int64_t g = g0; g < g1; ++g) bwd_group<T, A>(a, g, scratch);                               \
  }                                                                                                 \
  }
// On other CPUs S2H_TARGET_* are empty and active_isa() is always scalar (16-byte vectors: SSE2,
// NEON).
S2H_DEFINE_RANGES(base, , 16)
#if S2H_X86
S2H_DEFINE_RANGES(avx512, S2H_TARGET_AVX512, 64)
S2H_DEFINE_RANGES(avx2, S2H_TARGET_AVX2, 32)
#endif
#undef S2H_DEFINE_RANGES

template <typename T, typename A>
void fwd_range(cpu::Isa isa, const FwdArgs<T, A>& a, int64_t g0, int64_t g1, A* scratch) {
#if S2H_X86
  if (isa == cpu::Isa::avx512) return avx512::fwd_range<T, A>(a, g0, g1, scratch);
  if (isa == cpu::Isa::avx2) return avx2::fwd_range<T, A>(a, g0, g1, scratch);
#endif
  base::fwd_range<T, A>(a, g0, g1, scratch);
}

template <typename T, typename A>
void bwd_range(cpu::Isa isa, const BwdArgs<T, A>& a, int64_t g0, int64_t g1, A* scratch) {
#if S2H_X86
  if (isa == cpu::Isa::avx512) return avx512::bwd_range<T, A>(a, g0, g1, scratch);
  if (isa == cpu::Isa::avx2) return avx2::bwd_range<T, A>(a, g0, g1, scratch);
#endif
  base::bwd_range<T, A>(a, g0, g1, scratch);
}

int64_t grain_for(int64_t groups, int64_t buckets) {
  return buckets < kParallelBuckets ? groups + 1 : std::max<int64_t>(1, groups * kParallelBuckets / buckets / 4);
}

// Scratch of `count` values of A, uninitialised; none when count is 0.
template <typename A>
std::unique_ptr<A[]> scratch_of(int64_t count) {
  return count > 0 ? std::unique_ptr<A[]>(new A[count]) : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_masks_cpu(const at::Tensor& u_, const at::Tensor& offsets,
                                                                 const at::Tensor& divisors, double temperature,
                                                                 int64_t hard_mode, int64_t num_channels) {
  TORCH_CHECK(temperature > 0, "s2h::channel_masks: temperature must be > 0, got ", temperature);
  TORCH_CHECK(hard_mode == kHardThreshold || hard_mode == kHardExpected,
              "s2h::channel_masks: hard_mode must be 0 (threshold) or 1 (expected), got ", hard_mode);
  const at::Tensor off = offsets.contiguous(), div = divisors.contiguous();
  const Layout layout = check_layout(u_, off, div, num_channels);
  const at::Tensor u = u_.contiguous();
  const int64_t groups = off.numel() - 1;
  at::Tensor w = at::empty({num_channels}, u.options());
  at::Tensor expected = at::empty({groups}, u.options());
  at::Tensor keep = at::empty({groups}, u.options().dtype(at::kLong));
  const cpu::Isa isa = cpu::active_isa();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "channel_masks_cpu", [&] {
    using T = scalar_t;
    using A = at::opmath_type<T>;
    const FwdArgs<T, A> args{u.const_data_ptr<T>(), off.const_data_ptr<int64_t>(), div.const_data_ptr<int64_t>(),
                             layout.starts.data(), w.mutable_data_ptr<T>(), expected.mutable_data_ptr<T>(),
                             keep.mutable_data_ptr<int64_t>(), A(1.0 / temperature), hard_mode};
    // Scratch for the exponentials unless every group keeps them in w (fp32/fp64, one channel per bucket).
    const bool direct = std::is_same_v<T, A> && layout.starts[groups] == u.numel();
    at::parallel_for(0, groups, grain_for(groups, u.numel()), [&](int64_t g0, int64_t g1) {
      const auto scratch = scratch_of<A>(direct ? 0 : layout.max_buckets);
      fwd_range<T, A>(isa, args, g0, g1, scratch.get());
    });
  });
  return {w, expected, keep};
}

at::Tensor channel_masks_backward_cpu(const at::Tensor& grad_w_, const at::Tensor& grad_expected_,
                                      const at::Tensor& u_, const at::Tensor& offsets, const at::Tensor& divisors,
                                      double temperature) {
  const at::Tensor gw = grad_w_.contiguous();
  const at::Tensor off = offsets.contiguous(), div = divisors.contiguous();
  const Layout layout = check_layout(u_, off, div, gw.numel());
  const at::Tensor u = u_.contiguous();
  const at::Tensor ge = grad_expected_.contiguous();
  const int64_t groups = off.numel() - 1;
  TORCH_CHECK(gw.scalar_type() == u.scalar_type() && ge.scalar_type() == u.scalar_type() && ge.numel() == groups,
              "s2h::channel_masks_backward: grad_w and grad_expected must match u's dtype and the group count");
  at::Tensor gu = at::empty_like(u);
  const cpu::Isa isa = cpu::active_isa();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "channel_masks_backward_cpu", [&] {
    using T = scalar_t;
    using A = at::opmath_type<T>;
    const BwdArgs<T, A> args{gw.const_data_ptr<T>(), ge.const_data_ptr<T>(), u.const_data_ptr<T>(),
                             off.const_data_ptr<int64_t>(), div.const_data_ptr<int64_t>(), layout.starts.data(),
                             gu.mutable_data_ptr<T>(), A(1.0 / temperature)};
    at::parallel_for(0, groups, grain_for(groups, u.numel()), [&](int64_t g0, int64_t g1) {
      const auto scratch = scratch_of<A>((std::is_same_v<T, A> ? 1 : 2) * layout.max_buckets);
      bwd_range<T, A>(isa, args, g0, g1, scratch.get());
    });
  });
  return gu;
}

// kMaskTieRtol as compiled (test-only: tests/kernels/test_channel_masks.py checks it equals Python's
// TIE_RTOL, the one definition).
double mask_tie_rtol() { return kMaskTieRtol; }

}  // namespace

TORCH_LIBRARY_IMPL(s2h, CPU, m) {
  m.impl("channel_masks", &channel_masks_cpu);
  m.impl("channel_masks_backward", &channel_masks_backward_cpu);
}

// Test-only (not part of s2h's API, hence not in csrc/ops.cpp); a CompositeExplicitAutograd kernel so
// it runs without tensors.
TORCH_LIBRARY_FRAGMENT(s2h_internal, m) {
  m.def("mask_tie_rtol() -> float", &mask_tie_rtol);
}

}  // namespace s2h
