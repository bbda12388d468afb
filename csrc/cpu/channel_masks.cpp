// Channel masks for all groups in one call, on the CPU (parallel over groups).
// Math: csrc/common/channel_masks.h; reference: s2h_kernels/reference/channel_masks.py.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "common/channel_masks.h"

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
    starts[g + 1] = starts[g] + (o[g + 1] - o[g]) * d[g];
  }
  TORCH_CHECK(starts[groups] == num_channels, "s2h::channel_masks: num_channels (", num_channels,
              ") does not match offsets and divisors (", starts[groups], " channels)");
  return starts;
}

// exp(x - m) for a row, into out, returning the sum. The float version is a Cephes-style
// polynomial (relative error about 1e-7) written branch-free so the compiler vectorises it
// (an AVX2 clone is chosen at run time; -fno-trapping-math lets the selects if-convert); libm's
// expf is a scalar call per element and was most of this op's time. NaN stays NaN, -inf gives 0.
__attribute__((target_clones("avx2", "default")))
float exp_shifted_sum(const float* __restrict x, float m, float* __restrict out, int64_t n) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const float v0 = x[j] - m;
    const float v = v0 > -87.3f ? v0 : -87.3f;
    const float fn = (v * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round(v / ln 2)
    const float r = (v - fn * 0.693359375f) + fn * 2.12194440e-4f;          // v - fn ln 2, two steps
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const float scale = std::bit_cast<float>((int32_t(fn) + 127) << 23);  // 2^fn
    float y = v0 > -87.3f ? p * scale : 0.f;
    y = v0 == v0 ? y : v0;
    out[j] = y;
    sum += y;
  }
  return sum;
}

double exp_shifted_sum(const double* x, double m, double* out, int64_t n) {
  double sum = 0;
  for (int64_t j = 0; j < n; ++j) sum += (out[j] = std::exp(x[j] - m));
  return sum;
}

// p = softmax(u / tau) of one group into p (length n). Returns nothing; NaN propagates.
template <typename scalar_t, typename acc_t>
void group_softmax(const scalar_t* u, int64_t n, acc_t inv_tau, std::vector<acc_t>& x, std::vector<acc_t>& p) {
  x.resize(n);
  p.resize(n);
  acc_t mx = -std::numeric_limits<acc_t>::infinity();
  for (int64_t j = 0; j < n; ++j) {
    x[j] = acc_t(u[j]) * inv_tau;
    mx = std::max(mx, x[j]);
  }
  if (mx == std::numeric_limits<acc_t>::infinity()) mx = std::numeric_limits<acc_t>::quiet_NaN();  // +inf logit
  const acc_t inv_s = acc_t(1) / exp_shifted_sum(x.data(), mx, p.data(), n);
  for (int64_t j = 0; j < n; ++j) p[j] *= inv_s;
}

template <typename acc_t>
struct Scratch {
  std::vector<acc_t> x, p;
};

template <typename scalar_t, typename acc_t>
void masks_one_group(const scalar_t* u, int64_t n, int64_t d, acc_t inv_tau, int64_t mode, scalar_t* w,
                     scalar_t* expected, int64_t* keep, Scratch<acc_t>& sc) {
  group_softmax(u, n, inv_tau, sc.x, sc.p);
  std::vector<acc_t>& wb = sc.x;  // x is no longer needed: reuse it for w
  acc_t run = 0, sum_w = 0;
  for (int64_t j = n - 1; j >= 0; --j) {  // reverse cumsum of p
    run += sc.p[j];
    wb[j] = run;
    sum_w += run;
  }
  const acc_t mean_w = sum_w / acc_t(n);
  int64_t above = 0;
  for (int64_t j = 0; j < n; ++j) above += kept_by_threshold(wb[j], mean_w);
  if (d == 1) {
    for (int64_t j = 0; j < n; ++j) w[j] = scalar_t(wb[j]);
  } else {
    for (int64_t j = 0; j < n; ++j)
      for (int64_t r = 0; r < d; ++r) w[j * d + r] = scalar_t(wb[j]);
  }
  *expected = scalar_t(acc_t(d) * sum_w);
  *keep = hard_keep_buckets(sum_w, above, n, mode) * d;
}

template <typename scalar_t, typename acc_t>
void masks_backward_one_group(const scalar_t* gw, acc_t ge, const scalar_t* u, int64_t n, int64_t d, acc_t inv_tau,
                              scalar_t* gu, Scratch<acc_t>& sc) {
  group_softmax(u, n, inv_tau, sc.x, sc.p);
  std::vector<acc_t>& gp = sc.x;
  acc_t run = 0, dot = 0;
  for (int64_t j = 0; j < n; ++j) {  // cumsum of the bucket gradients: gp_k = sum_{j<=k} gw_j
    acc_t channels = 0;
    for (int64_t r = 0; r < d; ++r) channels += acc_t(gw[j * d + r]);
    run += bucket_grad(channels, ge, d);
    gp[j] = run;
    dot += sc.p[j] * run;
  }
  for (int64_t j = 0; j < n; ++j) gu[j] = scalar_t(softmax_input_grad(sc.p[j], gp[j], dot, inv_tau));
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
                                         k + g, scratch);
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
                                                  inv_tau, gup + o[g], scratch);
    });
  });
  return gu;
}

}  // namespace

TORCH_LIBRARY_IMPL(s2h, CPU, m) {
  m.impl("channel_masks", &channel_masks_cpu);
  m.impl("channel_masks_backward", &channel_masks_backward_cpu);
}

}  // namespace s2h
