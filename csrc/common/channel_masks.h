// Channel-mask math shared by csrc/cpu/channel_masks.cpp and csrc/cuda/channel_masks.cu.
// Per group: p = softmax(u / tau); w_j = sum_{k>=j} p_k; E = d * sum_j w_j; k = hard keep count.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/fast_exp.h"
#include "common/macros.h"

namespace s2h {

// A bucket within this relative distance of the threshold counts as kept, so backends that sum
// in different orders agree on exact ties. Defined once in Python (s2h_kernels/reference/
// channel_masks.py: TIE_RTOL); tests/kernels/test_channel_masks.py checks this copy equals it.
// A double, so fp64 kernels use exactly Python's value (fp32 ones round it, as Python's float32 does).
constexpr double kMaskTieRtol = 1e-5;

enum HardMode : int64_t { kHardThreshold = 0, kHardExpected = 1 };

// Is bucket j (keep probability w) above the paper's threshold t = mean(w)?
template <typename acc_t>
S2H_HD bool kept_by_threshold(acc_t w, acc_t mean_w) {
  return w >= mean_w * (acc_t(1) - acc_t(kMaskTieRtol));
}

// Hard keep count in buckets, from sum_j w_j (= E / d) and the number of buckets above mean(w).
// Always in [1, n_buckets]; a NaN in the group gives 1 (the minimum), never a collapsed group.
template <typename acc_t>
S2H_HD int64_t hard_keep_buckets(acc_t sum_w, int64_t n_above, int64_t n_buckets, int64_t mode) {
  int64_t k;
  if (mode == kHardThreshold) {
    k = n_above;
  } else {
    if (!(sum_w == sum_w) || sum_w > acc_t(n_buckets)) {  // NaN, or past the top (inf)
      k = (sum_w == sum_w) ? n_buckets : 1;
    } else {
      k = int64_t(ceil(sum_w - acc_t(kMaskTieRtol)));
    }
  }
  return k < 1 ? 1 : (k > n_buckets ? n_buckets : k);
}

// Gradient of the bucket's keep probability w_j from its channels' gradients and E's:
// w_j feeds d channels and, through E = d * sum_j w_j, the expected width.
template <typename acc_t>
S2H_HD acc_t bucket_grad(acc_t sum_channel_grads, acc_t grad_expected, int64_t divisor) {
  return sum_channel_grads + acc_t(divisor) * grad_expected;
}

// Softmax backward with temperature: du_k = p_k * (gp_k - sum_j p_j gp_j) / tau,
// where gp_k = sum_{j<=k} gw_j is the gradient reaching p_k through the reverse cumsum.
template <typename acc_t>
S2H_HD acc_t softmax_input_grad(acc_t p, acc_t gp, acc_t dot, acc_t inv_tau) {
  return p * (gp - dot) * inv_tau;
}

// ---- per-group pieces both kernels run (csrc/cpu/channel_masks.cpp, csrc/cuda/channel_masks.cu) ----

// Channels of group g: its buckets times its divisor. The CUDA kernel sums these over earlier
// groups to find its first channel; the CPU op builds the prefix once.
S2H_HD_INLINE int64_t group_channels(const int64_t* offsets, const int64_t* divisors, int64_t g) {
  return (offsets[g + 1] - offsets[g]) * divisors[g];
}

// The softmax shift of a group from the maximum of u / tau: a +inf logit gives NaN (the group's
// masks are NaN, its keep count the minimum), not exp(inf - inf).
template <typename acc_t>
S2H_HD_INLINE acc_t softmax_shift(acc_t max_scaled) {
  return max_scaled == acc_t(INFINITY) ? acc_t(NAN) : max_scaled;
}

// The unnormalised softmax weight exp(u_j / tau - m) of bucket j (p_j = this / s).
template <typename acc_t>
S2H_HD_INLINE acc_t bucket_exp(acc_t u, acc_t inv_tau, acc_t m) {
  return kexp(u * inv_tau - m);
}

// The threshold of the "threshold" hard width: mean(w) over the group's n buckets.
template <typename acc_t>
S2H_HD_INLINE acc_t mean_keep_probability(acc_t sum_w, int64_t n) {
  return sum_w / acc_t(n);
}

// Per-group outputs from sum_j w_j and the number of buckets above mean(w).
template <typename acc_t>
struct GroupOut {
  acc_t expected;  // E = d * sum_j w_j, in channels
  int64_t keep;    // hard keep count, in channels
};

template <typename acc_t>
S2H_HD_INLINE GroupOut<acc_t> finalize_group(acc_t sum_w, int64_t n_above, int64_t n_buckets, int64_t divisor,
                                             int64_t mode) {
  return GroupOut<acc_t>{acc_t(divisor) * sum_w, hard_keep_buckets(sum_w, n_above, n_buckets, mode) * divisor};
}

// Bucket j's keep probability written to its d channels.
template <typename scalar_t, typename acc_t>
S2H_HD_INLINE void write_bucket_channels(scalar_t* w, int64_t j, int64_t d, acc_t value) {
  for (int64_t r = 0; r < d; ++r) w[j * d + r] = scalar_t(value);
}

// Gradient reaching bucket j's keep probability: its d channels' gradients and E's.
template <typename scalar_t, typename acc_t>
S2H_HD_INLINE acc_t bucket_grad_at(const scalar_t* grad_w, int64_t j, int64_t d, acc_t grad_expected) {
  acc_t channels = 0;
  for (int64_t r = 0; r < d; ++r) channels += acc_t(grad_w[j * d + r]);
  return bucket_grad(channels, grad_expected, d);
}

}  // namespace s2h
