// CPU kernels of s2h::kl_gap and s2h::ca_kld (math in csrc/common/kl_gap.h, DESIGN §2 and §3).
//
// OpenMP over rows (at::parallel_for, which runs on torch's OpenMP pool). Within a row, kL lanes
// each keep their own online-softmax state in plain arrays, so the per-element update (one exp per
// stream, see kl_gap.h) vectorises; the lanes merge at the end of the row. A second sweep over the
// row, still in cache for any realistic C, writes both gradients. Nothing of size B x C is
// allocated beyond the outputs.
//
// No -march=native: the row loops are compiled three times, for AVX-512, AVX2+FMA and the x86-64
// baseline, through per-function target attributes, and chosen at run time with
// __builtin_cpu_supports. S2H_CPU_ISA=avx512|avx2|default forces a lower one (tests use it).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "common/kl_gap.h"

namespace {

namespace k = s2h::kl;

#define KL_INLINE inline __attribute__((always_inline))

constexpr int kL = 16;  // lanes of online state per row

// ---- row kernels ----------------------------------------------------------------------------

template <typename T, typename A>
KL_INLINE void gap_row(const T* __restrict s, const T* __restrict h, int64_t C, A inv_t, A gscale,
                       T* __restrict gs, T* __restrict gh, A* loss) {
  A ms[kL], zs[kL], w[kL], mh[kL], zh[kL];
  for (int l = 0; l < kL; ++l) k::gap_init(ms[l], zs[l], w[l], mh[l], zh[l]);
  int64_t j = 0;
  for (; j + kL <= C; j += kL) {
#pragma omp simd
    for (int l = 0; l < kL; ++l) {
      const A a = static_cast<A>(s[j + l]) * inv_t;
      const A b = static_cast<A>(h[j + l]) * inv_t;
      k::gap_push(ms[l], zs[l], w[l], mh[l], zh[l], a, b);
    }
  }
  for (int l = 0; j + l < C; ++l) {
    const A a = static_cast<A>(s[j + l]) * inv_t;
    const A b = static_cast<A>(h[j + l]) * inv_t;
    k::gap_push(ms[l], zs[l], w[l], mh[l], zh[l], a, b);
  }
  for (int step = kL / 2; step > 0; step /= 2)
    for (int l = 0; l < step; ++l)
      k::gap_merge(ms[l], zs[l], w[l], mh[l], zh[l], ms[l + step], zs[l + step], w[l + step],
                   mh[l + step], zh[l + step]);
  const k::GapRow<A> r = k::gap_finalize(ms[0], zs[0], w[0], mh[0], zh[0]);
  *loss = r.d;
#pragma omp simd
  for (int64_t i = 0; i < C; ++i) {
    const A a = static_cast<A>(s[i]) * inv_t;
    const A b = static_cast<A>(h[i]) * inv_t;
    A g1, g2;
    k::gap_grads(r, a, b, gscale, g1, g2);
    gs[i] = static_cast<T>(g1);
    gh[i] = static_cast<T>(g2);
  }
}

// Welford statistics of one row -> its affine map (standardise, then divide by T).
template <typename T, typename A>
KL_INLINE k::Affine<A> standardize_row(const T* __restrict z, int64_t C, A inv_t, A eps) {
  A n[kL], mean[kL], m2[kL];
  for (int l = 0; l < kL; ++l) n[l] = mean[l] = m2[l] = A(0);
  int64_t j = 0;
  for (; j + kL <= C; j += kL) {
#pragma omp simd
    for (int l = 0; l < kL; ++l) k::welford_push(n[l], mean[l], m2[l], static_cast<A>(z[j + l]));
  }
  for (int l = 0; j + l < C; ++l) k::welford_push(n[l], mean[l], m2[l], static_cast<A>(z[j + l]));
  for (int step = kL / 2; step > 0; step /= 2)
    for (int l = 0; l < step; ++l)
      k::welford_merge(n[l], mean[l], m2[l], n[l + step], mean[l + step], m2[l + step]);
  return k::standardize_affine(n[0], mean[0], m2[0], inv_t, eps);
}

template <typename T, typename A, bool kStd>
KL_INLINE void cak_row(const T* __restrict zs_in, const T* __restrict zt_in, int64_t C, A inv_t, A eps,
                       A gamma, A grad_scale, T* __restrict g, A* loss) {
  const k::Affine<A> fs = kStd ? standardize_row<T, A>(zs_in, C, inv_t, eps) : k::plain_affine(inv_t);
  const k::Affine<A> ft = kStd ? standardize_row<T, A>(zt_in, C, inv_t, eps) : k::plain_affine(inv_t);
  A ms[kL], zs[kL], ws[kL], sas[kL], sab[kL], mt[kL], zt[kL], wt[kL], sat[kL];
  for (int l = 0; l < kL; ++l) k::cak_init(ms[l], zs[l], ws[l], sas[l], sab[l], mt[l], zt[l], wt[l], sat[l]);
  int64_t j = 0;
  for (; j + kL <= C; j += kL) {
#pragma omp simd
    for (int l = 0; l < kL; ++l) {
      const A a = k::affine_apply(fs, static_cast<A>(zs_in[j + l]));
      const A b = k::affine_apply(ft, static_cast<A>(zt_in[j + l]));
      k::cak_push<A, kStd>(ms[l], zs[l], ws[l], sas[l], sab[l], mt[l], zt[l], wt[l], sat[l], a, b);
    }
  }
  for (int l = 0; j + l < C; ++l) {
    const A a = k::affine_apply(fs, static_cast<A>(zs_in[j + l]));
    const A b = k::affine_apply(ft, static_cast<A>(zt_in[j + l]));
    k::cak_push<A, kStd>(ms[l], zs[l], ws[l], sas[l], sab[l], mt[l], zt[l], wt[l], sat[l], a, b);
  }
  for (int step = kL / 2; step > 0; step /= 2)
    for (int l = 0; l < step; ++l) {
      const int o = l + step;
      k::cak_merge(ms[l], zs[l], ws[l], sas[l], sab[l], mt[l], zt[l], wt[l], sat[l], ms[o], zs[o], ws[o],
                   sas[o], sab[o], mt[o], zt[o], wt[o], sat[o]);
    }
  const k::CakRow<A> r = k::cak_finalize(ms[0], zs[0], ws[0], sas[0], sab[0], mt[0], zt[0], wt[0], sat[0],
                                         gamma, fs, inv_t, kStd);
  *loss = r.loss;
#pragma omp simd
  for (int64_t i = 0; i < C; ++i) {
    const A a = k::affine_apply(fs, static_cast<A>(zs_in[i]));
    const A b = k::affine_apply(ft, static_cast<A>(zt_in[i]));
    g[i] = static_cast<T>(k::cak_grad(r, a, b, grad_scale));
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
  int64_t j = 0;
  for (; j + kL <= C; j += kL) {
#pragma omp simd
    for (int l = 0; l < kL; ++l) {
      A old, e;
      k::push(m[l], zz[l], static_cast<A>(z[j + l]), old, e);
    }
  }
  for (int l = 0; j + l < C; ++l) {
    A old, e;
    k::push(m[l], zz[l], static_cast<A>(z[j + l]), old, e);
  }
  for (int step = kL / 2; step > 0; step /= 2)
    for (int l = 0; l < step; ++l) {
      A s1, s2;
      k::merge(m[l], zz[l], m[l + step], zz[l + step], s1, s2);
    }
  return A(1) / zz[0];
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
  ATTR __attribute__((noinline)) void gap_row_##SUFFIX(const GapArgs<T, A>& p, int64_t r) {         \
    gap_row<T, A>(p.s + r * p.C, p.h + r * p.C, p.C, p.inv_t, p.gscale, p.gs + r * p.C,             \
                  p.gh + r * p.C, p.loss + r);                                                      \
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
  void gap_rows_##SUFFIX(const GapArgs<T, A>& p, int64_t r0, int64_t r1) {                          \
    for (int64_t r = r0; r < r1; ++r) gap_row_##SUFFIX<T, A>(p, r);                                 \
  }                                                                                                 \
  template <typename T, typename A>                                                                 \
  void cak_rows_##SUFFIX(const CakArgs<T, A>& p, int64_t r0, int64_t r1) {                          \
    for (int64_t r = r0; r < r1; ++r) cak_row_##SUFFIX<T, A>(p, r);                                 \
  }                                                                                                 \
  template <typename T, typename A>                                                                 \
  void top1_rows_##SUFFIX(const T* z, int64_t C, A* out, int64_t r0, int64_t r1) {                  \
    for (int64_t r = r0; r < r1; ++r) out[r] = top1_row_##SUFFIX<T, A>(z + r * C, C);               \
  }

KL_DEFINE_RANGES(avx512, __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c"))))
KL_DEFINE_RANGES(avx2, __attribute__((target("avx2,fma,f16c"))))
KL_DEFINE_RANGES(base, )

enum class Isa { kBase, kAvx2, kAvx512 };

Isa detect_isa() {
  static const Isa best = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
      return Isa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
      return Isa::kAvx2;
    return Isa::kBase;
  }();
  Isa isa = best;
  if (const char* env = std::getenv("S2H_CPU_ISA")) {  // may only lower the choice
    Isa want = best;
    if (std::strcmp(env, "default") == 0 || std::strcmp(env, "base") == 0) want = Isa::kBase;
    else if (std::strcmp(env, "avx2") == 0) want = Isa::kAvx2;
    if (static_cast<int>(want) < static_cast<int>(isa)) isa = want;
  }
  return isa;
}

// Rows per parallel task: about 32k elements each, at least one row.
int64_t grain_rows(int64_t C) {
  const int64_t g = 32768 / (C > 0 ? C : 1);
  return g > 0 ? g : 1;
}

// ---- input checks --------------------------------------------------------------------------

void check_pair(const char* op, const char* n1, const at::Tensor& x, const char* n2, const at::Tensor& y) {
  TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu(), op, ": ", n1, " and ", n2,
              " must both be CPU tensors here, got ", x.device(), " and ", y.device());
  TORCH_CHECK(x.dim() == 2, op, ": ", n1, " must be 2-D (rows, classes), got shape ", x.sizes());
  TORCH_CHECK(x.sizes() == y.sizes(), op, ": ", n1, " and ", n2, " must have the same shape, got ", x.sizes(),
              " and ", y.sizes());
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), op, ": ", n1, " and ", n2, " must have the same dtype, got ",
              x.scalar_type(), " and ", y.scalar_type());
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op, ": ", n1,
              " must be float32, float64, float16 or bfloat16, got ", st);
  TORCH_CHECK(x.size(0) > 0, op, ": ", n1, " has no rows (empty batch)");
  TORCH_CHECK(x.size(1) > 0, op, ": ", n1, " has no classes");
}

void check_temperature(const char* op, double t) {
  TORCH_CHECK(std::isfinite(t) && t > 0, op, ": temperature must be a finite number > 0, got ", t);
}

at::ScalarType acc_type(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

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
  const Isa isa = detect_isa();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "s2h::kl_gap", [&] {
    using T = scalar_t;
    using A = at::opmath_type<T>;
    const GapArgs<T, A> p{s.const_data_ptr<T>(), h.const_data_ptr<T>(), gs.mutable_data_ptr<T>(),
                          gh.mutable_data_ptr<T>(), loss.mutable_data_ptr<A>(), C, A(1.0 / temperature),
                          A(grad_scale / temperature)};
    at::parallel_for(0, B, grain_rows(C), [&](int64_t r0, int64_t r1) {
      if (isa == Isa::kAvx512) gap_rows_avx512<T, A>(p, r0, r1);
      else if (isa == Isa::kAvx2) gap_rows_avx2<T, A>(p, r0, r1);
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
  check_temperature(op, temperature);
  TORCH_CHECK(!gamma.has_value() || (*gamma >= 0.0 && *gamma <= 1.0), op, ": gamma must lie in [0, 1], got ",
              gamma.value_or(0.0));
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be a finite number >= 0, got ", eps);
  const at::Tensor zs = student.contiguous(), zt = teacher.contiguous();
  const int64_t B = zs.size(0), C = zs.size(1);
  const auto acc = acc_type(zs.scalar_type());
  at::Tensor loss = at::empty({B}, zs.options().dtype(acc));
  at::Tensor g = at::empty({B, C}, zs.options());
  at::Tensor gamma_out = at::empty({}, zs.options().dtype(acc));
  const Isa isa = detect_isa();
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
        if (isa == Isa::kAvx512) top1_rows_avx512<T, A>(zt_ptr, C, top1.data(), r0, r1);
        else if (isa == Isa::kAvx2) top1_rows_avx2<T, A>(zt_ptr, C, top1.data(), r0, r1);
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
      if (isa == Isa::kAvx512) cak_rows_avx512<T, A>(p, r0, r1);
      else if (isa == Isa::kAvx2) cak_rows_avx2<T, A>(p, r0, r1);
      else cak_rows_base<T, A>(p, r0, r1);
    });
  });
  return {loss, g, gamma_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(s2h, CPU, m) {
  m.impl("kl_gap", &kl_gap_cpu);
  m.impl("ca_kld", &ca_kld_cpu);
}
