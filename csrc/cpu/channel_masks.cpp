// Channel masks for all groups in one call, on the CPU (parallel over groups).
// Math: csrc/common/channel_masks.h; reference: s2h_kernels/reference/channel_masks.py.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/channel_masks.h"
#include "common/fast_exp.h"
#include "cpu/cpu_isa.h"

namespace s2h {
namespace {

// Below this many buckets in total a single thread is faster than waking the pool.
constexpr int64_t kParallelBuckets = 32768;

// Checks offsets/divisors against u and returns each group's first channel (length G + 1).
std::vector<int64_t> channel_starts(const at::Tensor& u, const at::Tensor& offsets,
                                    const at::Tensor& divisors, int64_t num_channels) {
  TORCH_CHECK(u.dim() == 1, "s2h::channel_masks: u must be 1-D (all groups packed), got shape ", u.sizes());
  TORCH_CHECK(at::isFloatingType(u.scalar_type()), "s2h::channel_masks: u must be floating point, got ", u.scalar_type());
  TORCH_CHECK(offsets.dim() == 1 && offsets.scalar_type() == at::kLong,
              "s2h::channel_masks: offsets must be a 1-D int64 tensor, got ", offsets.scalar_type(), " of shape ", offsets.sizes());
  TORCH_CHECK(offsets.numel() >= 2, "s2h::channel_masks: offsets needs at least 2 entries (one group), got ", offsets.numel());
  const int64_t groups = offsets.numel() - 1;
  TORCH_CHECK(divisors.dim() == 1 && divisors.scalar_type() == at::kLong && divisors.numel() == groups,
              "s2h::channel_masks: divisors must be a 1-D int64 tensor with one entry per group (", groups, "), got ",
              divisors.scalar_type(), " of shape ", divisors.sizes());
  TORCH_CHECK(offsets.device() == u.device() && divisors.device() == u.device(),
              "s2h::channel_masks: u, offsets and divisors must be on one device, got ", u.device(), ", ",
              offsets.device(), ", ", divisors.device());
  const at::Tensor off = offsets.contiguous(), div = divisors.contiguous();
  const int64_t* o = off.data_ptr<int64_t>();
  const int64_t* d = div.data_ptr<int64_t>();
  TORCH_CHECK(o[0] == 0, "s2h::channel_masks: offsets[0] must be 0, got ", o[0]);
  TORCH_CHECK(o[groups] == u.numel(), "s2h::channel_masks: offsets[-1] (", o[groups],
              ") must equal the number of buckets in u (", u.numel(), ")");
  std::vector<int64_t> starts(groups + 1, 0);
  for (int64_t g = 0; g < groups; ++g) {
    TORCH_CHECK(o[g + 1] > o[g], "s2h::channel_masks: group ", g, " is empty or offsets decrease (offsets[", g,
                "] = ", o[g], ", offsets[", g + 1, "] = ", o[g + 1], ")");
    TORCH_CHECK(d[g] >= 1, "s2h::channel_masks: divisors[", g, "] must be >= 1, got ", d[g]);
    starts[g + 1] = starts[g] + group_channels(o, d, g);
  }
  TORCH_CHECK(starts[groups] == num_channels, "s2h::channel_masks: num_channels (", num_channels,
              ") does not match offsets and divisors (", starts[groups], " channels)");
  return starts;
}

// The per-group passes, written as plain loops the compiler vectorises: `omp simd` reductions
// and scans (OpenMP 5 inscan), a branch-free exp (common/fast_exp.h), and selects instead of
// std::max (a branch on random data mispredicts and keeps the loop scalar). The float versions
// are compiled for AVX-512 and AVX2 as well and picked at run time (below); nothing needs
// -march=native.
template <typename A>
S2H_HD_INLINE A max_scaled_impl(const A* __restrict u, A inv_tau, int64_t n) {
  A mx = -std::numeric_limits<A>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < n; ++j) {
    const A v = u[j] * inv_tau;
    mx = mx > v ? mx : v;
  }
  return mx;
}

// p_j = exp(u_j / tau - m); returns sum_j p_j.
template <typename A>
S2H_HD_INLINE A exp_sum_impl(const A* __restrict u, A inv_tau, A m, A* __restrict p, int64_t n) {
  A sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const A e = bucket_exp(u[j], inv_tau, m);
    p[j] = e;
    sum += e;
  }
  return sum;
}

// w_j = scale * sum_{k>=j} p_k (reverse inclusive scan); returns sum_j w_j.
template <typename A>
S2H_HD_INLINE A reverse_cumsum_impl(const A* __restrict p, A scale, A* __restrict w, int64_t n) {
  A run = 0;
#pragma omp simd reduction(inscan, + : run)
  for (int64_t i = 0; i < n; ++i) {
    run += p[n - 1 - i];
#pragma omp scan inclusive(run)
    w[n - 1 - i] = run * scale;
  }
  A sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) sum += w[j];
  return sum;
}

// gp_j = sum_{k<=j} g_k (inclusive scan, in place); returns sum_j p_j gp_j.
template <typename A>
S2H_HD_INLINE A cumsum_dot_impl(A* __restrict g, const A* __restrict p, int64_t n) {
  A run = 0;
#pragma omp simd reduction(inscan, + : run)
  for (int64_t j = 0; j < n; ++j) {
    run += g[j];
#pragma omp scan inclusive(run)
    g[j] = run;
  }
  A dot = 0;
#pragma omp simd reduction(+ : dot)
  for (int64_t j = 0; j < n; ++j) dot += p[j] * g[j];
  return dot;
}

template <typename A>
S2H_HD_INLINE int64_t count_kept_impl(const A* __restrict w, A mean_w, int64_t n) {
  int64_t above = 0;
#pragma omp simd reduction(+ : above)
  for (int64_t j = 0; j < n; ++j) above += kept_by_threshold(w[j], mean_w) ? 1 : 0;
  return above;
}

// The float passes, compiled once per ISA level (csrc/cpu/cpu_isa.h) and chosen per call by
// active_isa(); double runs the baseline loops.
struct FloatPasses {
  float (*max_scaled)(const float* u, float inv_tau, int64_t n);
  float (*exp_sum)(const float* u, float inv_tau, float m, float* p, int64_t n);
  float (*reverse_cumsum)(const float* p, float scale, float* w, int64_t n);
  float (*cumsum_dot)(float* g, const float* p, int64_t n);
  int64_t (*count_kept)(const float* w, float mean_w, int64_t n);
};

#define S2H_DEFINE_PASSES(NS, ATTR)                                                                      \
  namespace NS {                                                                                        \
  ATTR float max_scaled(const float* u, float inv_tau, int64_t n) { return max_scaled_impl(u, inv_tau, n); } \
  ATTR float exp_sum(const float* u, float inv_tau, float m, float* p, int64_t n) {                     \
    return exp_sum_impl(u, inv_tau, m, p, n);                                                           \
  }                                                                                                     \
  ATTR float reverse_cumsum(const float* p, float scale, float* w, int64_t n) {                         \
    return reverse_cumsum_impl(p, scale, w, n);                                                         \
  }                                                                                                     \
  ATTR float cumsum_dot(float* g, const float* p, int64_t n) { return cumsum_dot_impl(g, p, n); }        \
  ATTR int64_t count_kept(const float* w, float mean_w, int64_t n) { return count_kept_impl(w, mean_w, n); } \
  constexpr FloatPasses passes{max_scaled, exp_sum, reverse_cumsum, cumsum_dot, count_kept};           \
  }
S2H_DEFINE_PASSES(base, )
#if S2H_X86
S2H_DEFINE_PASSES(avx512, S2H_TARGET_AVX512)
S2H_DEFINE_PASSES(avx2, S2H_TARGET_AVX2)
#endif
#undef S2H_DEFINE_PASSES

const FloatPasses& float_passes() {
#if S2H_X86
  switch (cpu::active_isa()) {
    case cpu::Isa::avx512: return avx512::passes;
    case cpu::Isa::avx2: return avx2::passes;
    case cpu::Isa::scalar: break;
  }
#endif
  return base::passes;
}

// The passes for an accumulation type: float through the ISA's table, double the baseline loops.
struct Passes {
  const FloatPasses& f;
  float max_scaled(const float* u, float inv_tau, int64_t n) const { return f.max_scaled(u, inv_tau, n); }
  float exp_sum(const float* u, float inv_tau, float m, float* p, int64_t n) const {
    return f.exp_sum(u, inv_tau, m, p, n);
  }
  float reverse_cumsum(const float* p, float scale, float* w, int64_t n) const { return f.reverse_cumsum(p, scale, w, n); }
  float cumsum_dot(float* g, const float* p, int64_t n) const { return f.cumsum_dot(g, p, n); }
  int64_t count_kept(const float* w, float mean_w, int64_t n) const { return f.count_kept(w, mean_w, n); }
  double max_scaled(const double* u, double inv_tau, int64_t n) const { return max_scaled_impl(u, inv_tau, n); }
  double exp_sum(const double* u, double inv_tau, double m, double* p, int64_t n) const {
    return exp_sum_impl(u, inv_tau, m, p, n);
  }
  double reverse_cumsum(const double* p, double scale, double* w, int64_t n) const {
    return reverse_cumsum_impl(p, scale, w, n);
  }
  double cumsum_dot(double* g, const double* p, int64_t n) const { return cumsum_dot_impl(g, p, n); }
  int64_t count_kept(const double* w, double mean_w, int64_t n) const { return count_kept_impl(w, mean_w, n); }
};

// Per-thread buffers, sized for the largest group seen.
template <typename A>
struct Scratch {
  std::vector<A> x, p, w;
  void reserve(int64_t n) {
    if (int64_t(p.size()) < n) x.resize(n), p.resize(n), w.resize(n);
  }
};

// u in the accumulation type: u itself for fp32/fp64, a converted copy for fp16/bf16.
template <typename scalar_t, typename A>
const A* as_acc(const scalar_t* u, int64_t n, std::vector<A>& buf) {
  if constexpr (std::is_same_v<scalar_t, A>) {
    return u;
  } else {
    for (int64_t j = 0; j < n; ++j) buf[j] = A(u[j]);
    return buf.data();
  }
}

// Unnormalised p = exp(u / tau - max) into sc.p; returns 1 / sum (NaN for a +inf logit).
template <typename A>
A group_exp(const Passes& ps, const A* u, int64_t n, A inv_tau, Scratch<A>& sc) {
  const A mx = softmax_shift(ps.max_scaled(u, inv_tau, n));
  return A(1) / ps.exp_sum(u, inv_tau, mx, sc.p.data(), n);
}

template <typename scalar_t, typename A>
void masks_one_group(const scalar_t* u_, int64_t n, int64_t d, A inv_tau, int64_t mode, scalar_t* w,
                     scalar_t* expected, int64_t* keep, Scratch<A>& sc, const Passes& ps) {
  sc.reserve(n);
  const A* u = as_acc(u_, n, sc.x);
  const A inv_s = group_exp(ps, u, n, inv_tau, sc);
  // Bucket keep probabilities straight into the output when it is one fp32/fp64 channel per bucket.
  const bool direct = std::is_same_v<scalar_t, A> && d == 1;
  A* wb = sc.w.data();
  if constexpr (std::is_same_v<scalar_t, A>) {
    if (direct) wb = w;
  }
  const A sum_w = ps.reverse_cumsum(sc.p.data(), inv_s, wb, n);
  const int64_t above = ps.count_kept(wb, mean_keep_probability(sum_w, n), n);
  if (!direct) {
    for (int64_t j = 0; j < n; ++j) write_bucket_channels(w, j, d, wb[j]);
  }
  const GroupOut<A> out = finalize_group(sum_w, above, n, d, mode);
  *expected = scalar_t(out.expected);
  *keep = out.keep;
}

template <typename scalar_t, typename A>
void masks_backward_one_group(const scalar_t* gw, A ge, const scalar_t* u_, int64_t n, int64_t d, A inv_tau,
                              scalar_t* gu, Scratch<A>& sc, const Passes& ps) {
  sc.reserve(n);
  const A* u = as_acc(u_, n, sc.x);
  const A inv_s = group_exp(ps, u, n, inv_tau, sc);
  A* gp = sc.w.data();  // bucket gradients, then their cumsum: gp_k = sum_{j<=k} gw_j
  if (d == 1) {
    for (int64_t j = 0; j < n; ++j) gp[j] = bucket_grad_at(gw, j, 1, ge);
  } else {
    for (int64_t j = 0; j < n; ++j) gp[j] = bucket_grad_at(gw, j, d, ge);
  }
  const A dot = ps.cumsum_dot(gp, sc.p.data(), n) * inv_s;
  const A* p = sc.p.data();
  for (int64_t j = 0; j < n; ++j) gu[j] = scalar_t(softmax_input_grad(p[j] * inv_s, gp[j], dot, inv_tau));
}

int64_t grain_for(int64_t groups, int64_t buckets) {
  return buckets < kParallelBuckets ? groups + 1 : std::max<int64_t>(1, groups * kParallelBuckets / buckets / 4);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_masks_cpu(const at::Tensor& u_, const at::Tensor& offsets,
                                                                 const at::Tensor& divisors, double temperature,
                                                                 int64_t hard_mode, int64_t num_channels) {
  TORCH_CHECK(temperature > 0, "s2h::channel_masks: temperature must be > 0, got ", temperature);
  TORCH_CHECK(hard_mode == kHardThreshold || hard_mode == kHardExpected,
              "s2h::channel_masks: hard_mode must be 0 (threshold) or 1 (expected), got ", hard_mode);
  const std::vector<int64_t> starts = channel_starts(u_, offsets, divisors, num_channels);
  const at::Tensor u = u_.contiguous(), off = offsets.contiguous(), div = divisors.contiguous();
  const int64_t groups = off.numel() - 1;
  at::Tensor w = at::empty({num_channels}, u.options());
  at::Tensor expected = at::empty({groups}, u.options());
  at::Tensor keep = at::empty({groups}, u.options().dtype(at::kLong));
  const int64_t* o = off.data_ptr<int64_t>();
  const int64_t* d = div.data_ptr<int64_t>();
  int64_t* k = keep.data_ptr<int64_t>();
  const Passes ps{float_passes()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "channel_masks_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* up = u.data_ptr<scalar_t>();
    scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* ep = expected.data_ptr<scalar_t>();
    const acc_t inv_tau = acc_t(1.0 / temperature);
    at::parallel_for(0, groups, grain_for(groups, u.numel()), [&](int64_t begin, int64_t end) {
      Scratch<acc_t> scratch;
      for (int64_t g = begin; g < end; ++g)
        masks_one_group<scalar_t, acc_t>(up + o[g], o[g + 1] - o[g], d[g], inv_tau, hard_mode, wp + starts[g], ep + g,
                                         k + g, scratch, ps);
    });
  });
  return {w, expected, keep};
}

at::Tensor channel_masks_backward_cpu(const at::Tensor& grad_w_, const at::Tensor& grad_expected_,
                                      const at::Tensor& u_, const at::Tensor& offsets, const at::Tensor& divisors,
                                      double temperature) {
  const at::Tensor gw = grad_w_.contiguous();
  const std::vector<int64_t> starts = channel_starts(u_, offsets, divisors, gw.numel());
  const at::Tensor u = u_.contiguous(), off = offsets.contiguous(), div = divisors.contiguous();
  const at::Tensor ge = grad_expected_.contiguous();
  const int64_t groups = off.numel() - 1;
  TORCH_CHECK(gw.scalar_type() == u.scalar_type() && ge.scalar_type() == u.scalar_type() && ge.numel() == groups,
              "s2h::channel_masks_backward: grad_w and grad_expected must match u's dtype and the group count");
  at::Tensor gu = at::empty_like(u);
  const int64_t* o = off.data_ptr<int64_t>();
  const int64_t* d = div.data_ptr<int64_t>();
  const Passes ps{float_passes()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "channel_masks_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* up = u.data_ptr<scalar_t>();
    const scalar_t* gwp = gw.data_ptr<scalar_t>();
    const scalar_t* gep = ge.data_ptr<scalar_t>();
    scalar_t* gup = gu.data_ptr<scalar_t>();
    const acc_t inv_tau = acc_t(1.0 / temperature);
    at::parallel_for(0, groups, grain_for(groups, u.numel()), [&](int64_t begin, int64_t end) {
      Scratch<acc_t> scratch;
      for (int64_t g = begin; g < end; ++g)
        masks_backward_one_group<scalar_t, acc_t>(gwp + starts[g], acc_t(gep[g]), up + o[g], o[g + 1] - o[g], d[g],
                                                  inv_tau, gup + o[g], scratch, ps);
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
