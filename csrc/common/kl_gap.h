// Per-element and per-row math of the fused KL gap (docs/DESIGN.md §2) and CA-KLD (§3), shared by
// csrc/cpu/kl_gap.cpp and csrc/cuda/kl_gap.cu: the math the GPU runs is the math the CPU tests check.
//
// Conventions (A is the accumulation type: float for fp32/fp16/bf16 inputs, double for fp64):
// * Logits enter as a = s / T, b = h / T. A row's softmax is kept online as (m, z): m is the running
//   maximum, z = sum_j exp(a_j - m). Other sums ride along, scaled with z when m moves. Each
//   element costs one exp (the "up" branch rescales the old sums instead of the new term).
// * Everything is written in log-softmax form: log p_j = (a_j - m) - log z, in that order (as
//   torch's log_softmax does), so the largest logit gets log p exactly 0 - log z even when |a| is
//   large; m + log z is never formed. A term p_j * f_j is taken as
//   0 when p_j == 0 (a -inf logit or an underflowed probability), so masked classes and softmax
//   underflow never turn into 0 * inf = NaN. NaN inputs are never zeroed: they reach z (exp(NaN)
//   is NaN, and NaN * 0 is NaN), hence the row's lse, loss and gradients.
// * Functions take the state as separate scalars (not a struct) so the CPU kernel can keep one
//   state per SIMD lane in plain arrays that the compiler vectorises.
// * Branch-free: every ?: selects between values (no early returns in the per-element functions),
//   so the loops calling them if-convert and vectorise (csrc/cpu/kl_gap.cpp also turns off GCC's
//   -ftrapping-math, without which selects stay scalar on AVX2 and the x86-64 baseline).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/fast_exp.h"
#include "common/macros.h"

// The CPU kernel's vectorised loops need every call in them inlined (common/macros.h).
#define S2H_KL_HD S2H_HD_INLINE

namespace s2h {
namespace kl {

template <typename A>
S2H_KL_HD A neg_inf() {
  return -static_cast<A>(INFINITY);
}

using s2h::exp_f32;
using s2h::kexp;

S2H_KL_HD float klog(float x) { return logf(x); }
S2H_KL_HD double klog(double x) { return log(x); }
S2H_KL_HD float ksqrt(float x) { return sqrtf(x); }
S2H_KL_HD double ksqrt(double x) { return sqrt(x); }

// e * f with the convention 0 * anything = 0 when e == 0 (a zero probability contributes nothing).
// NaN e stays NaN.
template <typename A>
S2H_KL_HD A pmul(A e, A f) {
  const A prod = e * f;
  return e == A(0) ? A(0) : prod;
}

// ---- online softmax --------------------------------------------------------------------------

// Pushes logit x into (m, z). Returns through `old` the factor the other sums of this stream must
// be multiplied by, and through `e` the weight exp(x - m_new) of x's own terms.
template <typename A>
S2H_KL_HD void push(A& m, A& z, A x, A& old, A& e) {
  const bool up = x > m;  // false for NaN x: it lands in z through e = exp(NaN)
  const bool empty = x == neg_inf<A>();  // -inf after -inf would give exp(NaN)
  const A d_up = m - x, d_down = x - m;
  const A ed = kexp(up ? d_up : d_down);
  old = up ? ed : A(1);
  e = up ? A(1) : (empty ? A(0) : ed);
  m = up ? x : m;
  z = z * old + e;
}

// Merges stream (m2, z2) into (m, z); returns the scale factors of both sides' other sums.
// The factor that brings the sums of a stream kept at maximum m to a common maximum mm >= m
// (0 for an empty stream, whose m is -inf). merge() applies it to two streams; the CPU kernel
// applies it to all its lanes at once.
template <typename A>
S2H_KL_HD A rescale_factor(A m, A mm) {
  const A f = kexp(m - mm);
  return m == neg_inf<A>() ? A(0) : f;
}

template <typename A>
S2H_KL_HD void merge(A& m, A& z, A m2, A z2, A& s1, A& s2) {
  const A mm = m2 > m ? m2 : m;
  s1 = rescale_factor(m, mm);
  s2 = rescale_factor(m2, mm);
  z = z * s1 + z2 * s2;  // NaN * 0 stays NaN
  m = mm;
}

// acc * s1 + acc2 * s2 with 0-scaled sides dropped (their inf terms are underflowed probabilities).
template <typename A>
S2H_KL_HD A rescale_add(A acc, A s1, A acc2, A s2) {
  return pmul(s1, acc) + pmul(s2, acc2);
}

// The log-softmax offset of a row: log p_j = (a_j - m) - lz, lz = log z.
template <typename A>
struct Lse {
  A m, lz;
};

template <typename A>
S2H_KL_HD Lse<A> make_lse(A m, A z) {
  return Lse<A>{m, klog(z)};
}

template <typename A>
S2H_KL_HD A log_softmax(const Lse<A>& l, A x) {
  return (x - l.m) - l.lz;
}

// lse_1 - lse_2 = (m1 - m2) + (lz1 - lz2).
template <typename A>
S2H_KL_HD A lse_diff(const Lse<A>& l1, const Lse<A>& l2) {
  return (l1.m - l2.m) + (l1.lz - l2.lz);
}

// ---- KL gap: d = KL(p || q), p = softmax(s/T) (target, soft), q = softmax(h/T) (hard) ---------
// State: soft stream (ms, zs) with w = sum_j e_j (a_j - b_j); hard stream (mh, zh).
// Then d = w / zs - (lse_s - lse_h).

template <typename A>
S2H_KL_HD void gap_init(A& ms, A& zs, A& w, A& mh, A& zh) {
  ms = neg_inf<A>();
  zs = A(0);
  w = A(0);
  mh = neg_inf<A>();
  zh = A(0);
}

template <typename A>
S2H_KL_HD void gap_push(A& ms, A& zs, A& w, A& mh, A& zh, A a, A b) {
  A old, e;
  push(ms, zs, a, old, e);
  w = pmul(old, w) + pmul(e, a - b);
  push(mh, zh, b, old, e);
}

template <typename A>
S2H_KL_HD void gap_merge(A& ms, A& zs, A& w, A& mh, A& zh, A ms2, A zs2, A w2, A mh2, A zh2) {
  A s1, s2;
  merge(ms, zs, ms2, zs2, s1, s2);
  w = rescale_add(w, s1, w2, s2);
  merge(mh, zh, mh2, zh2, s1, s2);
}

// Row constants for the gradient pass; d is the row's loss.
template <typename A>
struct GapRow {
  Lse<A> ls, lh;
  A d;
};

template <typename A>
S2H_KL_HD GapRow<A> gap_finalize(A ms, A zs, A w, A mh, A zh) {
  GapRow<A> r;
  r.ls = make_lse(ms, zs);
  r.lh = make_lse(mh, zh);
  r.d = w / zs - lse_diff(r.ls, r.lh);
  return r;
}

// Gradients of d at one element, times gscale (= grad_scale / T):
//   dd/dh = (q - p) / T,   dd/ds = p (log p - log q - d) / T.
// The formula itself, from log p, log q and p = exp(log p), q = exp(log q) (the CPU kernel has
// p and q from exponentials it kept from the first pass).
template <typename A>
S2H_KL_HD void gap_grads_pq(A ls, A lh, A p, A q, A d, A gscale, A& gs, A& gh) {
  gh = (q - p) * gscale;
  gs = pmul(p, ls - lh - d) * gscale;
}

// The same, with the row constants as plain scalars (for loops the compiler vectorises).
template <typename A>
S2H_KL_HD void gap_grads(A ms, A lzs, A mh, A lzh, A d, A a, A b, A gscale, A& gs, A& gh) {
  const A ls = (a - ms) - lzs, lh = (b - mh) - lzh;
  gap_grads_pq(ls, lh, kexp(ls), kexp(lh), d, gscale, gs, gh);
}

template <typename A>
S2H_KL_HD void gap_grads(const GapRow<A>& r, A a, A b, A gscale, A& gs, A& gh) {
  gap_grads(r.ls.m, r.ls.lz, r.lh.m, r.lh.lz, r.d, a, b, gscale, gs, gh);
}

// ---- CA-KLD ---------------------------------------------------------------------------------
// Student a, teacher b (both standardised and divided by T, or just divided by T);
// s = softmax(a), t = softmax(b), c = lse_s - lse_t:
//   KLf = KL(t || s) = sum t (b - a) + c,   KLr = KL(s || t) = sum s (a - b) - c,
//   loss = gamma KLf + (1 - gamma) KLr,
//   g_a = dloss/da = gamma (s - t) + (1 - gamma) s (log s - log t - KLr).
// Standardisation y = (z - mu) / (sigma + eps), a = y / T, sigma with Bessel's correction over the
// n finite (non -inf) logits of the row; -inf logits (masked classes) stay -inf and take no part in
// mu and sigma. The chain rule through mu and sigma gives
//   dloss/dz_j = alpha g_a_j - kappa a_j,  alpha = 1 / ((sigma + eps) T),
//   kappa = T G / ((n - 1) sigma),  G = sum_i g_a_i a_i   (kappa = 0 when sigma == 0: the limit),
// using sum_i g_a_i = 0 (both softmax gradients sum to zero). Without standardisation alpha = 1/T,
// kappa = 0. G expands into sums that ride along the online pass:
//   G = gamma (Sas/zs - Sat/zt) + (1 - gamma) (Sab/zs - (c + KLr) Sas/zs),
//   Sas = sum e_s a, Sat = sum e_t a, Sab = sum e_s (a - b) a.

// Welford update over the finite logits of a row (n counts them; NaN and +inf do count).
template <typename A>
S2H_KL_HD void welford_push(A& n, A& mean, A& m2, A z) {
  const bool take = z != neg_inf<A>();
  const A n1 = n + A(1);
  const A delta = z - mean;
  const A mean1 = mean + delta / n1;
  const A m21 = m2 + delta * (z - mean1);
  n = take ? n1 : n;
  mean = take ? mean1 : mean;
  m2 = take ? m21 : m2;
}

// Chan's parallel merge of two Welford states.
template <typename A>
S2H_KL_HD void welford_merge(A& n, A& mean, A& m2, A n2, A mean2, A m22) {
  const A nn = n + n2;
  if (n2 == A(0)) return;
  if (n == A(0)) {
    n = n2;
    mean = mean2;
    m2 = m22;
    return;
  }
  const A delta = mean2 - mean;
  mean = mean + delta * (n2 / nn);
  m2 = m2 + m22 + delta * delta * (n * n2 / nn);
  n = nn;
}

// Many Welford states at once (the CPU kernel's lanes): with N = sum n_l and
// mean = sum n_l mean_l / N, M2 = sum_l [M2_l + n_l (mean_l - mean)^2]. This is its per-lane term.
template <typename A>
S2H_KL_HD A welford_m2_term(A n, A mean, A m2, A total_mean) {
  const A d = mean - total_mean;
  const A term = m2 + n * d * d;
  return n == A(0) ? A(0) : term;
}

// Affine map z -> (z - shift) * alpha of one row, and the n and sigma its chain rule needs.
template <typename A>
struct Affine {
  A shift, alpha, n, sigma;
};

template <typename A>
S2H_KL_HD Affine<A> standardize_affine(A n, A mean, A m2, A inv_t, A eps) {
  Affine<A> f;
  const A nm1 = n - A(1);
  const A denom = n > A(1) ? nm1 : A(1);
  f.sigma = ksqrt(m2 / denom);
  f.shift = mean;
  f.alpha = inv_t / (f.sigma + eps);
  f.n = n;
  return f;
}

template <typename A>
S2H_KL_HD Affine<A> plain_affine(A inv_t) {
  Affine<A> f;
  f.shift = A(0);
  f.alpha = inv_t;
  f.n = A(0);
  f.sigma = A(0);
  return f;
}

template <typename A>
S2H_KL_HD A affine_apply(const Affine<A>& f, A z) {
  return (z - f.shift) * f.alpha;  // -inf stays -inf (alpha > 0)
}

// Online state of both streams. Student: ms, zs, ws = sum e_s (a - b), sas, sab; teacher: mt, zt,
// wt = sum e_t (b - a), sat.
template <typename A>
S2H_KL_HD void cak_init(A& ms, A& zs, A& ws, A& sas, A& sab, A& mt, A& zt, A& wt, A& sat) {
  ms = neg_inf<A>();
  mt = neg_inf<A>();
  zs = ws = sas = sab = zt = wt = sat = A(0);
}

// with_g = false skips the sums only standardisation needs.
template <typename A, bool with_g>
S2H_KL_HD void cak_push(A& ms, A& zs, A& ws, A& sas, A& sab, A& mt, A& zt, A& wt, A& sat, A a, A b) {
  A old, e;
  push(ms, zs, a, old, e);
  const A ab = a - b;
  ws = pmul(old, ws) + pmul(e, ab);
  if (with_g) {
    sas = pmul(old, sas) + pmul(e, a);
    sab = pmul(old, sab) + pmul(e, ab * a);
  }
  push(mt, zt, b, old, e);
  wt = pmul(old, wt) + pmul(e, -ab);
  if (with_g) sat = pmul(old, sat) + pmul(e, a);
}

template <typename A>
S2H_KL_HD void cak_merge(A& ms, A& zs, A& ws, A& sas, A& sab, A& mt, A& zt, A& wt, A& sat, A ms2, A zs2,
                      A ws2, A sas2, A sab2, A mt2, A zt2, A wt2, A sat2) {
  A s1, s2;
  merge(ms, zs, ms2, zs2, s1, s2);
  ws = rescale_add(ws, s1, ws2, s2);
  sas = rescale_add(sas, s1, sas2, s2);
  sab = rescale_add(sab, s1, sab2, s2);
  merge(mt, zt, mt2, zt2, s1, s2);
  wt = rescale_add(wt, s1, wt2, s2);
  sat = rescale_add(sat, s1, sat2, s2);
}

template <typename A>
struct CakRow {
  Lse<A> ls, lt;
  A klr, loss, gamma, alpha, kappa;
};

template <typename A>
S2H_KL_HD CakRow<A> cak_finalize(A ms, A zs, A ws, A sas, A sab, A mt, A zt, A wt, A sat, A gamma,
                              const Affine<A>& f, A inv_t, bool standardize) {
  CakRow<A> r;
  r.ls = make_lse(ms, zs);
  r.lt = make_lse(mt, zt);
  const A c = lse_diff(r.ls, r.lt);
  r.klr = ws / zs - c;
  const A klf = wt / zt + c;
  r.loss = gamma * klf + (A(1) - gamma) * r.klr;
  r.gamma = gamma;
  r.alpha = f.alpha;
  r.kappa = A(0);
  if (standardize && f.sigma > A(0) && f.n > A(1)) {
    const A g = gamma * (sas / zs - sat / zt) + (A(1) - gamma) * (sab / zs - (c + r.klr) * (sas / zs));
    r.kappa = g / (inv_t * (f.n - A(1)) * f.sigma);  // T G / ((n - 1) sigma)
  }
  return r;
}

// Gradient of the row loss with respect to one raw student logit z (a = its mapped value, b the
// mapped teacher logit), times grad_scale.
template <typename A>
S2H_KL_HD A cak_grad(const CakRow<A>& r, A a, A b, A grad_scale) {
  const A ls = log_softmax(r.ls, a), lt = log_softmax(r.lt, b);
  const A s = kexp(ls), t = kexp(lt);
  const A ga = r.gamma * (s - t) + (A(1) - r.gamma) * pmul(s, ls - lt - r.klr);
  const A ka = r.kappa * a;
  const A chain = a == neg_inf<A>() ? A(0) : ka;  // masked logits skip mu and sigma
  return (r.alpha * ga - chain) * grad_scale;
}

}  // namespace kl
}  // namespace s2h

// ---- the GPU kernels' row algorithm, as host/device functions ------------------------------------
// csrc/cuda/kl_gap.cu runs one block of kThreads threads per row: thread t pushes elements
// t, t + kThreads, ... into its own online state (*_push_strided), the block merges the states
// (warp: xor butterfly; then warp 0..W-1 folded in order in every thread: fold_warps), the row is
// finalised, and thread t writes the gradients of the same elements (*_grads_strided). Everything
// but the butterfly's shuffles and the shared-memory hand-off is below, host/device; the CPU
// tests run it through block_row_model (the butterfly replayed on arrays), exposed as the
// s2h_internal::*_block_model ops (csrc/cpu/kl_gap.cpp), for several block sizes.

namespace s2h {
namespace kl {

// State merges over arrays of kN values (the shuffle and shared-memory exchange move arrays).
template <typename A>
struct GapMerge {
  static constexpr int kN = 5;
  S2H_KL_HD static void init(A* v) { gap_init(v[0], v[1], v[2], v[3], v[4]); }
  S2H_KL_HD static void merge(A* v, const A* o) { gap_merge(v[0], v[1], v[2], v[3], v[4], o[0], o[1], o[2], o[3], o[4]); }
};

template <typename A>
struct CakMerge {
  static constexpr int kN = 9;
  S2H_KL_HD static void init(A* v) { cak_init(v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8]); }
  S2H_KL_HD static void merge(A* v, const A* o) {
    cak_merge(v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7],
              o[8]);
  }
};

template <typename A>
struct SoftmaxMerge {  // (m, z) of one stream
  static constexpr int kN = 2;
  S2H_KL_HD static void init(A* v) {
    v[0] = neg_inf<A>();
    v[1] = A(0);
  }
  S2H_KL_HD static void merge(A* v, const A* o) {
    A s1, s2;
    kl::merge(v[0], v[1], o[0], o[1], s1, s2);
  }
};

template <typename A>
struct WelfordMerge {  // two rows' statistics side by side: student (0..2), teacher (3..5)
  static constexpr int kN = 6;
  S2H_KL_HD static void init(A* v) {
    for (int i = 0; i < kN; ++i) v[i] = A(0);
  }
  S2H_KL_HD static void merge(A* v, const A* o) {
    welford_merge(v[0], v[1], v[2], o[0], o[1], o[2]);
    welford_merge(v[3], v[4], v[5], o[3], o[4], o[5]);
  }
};

// The block's second stage: the warps' states (laid out [i * warps + w]) folded in warp order from
// the empty state, so every thread holds the same row state.
template <typename M, typename A>
S2H_KL_HD void fold_warps(A* v, const A* per_warp, int warps) {
  M::init(v);
  for (int w = 0; w < warps; ++w) {
    A o[M::kN];
    for (int i = 0; i < M::kN; ++i) o[i] = per_warp[i * warps + w];
    M::merge(v, o);
  }
}

// Per-thread sweeps over elements t, t + step, ... of a row of C.
template <typename T, typename A>
S2H_KL_HD void gap_push_strided(const T* s, const T* h, int64_t C, int64_t t, int64_t step, A inv_t, A* v) {
  for (int64_t j = t; j < C; j += step)
    gap_push(v[0], v[1], v[2], v[3], v[4], static_cast<A>(s[j]) * inv_t, static_cast<A>(h[j]) * inv_t);
}

template <typename T, typename A>
S2H_KL_HD void gap_grads_strided(const T* s, const T* h, int64_t C, int64_t t, int64_t step, A inv_t, A gscale,
                                 const GapRow<A>& r, T* gs, T* gh) {
  for (int64_t j = t; j < C; j += step) {
    A g1, g2;
    gap_grads(r, static_cast<A>(s[j]) * inv_t, static_cast<A>(h[j]) * inv_t, gscale, g1, g2);
    gs[j] = static_cast<T>(g1);
    gh[j] = static_cast<T>(g2);
  }
}

template <typename T, typename A>
S2H_KL_HD void top1_push_strided(const T* z, int64_t C, int64_t t, int64_t step, A* v) {
  for (int64_t j = t; j < C; j += step) {
    A old, e;
    push(v[0], v[1], static_cast<A>(z[j]), old, e);
  }
}

template <typename T, typename A>
S2H_KL_HD void welford_push_strided(const T* zs, const T* zt, int64_t C, int64_t t, int64_t step, A* st) {
  for (int64_t j = t; j < C; j += step) {
    welford_push(st[0], st[1], st[2], static_cast<A>(zs[j]));
    welford_push(st[3], st[4], st[5], static_cast<A>(zt[j]));
  }
}

template <typename T, typename A, bool kStd>
S2H_KL_HD void cak_push_strided(const T* zs, const T* zt, int64_t C, int64_t t, int64_t step, const Affine<A>& fs,
                                const Affine<A>& ft, A* v) {
  for (int64_t j = t; j < C; j += step) {
    const A a = affine_apply(fs, static_cast<A>(zs[j]));
    const A b = affine_apply(ft, static_cast<A>(zt[j]));
    cak_push<A, kStd>(v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], a, b);
  }
}

template <typename T, typename A>
S2H_KL_HD void cak_grads_strided(const T* zs, const T* zt, int64_t C, int64_t t, int64_t step, const Affine<A>& fs,
                                 const Affine<A>& ft, const CakRow<A>& r, A grad_scale, T* g) {
  for (int64_t j = t; j < C; j += step) {
    const A a = affine_apply(fs, static_cast<A>(zs[j]));
    const A b = affine_apply(ft, static_cast<A>(zt[j]));
    g[j] = static_cast<T>(cak_grad(r, a, b, grad_scale));
  }
}

// The row's two affine maps from the merged Welford state (st: student 0..2, teacher 3..5).
template <typename A>
S2H_KL_HD void affines_from_welford(const A* st, A inv_t, A eps, Affine<A>& fs, Affine<A>& ft) {
  fs = standardize_affine(st[0], st[1], st[2], inv_t, eps);
  ft = standardize_affine(st[3], st[4], st[5], inv_t, eps);
}

// Row finalisations from merged arrays.
template <typename A>
S2H_KL_HD GapRow<A> gap_finalize(const A* v) {
  return gap_finalize(v[0], v[1], v[2], v[3], v[4]);
}

template <typename A>
S2H_KL_HD CakRow<A> cak_finalize(const A* v, A gamma, const Affine<A>& fs, A inv_t, bool standardize) {
  return cak_finalize(v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], gamma, fs, inv_t, standardize);
}

template <typename A>
S2H_KL_HD A top1_finalize(const A* v) {
  return A(1) / v[1];
}

// Host model of the block merge (the CPU tests' stand-in for the shuffles): states[t * kN + i] of
// `threads` threads (a multiple of 32); each warp's xor butterfly (offsets 16, 8, 4, 2, 1: lane l
// merges lane l ^ off's state into its own, all lanes at once), lane 0 of each warp hands its
// state over, then fold_warps (also for a single warp, so that every thread of the block holds the
// same state). The result in `out`.
template <typename M, typename A>
inline void block_merge_model(A* states, int threads, A* out) {
  constexpr int kN = M::kN;
  const int warps = threads / 32;
  A* next = new A[static_cast<size_t>(threads) * kN];
  for (int off = 16; off > 0; off >>= 1) {
    for (int t = 0; t < threads; ++t) {
      const int u = (t & ~31) | ((t & 31) ^ off);
      for (int i = 0; i < kN; ++i) next[t * kN + i] = states[t * kN + i];
      M::merge(next + t * kN, states + u * kN);
    }
    for (int x = 0; x < threads * kN; ++x) states[x] = next[x];
  }
  for (int w = 0; w < warps; ++w)
    for (int i = 0; i < kN; ++i) next[i * warps + w] = states[(w * 32) * kN + i];
  fold_warps<M>(out, next, warps);  // one warp too: every thread then holds lane 0's state
  delete[] next;
}

}  // namespace kl
}  // namespace s2h
