// Channel-mask math shared by csrc/cpu/channel_masks.cpp and csrc/cuda/channel_masks.cu.
// Per group: p = softmax(u / tau); w_j = sum_{k>=j} p_k; E = d * sum_j w_j; k = hard keep count.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/macros.h"

namespace s2h {

// A bucket within this relative distance of the threshold counts as kept, so backends that sum
// in different orders agree on exact ties (s2h_kernels/reference/channel_masks.py: TIE_RTOL).
constexpr float kMaskTieRtol = 1e-5f;

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

}  // namespace s2h
