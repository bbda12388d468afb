// CPU kernels of s2h::kl_gap and s2h::ca_kld (math in csrc/common/kl_gap.h, docs/DESIGN.md §2 and §3).
//
// OpenMP over rows (at::parallel_for, which runs on torch's OpenMP pool); vectorised loops within.
// * kl_gap: a chunked online softmax (kChunk classes at a time, running maximum and rescaled sums);
//   the exponentials wait in the gradient buffers for the gradient pass, so each class costs two
//   exponentials. Rows of at most kSmallC classes go 16 at a time, one per SIMD lane.
// * ca_kld: kL lanes per row, each with its own online state (one exp per stream and element,
//   kl_gap.h push), merged at the end of the row; a second sweep writes the gradient.
// Nothing of size B x C is allocated beyond the outputs (16-bit inputs: a float scratch of 2 C per
// thread).
//
// No -march=native: on x86-64 the row loops are compiled three times, for AVX-512, AVX2+FMA and
// the baseline, through per-function target attributes, and chosen at run time by the CPU-ISA
// layer (csrc/cpu/cpu_isa.h; S2H_CPU_ISA=avx2|scalar forces a lower one). Other CPUs: the
// baseline loops only.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

// FP exception flags are no part of these kernels' contract. Without -ftrapping-math GCC may
// if-convert the branch-free selects of kl_gap.h into blends on AVX2 and SSE2 too (with it, only
// AVX-512's masked instructions vectorise them). IEEE results, NaN and inf handling are unchanged.
#pragma GCC optimize("no-trapping-math")

#include "common/kl_gap.h"
#include "common/kl_gap_checks.h"
#include "cpu/cpu_isa.h"

namespace {

namespace k = s2h::kl;

#define KL_INLINE inline __attribute__((always_inline))

constexpr int kL = 16;  // lanes of online state per row

// ---- row kernels ----------------------------------------------------------------------------
// ca_kld, its standardisation and its top-1 probabilities (kl_gap's rows follow further down):
// a row is swept in blocks of kL elements, lane l taking element l of every block; the last,
// partial block is copied into a buffer padded with -inf, which changes no online state (it has
// zero probability) and which Welford skips, so it runs through the same vector body. Then all
// lanes merge at once: the row maximum, each lane's sums rescaled to it, and summed.

template <typename T>
KL_INLINE void pad_tail(const T* __restrict x, int64_t n, T* __restrict out) {
  for (int l = 0; l < kL; ++l) out[l] = l < n ? x[l] : static_cast<T>(-INFINITY);
}

template <typename A>
KL_INLINE A lanes_max(const A* m) {
  A mm = k::neg_inf<A>();
#pragma omp simd reduction(max : mm)
  for (int l = 0; l < kL; ++l) mm = m[l] > mm ? m[l] : mm;
  return mm;
}

// KL gap rows, chunked online softmax: per chunk of kChunk classes (in L1), the chunk maximum, then
// exp(x - chunk max) kept in the gradient buffers (or a float scratch for 16-bit types) with the
// chunk's sums, merged into the row's running state (kl_gap.h merge). The gradient pass turns the
// kept exponentials into p and q with one factor per chunk: two exponentials per class in all.
constexpr int64_t kChunk = 1024;

int64_t num_chunks(int64_t C) { return (C + kChunk - 1) / kChunk; }

template <typename T, typename A>
KL_INLINE void gap_row(const T* __restrict s, const T* __restrict h, int64_t C, A inv_t, A gscale, T* gs,
                       T* gh, A* loss, A* scratch) {
  // e buffers: the outputs themselves when they hold A, else the scratch; chunk maxima after them.
  constexpr bool kInPlace = std::is_same_v<T, A>;
  A* const es = kInPlace ? reinterpret_cast<A*>(gs) : scratch;
  A* const eh = kInPlace ? reinterpret_cast<A*>(gh) : scratch + C;
  A* const cmax = kInPlace ? scratch : scratch + 2 * C;
  // Each chunk: nf elements in whole vectors, then a tail of n - nf < kL elements copied into
  // buffers padded with -inf (zero probability: no effect on maxima or sums), so no loop ends in
  // scalar iterations of the exponential.
  T sp[kL], hp[kL];
  A ep1[kL], ep2[kL];
  A Ms = k::neg_inf<A>(), Zs = 0, W = 0, Mh = k::neg_inf<A>(), Zh = 0;
  for (int64_t c0 = 0, ci = 0; c0 < C; c0 += kChunk, ++ci) {
    const int64_t n = C - c0 < kChunk ? C - c0 : kChunk;
    const int64_t nf = n - n % kL;
    const T* __restrict sc = s + c0;
    const T* __restrict hc = h + c0;
    if (nf < n) {
      pad_tail(sc + nf, n - nf, sp);
      pad_tail(hc + nf, n - nf, hp);
    }
    A ms = k::neg_inf<A>(), mh = k::neg_inf<A>();
#pragma omp simd reduction(max : ms, mh)
    for (int64_t i = 0; i < nf; ++i) {  // NaN is skipped here; it reaches the sums through exp(NaN)
      const A a = static_cast<A>(sc[i]) * inv_t, b = static_cast<A>(hc[i]) * inv_t;
      ms = a > ms ? a : ms;
      mh = b > mh ? b : mh;
    }
    if (nf < n) {
#pragma omp simd reduction(max : ms, mh)
      for (int l = 0; l < kL; ++l) {
        const A a = static_cast<A>(sp[l]) * inv_t, b = static_cast<A>(hp[l]) * inv_t;
        ms = a > ms ? a : ms;
        mh = b > mh ? b : mh;
      }
    }
    // A chunk of -inf only: shift by 0, every exponential is exp(-inf) = 0.
    const A shs = ms == k::neg_inf<A>() ? A(0) : ms, shh = mh == k::neg_inf<A>() ? A(0) : mh;
    A zs = 0, zh = 0, w = 0;
#pragma omp simd reduction(+ : zs, zh, w)
    for (int64_t i = 0; i < nf; ++i) {
      const A a = static_cast<A>(sc[i]) * inv_t, b = static_cast<A>(hc[i]) * inv_t;
      const A e1 = k::kexp(a - shs), e2 = k::kexp(b - shh);
      es[c0 + i] = e1;
      eh[c0 + i] = e2;
      zs += e1;
      zh += e2;
      w += k::pmul(e1, a - b);
    }
    if (nf < n) {
#pragma omp simd reduction(+ : zs, zh, w)
      for (int l = 0; l < kL; ++l) {
        const A a = static_cast<A>(sp[l]) * inv_t, b = static_cast<A>(hp[l]) * inv_t;
        const A e1 = k::kexp(a - shs), e2 = k::kexp(b - shh);
        ep1[l] = e1;
        ep2[l] = e2;
        zs += e1;
        zh += e2;
        w += k::pmul(e1, a - b);
      }
      for (int64_t l = 0; l < n - nf; ++l) {
        es[c0 + nf + l] = ep1[l];
        eh[c0 + nf + l] = ep2[l];
      }
    }
    if (ci == 0) {  // what merging into the empty state gives, without its exponentials
      Ms = ms, Zs = zs, W = w, Mh = mh, Zh = zh;
    } else {
      A f1, f2;
      k::merge(Ms, Zs, ms, zs, f1, f2);
      W = k::rescale_add(W, f1, w, f2);
      k::merge(Mh, Zh, mh, zh, f1, f2);
    }
    cmax[2 * ci] = ms;
    cmax[2 * ci + 1] = mh;
  }
  const k::GapRow<A> r = k::gap_finalize(Ms, Zs, W, Mh, Zh);
  *loss = r.d;
  for (int64_t c0 = 0, ci = 0; c0 < C; c0 += kChunk, ++ci) {
    const int64_t n = C - c0 < kChunk ? C - c0 : kChunk;
    const int64_t nf = n - n % kL;
    // p = e * exp(chunk max - row max) / Zs; the chunk holding the row maximum needs no exp.
    const A cs = cmax[2 * ci], ch = cmax[2 * ci + 1];
    const A fs = (cs == Ms ? A(1) : k::rescale_factor(cs, Ms)) / Zs;
    const A fh = (ch == Mh ? A(1) : k::rescale_factor(ch, Mh)) / Zh;
#pragma omp simd
    for (int64_t i = c0; i < c0 + nf; ++i) {
      const A a = static_cast<A>(s[i]) * inv_t, b = static_cast<A>(h[i]) * inv_t;
      A g1, g2;
      k::gap_grads_pq(k::log_softmax(r.ls, a), k::log_softmax(r.lh, b), es[i] * fs, eh[i] * fh, r.d, gscale, g1, g2);
      gs[i] = static_cast<T>(g1);
      gh[i] = static_cast<T>(g2);
    }
    if (nf < n) {
      const int64_t t0 = c0 + nf, nt = n - nf;
      pad_tail(s + t0, nt, sp);
      pad_tail(h + t0, nt, hp);
      for (int l = 0; l < kL; ++l) {  // the kept exponentials of the tail; 0 (probability 0) beyond it
        ep1[l] = l < nt ? es[t0 + l] : A(0);
        ep2[l] = l < nt ? eh[t0 + l] : A(0);
      }
      T g1p[kL], g2p[kL];
#pragma omp simd
      for (int l = 0; l < kL; ++l) {
        const A a = static_cast<A>(sp[l]) * inv_t, b = static_cast<A>(hp[l]) * inv_t;
        A g1, g2;
        k::gap_grads_pq(k::log_softmax(r.ls, a), k::log_softmax(r.lh, b), ep1[l] * fs, ep2[l] * fh, r.d, gscale,
                        g1, g2);
        g1p[l] = static_cast<T>(g1);
        g2p[l] = static_cast<T>(g2);
      }
      for (int64_t l = 0; l < nt; ++l) {
        gs[t0 + l] = g1p[l];
        gh[t0 + l] = g2p[l];
      }
    }
  }
}

// Per task: the chunk maxima, and the kept exponentials when the outputs are 16-bit.
template <typename T, typename A>
int64_t gap_scratch_size(int64_t C) {
  return 2 * num_chunks(C) + (std::is_same_v<T, A> ? 0 : 2 * C);
}

// Short rows (C <= kSmallC): kL rows at once, lane l owning row l from start to end (strided
// loads), so no lanes merge and nothing is padded; the same push/finalize/grads math.
constexpr int64_t kSmallC = 32;

template <typename T, typename A>
KL_INLINE void gap_rows16(const T* __restrict s, const T* __restrict h, int64_t C, A inv_t, A gscale,
                          T* __restrict gs, T* __restrict gh, A* __restrict loss) {
  A ms[kL], zs[kL], w[kL], mh[kL], zh[kL];
  for (int l = 0; l < kL; ++l) k::gap_init(ms[l], zs[l], w[l], mh[l], zh[l]);
  for (int64_t j = 0; j < C; ++j) {
#pragma omp simd
    for (int l = 0; l < kL; ++l)
      k::gap_push(ms[l], zs[l], w[l], mh[l], zh[l], static_cast<A>(s[l * C + j]) * inv_t,
                  static_cast<A>(h[l * C + j]) * inv_t);
  }
  A lzs[kL], lzh[kL], d[kL];
  for (int l = 0; l < kL; ++l) {
    const k::GapRow<A> r = k::gap_finalize(ms[l], zs[l], w[l], mh[l], zh[l]);
    lzs[l] = r.ls.lz;
    lzh[l] = r.lh.lz;
    d[l] = r.d;
    loss[l] = r.d;
  }
  for (int64_t j = 0; j < C; ++j) {
    T g1[kL], g2[kL];
#pragma omp simd
    for (int l = 0; l < kL; ++l) {
      A x1, x2;
      k::gap_grads(ms[l], lzs[l], mh[l], lzh[l], d[l], static_cast<A>(s[l * C + j]) * inv_t,
                   static_cast<A>(h[l * C + j]) * inv_t, gscale, x1, x2);
      g1[l] = static_cast<T>(x1);
      g2[l] = static_cast<T>(x2);
    }
    for (int l = 0; l < kL; ++l) {
      gs[l * C + j] = g1[l];
      gh[l * C + j] = g2[l];
    }
  }
}

// Welford statistics of one row -> its affine map (standardise, then divide by T).
template <typename T, typename A>
KL_INLINE k::Affine<A> standardize_row(const T* __restrict z, int64_t C, A inv_t, A eps) {
  A n[kL], mean[kL], m2[kL];
  for (int l = 0; l < kL; ++l) n[l] = mean[l] = m2[l] = A(0);
  const int64_t full = C - C % kL;
  for (int64_t j = 0; j < full; j += kL) {
#pragma omp simd
    for (int l = 0; l < kL; ++l) k::welford_push(n[l], mean[l], m2[l], static_cast<A>(z[j + l]));
  }
  if (full < C) {
    T zp[kL];
    pad_tail(z + full, C - full, zp);
#pragma omp simd
    for (int l = 0; l < kL; ++l) k::welford_push(n[l], mean[l], m2[l], static_cast<A>(zp[l]));
  }
  A N = 0, S = 0;
#pragma omp simd reduction(+ : N, S)
  for (int l = 0; l < kL; ++l) {
    N += n[l];
    S += n[l] == A(0) ? A(0) : n[l] * mean[l];
  }
  const A Mean = N > A(0) ? S / N : A(0);
  A M2 = 0;
#pragma omp simd reduction(+ : M2)
  for (int l = 0; l < kL; ++l) M2 += k::welford_m2_term(n[l], mean[l], m2[l], Mean);
  return k::standardize_affine(N, Mean, M2, inv_t, eps);
}

template <typename T, typename A, bool kStd>
KL_INLINE void cak_row(const T* __restrict zs_in, const T* __restrict zt_in, int64_t C, A inv_t, A eps,
                       A gamma, A grad_scale, T* __restrict g, A* loss) {
  const k::Affine<A> fs = kStd ? standardize_row<T, A>(zs_in, C, inv_t, eps) : k::plain_affine(inv_t);
  const k::Affine<A> ft = kStd ? standardize_row<T, A>(zt_in, C, inv_t, eps) : k::plain_affine(inv_t);
  A ms[kL], zs[kL], ws[kL], sas[kL], sab[kL], mt[kL], zt[kL], wt[kL], sat[kL];
  for (int l = 0; l < kL; ++l) k::cak_init(ms[l], zs[l], ws[l], sas[l], sab[l], mt[l], zt[l], wt[l], sat[l]);
  const int64_t full = C - C % kL;
  for (int64_t j = 0; j < full; j += kL) {
#pragma omp simd
    for (int l = 0; l < kL; ++l) {
      const A a = k::affine_apply(fs, static_cast<A>(zs_in[j + l]));
      const A b = k::affine_apply(ft, static_cast<A>(zt_in[j + l]));
      k::cak_push<A, kStd>(ms[l], zs[l], ws[l], sas[l], sab[l], mt[l], zt[l], wt[l], sat[l], a, b);
    }
  }
  T sp[kL], tp[kL];
  if (full < C) {
    pad_tail(zs_in + full, C - full, sp);
    pad_tail(zt_in + full, C - full, tp);
#pragma omp simd
    for (int l = 0; l < kL; ++l) {
      const A a = k::affine_apply(fs, static_cast<A>(sp[l]));
      const A b = k::affine_apply(ft, static_cast<A>(tp[l]));
      k::cak_push<A, kStd>(ms[l], zs[l], ws[l], sas[l], sab[l], mt[l], zt[l], wt[l], sat[l], a, b);
    }
  }
  const A Ms = lanes_max(ms), Mt = lanes_max(mt);
  A Zs = 0, Ws = 0, Sas = 0, Sab = 0, Zt = 0, Wt = 0, Sat = 0;
#pragma omp simd reduction(+ : Zs, Ws, Sas, Sab, Zt, Wt, Sat)
  for (int l = 0; l < kL; ++l) {
    const A f1 = k::rescale_factor(ms[l], Ms), f2 = k::rescale_factor(mt[l], Mt);
    Zs += zs[l] * f1;
    Ws += k::pmul(f1, ws[l]);
    Sas += k::pmul(f1, sas[l]);
    Sab += k::pmul(f1, sab[l]);
    Zt += zt[l] * f2;
    Wt += k::pmul(f2, wt[l]);
    Sat += k::pmul(f2, sat[l]);
  }
  const k::CakRow<A> r = k::cak_finalize(Ms, Zs, Ws, Sas, Sab, Mt, Zt, Wt, Sat, gamma, fs, inv_t, kStd);
  *loss = r.loss;
#pragma omp simd
  for (int64_t i = 0; i < full; ++i) {
    const A a = k::affine_apply(fs, static_cast<A>(zs_in[i]));
    const A b = k::affine_apply(ft, static_cast<A>(zt_in[i]));
    g[i] = static_cast<T>(k::cak_grad(r, a, b, grad_scale));
  }
  if (full < C) {
    T gp[kL];
#pragma omp simd
    for (int l = 0; l < kL; ++l) {
      const A a = k::affine_apply(fs, static_cast<A>(sp[l]));
      const A b = k::affine_apply(ft, static_cast<A>(tp[l]));
      gp[l] = static_cast<T>(k::cak_grad(r, a, b, grad_scale));
    }
    for (int64_t l = 0; l < C - full; ++l) g[full + l] = gp[l];
  }
}

// Top-1 probability of softmax(z) (T = 1, raw logits): 1 / sum_j exp(z_j - max z).
template <typename T, typename A>
KL_INLINE A top1_row(const T* __restrict z, int64_t C) {
  A m[kL], zz[kL];
  for (int l = 0; l < kL; ++l) {
    m[l] = k::neg_inf<A>();
    zz[l] = A(0);
  }
  const int64_t full = C - C % kL;
  for (int64_t j = 0; j < full; j += kL) {
#pragma omp simd
    for (int l = 0; l < kL; ++l) {
      A old, e;
      k::push(m[l], zz[l], static_cast<A>(z[j + l]), old, e);
    }
  }
  if (full < C) {
    T zp[kL];
    pad_tail(z + full, C - full, zp);
#pragma omp simd
    for (int l = 0; l < kL; ++l) {
      A old, e;
      k::push(m[l], zz[l], static_cast<A>(zp[l]), old, e);
    }
  }
  const A M = lanes_max(m);
  A Z = 0;
#pragma omp simd reduction(+ : Z)
  for (int l = 0; l < kL; ++l) Z += zz[l] * k::rescale_factor(m[l], M);
  return A(1) / Z;
}

// ---- row ranges, one instantiation per ISA -------------------------------------------------------

template <typename T, typename A>
struct GapArgs {
  const T* s;
  const T* h;
  T* gs;
  T* gh;
  A* loss;
  int64_t C;
  A inv_t, gscale;
};

template <typename T, typename A>
struct CakArgs {
  const T* zs;
  const T* zt;
  T* g;
  A* loss;
  int64_t C;
  A inv_t, eps, gamma, grad_scale;
  bool standardize;
};

// One noinline function per row and ISA: inlined into a loop over rows, GCC stops vectorising the
// lane loops ("control flow in loop"); as a function of its own, each row's loops vectorise.
#define KL_DEFINE_RANGES(SUFFIX, ATTR)                                                              \
  template <typename T, typename A>                                                                 \
  ATTR __attribute__((noinline)) void gap_row_##SUFFIX(const GapArgs<T, A>& p, int64_t r, A* scratch) { \
    gap_row<T, A>(p.s + r * p.C, p.h + r * p.C, p.C, p.inv_t, p.gscale, p.gs + r * p.C,             \
                  p.gh + r * p.C, p.loss + r, scratch);                                             \
  }                                                                                                 \
  template <typename T, typename A>                                                                 \
  ATTR __attribute__((noinline)) void cak_row_##SUFFIX(const CakArgs<T, A>& p, int64_t r) {         \
    if (p.standardize)                                                                              \
      cak_row<T, A, true>(p.zs + r * p.C, p.zt + r * p.C, p.C, p.inv_t, p.eps, p.gamma, p.grad_scale, \
                          p.g + r * p.C, p.loss + r);                                               \
    else                                                                                            \
      cak_row<T, A, false>(p.zs + r * p.C, p.zt + r * p.C, p.C, p.inv_t, p.eps, p.gamma,            \
                           p.grad_scale, p.g + r * p.C, p.loss + r);                                \
  }                                                                                                 \
  template <typename T, typename A>                                                                 \
  ATTR __attribute__((noinline)) A top1_row_##SUFFIX(const T* z, int64_t C) {                       \
    return top1_row<T, A>(z, C);                                                                    \
  }                                                                                                 \
  template <typename T, typename A>                                                                 \
  ATTR __attribute__((noinline)) void gap_rows16_##SUFFIX(const GapArgs<T, A>& p, int64_t r) {      \
    gap_rows16<T, A>(p.s + r * p.C, p.h + r * p.C, p.C, p.inv_t, p.gscale, p.gs + r * p.C,          \
                     p.gh + r * p.C, p.loss + r);                                                   \
  }                                                                                                 \
  template <typename T, typename A>                                                                 \
  void gap_rows_##SUFFIX(const GapArgs<T, A>& p, int64_t r0, int64_t r1) {                          \
    int64_t r = r0;                                                                                 \
    if (p.C <= kSmallC)                                                                             \
      for (; r + kL <= r1; r += kL) gap_rows16_##SUFFIX<T, A>(p, r);                                \
    if (r == r1) return;                                                                            \
    std::vector<A> scratch(gap_scratch_size<T, A>(p.C));                                            \
    for (; r < r1; ++r) gap_row_##SUFFIX<T, A>(p, r, scratch.data());                               \
  }                                                                                                 \
  template <typename T, typename A>                                                                 \
  void cak_rows_##SUFFIX(const CakArgs<T, A>& p, int64_t r0, int64_t r1) {                          \
    for (int64_t r = r0; r < r1; ++r) cak_row_##SUFFIX<T, A>(p, r);                                 \
  }                                                                                                 \
  template <typename T, typename A>                                                                 \
  void top1_rows_##SUFFIX(const T* z, int64_t C, A* out, int64_t r0, int64_t r1) {                  \
    for (int64_t r = r0; r < r1; ++r) out[r] = top1_row_##SUFFIX<T, A>(z + r * C, C);               \
  }

// On other CPUs S2H_TARGET_* are empty and active_isa() is always scalar: the same portable loops
// three times keep the dispatch one piece.
KL_DEFINE_RANGES(base, )
KL_DEFINE_RANGES(avx512, S2H_TARGET_AVX512)
KL_DEFINE_RANGES(avx2, S2H_TARGET_AVX2)

using s2h::cpu::Isa;

// Rows per parallel task: about 32k elements each, at least one row.
int64_t grain_rows(int64_t C) {
  const int64_t g = 32768 / (C > 0 ? C : 1);
  return g > 0 ? g : 1;
}

// ---- input checks --------------------------------------------------------------------------

void check_pair(const char* op, const char* n1, const at::Tensor& x, const char* n2, const at::Tensor& y) {
  TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu(), op, ": ", n1, " and ", n2,
              " must both be CPU tensors here, got ", x.device(), " and ", y.device());
  k::check_pair_layout(op, n1, x, n2, y);
}

using k::acc_type;
using k::check_temperature;
using k::ca_kld_outputs;
using k::check_ca_kld_scalars;

// ---- ops -----------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_gap_cpu(const at::Tensor& soft, const at::Tensor& hard,
                                                         double temperature, double grad_scale) {
  constexpr const char* op = "s2h::kl_gap";
  check_pair(op, "soft", soft, "hard", hard);
  check_temperature(op, temperature);
  const at::Tensor s = soft.contiguous(), h = hard.contiguous();
  const int64_t B = s.size(0), C = s.size(1);
  at::Tensor loss = at::empty({B}, s.options().dtype(acc_type(s.scalar_type())));
  at::Tensor gs = at::empty({B, C}, s.options());
  at::Tensor gh = at::empty({B, C}, s.options());
  const Isa isa = s2h::cpu::active_isa();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "s2h::kl_gap", [&] {
    using T = scalar_t;
    using A = at::opmath_type<T>;
    const GapArgs<T, A> p{s.const_data_ptr<T>(), h.const_data_ptr<T>(), gs.mutable_data_ptr<T>(),
                          gh.mutable_data_ptr<T>(), loss.mutable_data_ptr<A>(), C, A(1.0 / temperature),
                          A(grad_scale / temperature)};
    at::parallel_for(0, B, grain_rows(C), [&](int64_t r0, int64_t r1) {
      if (isa == Isa::avx512) gap_rows_avx512<T, A>(p, r0, r1);
      else if (isa == Isa::avx2) gap_rows_avx2<T, A>(p, r0, r1);
      else gap_rows_base<T, A>(p, r0, r1);
    });
  });
  return {loss, gs, gh};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ca_kld_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                         double temperature, std::optional<double> gamma,
                                                         bool standardize, double eps, double grad_scale) {
  constexpr const char* op = "s2h::ca_kld";
  check_pair(op, "student", student, "teacher", teacher);
  check_ca_kld_scalars(op, temperature, gamma, eps);
  const at::Tensor zs = student.contiguous(), zt = teacher.contiguous();
  const int64_t B = zs.size(0), C = zs.size(1);
  at::Tensor loss, g, gamma_out;
  std::tie(loss, g, gamma_out) = ca_kld_outputs(zs);
  const Isa isa = s2h::cpu::active_isa();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, zs.scalar_type(), "s2h::ca_kld", [&] {
    using T = scalar_t;
    using A = at::opmath_type<T>;
    const T* zt_ptr = zt.const_data_ptr<T>();
    A gam;
    if (gamma.has_value()) {
      gam = A(*gamma);
    } else {  // the teacher's mean top-1 probability (raw logits, T = 1) over the batch
      std::vector<A> top1(B);
      at::parallel_for(0, B, grain_rows(C), [&](int64_t r0, int64_t r1) {
        if (isa == Isa::avx512) top1_rows_avx512<T, A>(zt_ptr, C, top1.data(), r0, r1);
        else if (isa == Isa::avx2) top1_rows_avx2<T, A>(zt_ptr, C, top1.data(), r0, r1);
        else top1_rows_base<T, A>(zt_ptr, C, top1.data(), r0, r1);
      });
      double sum = 0;
      for (int64_t r = 0; r < B; ++r) sum += static_cast<double>(top1[r]);
      gam = A(sum / static_cast<double>(B));
    }
    *gamma_out.mutable_data_ptr<A>() = gam;
    const CakArgs<T, A> p{zs.const_data_ptr<T>(), zt_ptr, g.mutable_data_ptr<T>(), loss.mutable_data_ptr<A>(), C,
                          A(1.0 / temperature), A(eps), gam, A(grad_scale), standardize};
    at::parallel_for(0, B, grain_rows(C), [&](int64_t r0, int64_t r1) {
      if (isa == Isa::avx512) cak_rows_avx512<T, A>(p, r0, r1);
      else if (isa == Isa::avx2) cak_rows_avx2<T, A>(p, r0, r1);
      else cak_rows_base<T, A>(p, r0, r1);
    });
  });
  return {loss, g, gamma_out};
}

// ---- host model of the CUDA kernels (csrc/cuda/kl_gap.cu) ------------------------------------------
// The GPU's row algorithm run on the CPU with the same host/device functions (csrc/common/kl_gap.h:
// per-thread strided sweeps, state merges, fold over warps, finalisation, gradients) and the warp
// shuffles replayed on arrays (block_merge_model), for a block of `threads` threads. Test-only
// (s2h_internal namespace, not a public op): it is how the CPU tests check the code that the CUDA
// kernels run, which no GPU here ever executed. Slow (one scalar state per modelled thread).

template <typename M, typename A, typename Push>
void model_merge(int threads, A* out, Push&& push) {
  std::vector<A> states(static_cast<size_t>(threads) * M::kN);
  for (int t = 0; t < threads; ++t) {
    M::init(states.data() + t * M::kN);
    push(t, states.data() + t * M::kN);
  }
  k::block_merge_model<M>(states.data(), threads, out);
}

void check_model_threads(int64_t threads) {
  TORCH_CHECK(threads >= 32 && threads <= 1024 && threads % 32 == 0,
              "s2h_internal block model: threads must be a multiple of 32 in [32, 1024], got ", threads);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_gap_block_model(const at::Tensor& soft, const at::Tensor& hard,
                                                                  double temperature, double grad_scale,
                                                                  int64_t threads) {
  check_pair("s2h_internal::kl_gap_block_model", "soft", soft, "hard", hard);
  check_model_threads(threads);
  const at::Tensor s = soft.contiguous(), h = hard.contiguous();
  const int64_t B = s.size(0), C = s.size(1);
  at::Tensor loss = at::empty({B}, s.options().dtype(acc_type(s.scalar_type())));
  at::Tensor gs = at::empty({B, C}, s.options()), gh = at::empty({B, C}, s.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "kl_gap_block_model", [&] {
    using T = scalar_t;
    using A = at::opmath_type<T>;
    const A inv_t = A(1.0 / temperature), gscale = A(grad_scale / temperature);
    for (int64_t r = 0; r < B; ++r) {
      const T* sr = s.const_data_ptr<T>() + r * C;
      const T* hr = h.const_data_ptr<T>() + r * C;
      A v[k::GapMerge<A>::kN];
      model_merge<k::GapMerge<A>>(int(threads), v, [&](int t, A* st) { k::gap_push_strided(sr, hr, C, t, threads, inv_t, st); });
      const k::GapRow<A> row = k::gap_finalize(v);
      for (int t = 0; t < threads; ++t)
        k::gap_grads_strided(sr, hr, C, t, threads, inv_t, gscale, row, gs.mutable_data_ptr<T>() + r * C,
                             gh.mutable_data_ptr<T>() + r * C);
      loss.mutable_data_ptr<A>()[r] = row.d;
    }
  });
  return {loss, gs, gh};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ca_kld_block_model(const at::Tensor& student, const at::Tensor& teacher,
                                                                  double temperature, std::optional<double> gamma,
                                                                  bool standardize, double eps, double grad_scale,
                                                                  int64_t threads) {
  check_pair("s2h_internal::ca_kld_block_model", "student", student, "teacher", teacher);
  check_model_threads(threads);
  const at::Tensor zs = student.contiguous(), zt = teacher.contiguous();
  const int64_t B = zs.size(0), C = zs.size(1);
  at::Tensor loss, g, gamma_out;
  std::tie(loss, g, gamma_out) = ca_kld_outputs(zs);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, zs.scalar_type(), "ca_kld_block_model", [&] {
    using T = scalar_t;
    using A = at::opmath_type<T>;
    const A inv_t = A(1.0 / temperature);
    A gam = A(gamma.value_or(0.0));
    if (!gamma.has_value()) {  // top1_kernel per row, then mean_kernel's double sum
      double sum = 0;
      for (int64_t r = 0; r < B; ++r) {
        A v[k::SoftmaxMerge<A>::kN];
        model_merge<k::SoftmaxMerge<A>>(int(threads), v, [&](int t, A* st) {
          k::top1_push_strided(zt.const_data_ptr<T>() + r * C, C, t, threads, st);
        });
        sum += static_cast<double>(k::top1_finalize(v));
      }
      gam = A(sum / static_cast<double>(B));
    }
    *gamma_out.mutable_data_ptr<A>() = gam;
    const auto row = [&](auto std_flag) {
      constexpr bool kStd = decltype(std_flag)::value;
      for (int64_t r = 0; r < B; ++r) {
        const T* sr = zs.const_data_ptr<T>() + r * C;
        const T* tr = zt.const_data_ptr<T>() + r * C;
        k::Affine<A> fs = k::plain_affine(inv_t), ft = k::plain_affine(inv_t);
        if (kStd) {
          A st[k::WelfordMerge<A>::kN];
          model_merge<k::WelfordMerge<A>>(int(threads), st, [&](int t, A* w) {
            k::welford_push_strided(sr, tr, C, t, threads, w);
          });
          k::affines_from_welford(st, inv_t, A(eps), fs, ft);
        }
        A v[k::CakMerge<A>::kN];
        model_merge<k::CakMerge<A>>(int(threads), v, [&](int t, A* st) {
          k::cak_push_strided<T, A, kStd>(sr, tr, C, t, threads, fs, ft, st);
        });
        const k::CakRow<A> rw = k::cak_finalize(v, gam, fs, inv_t, kStd);
        for (int t = 0; t < threads; ++t)
          k::cak_grads_strided(sr, tr, C, t, threads, fs, ft, rw, A(grad_scale), g.mutable_data_ptr<T>() + r * C);
        loss.mutable_data_ptr<A>()[r] = rw.loss;
      }
    };
    if (standardize) row(std::true_type{});
    else row(std::false_type{});
  });
  return {loss, g, gamma_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(s2h, CPU, m) {
  m.impl("kl_gap", &kl_gap_cpu);
  m.impl("ca_kld", &ca_kld_cpu);
}

// Test-only ops (not part of s2h's API; schemas here rather than in csrc/ops.cpp, which holds the
// public ones): the CUDA kernels' row algorithm modelled on the CPU, see above.
TORCH_LIBRARY_FRAGMENT(s2h_internal, m) {
  m.def("kl_gap_block_model(Tensor soft, Tensor hard, float temperature, float grad_scale, int threads)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("ca_kld_block_model(Tensor student, Tensor teacher, float temperature, float? gamma, bool standardize,"
        " float eps, float grad_scale, int threads) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(s2h_internal, CPU, m) {
  m.impl("kl_gap_block_model", &kl_gap_block_model);
  m.impl("ca_kld_block_model", &ca_kld_block_model);
}
