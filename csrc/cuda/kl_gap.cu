// KL gap and CA-KLD on CUDA: one block per row. Each thread keeps an online-softmax state over a
// strided slice of the row; warps merge by xor shuffles and warps through shared memory, every
// thread merging in the same order so all of them hold the row result. A second sweep writes the
// gradients. The per-element and per-row math is csrc/common/kl_gap.h, which the CPU tests check.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "common/kl_gap.h"
#include "common/kl_gap_checks.h"

namespace s2h {
namespace {

namespace k = s2h::kl;

template <typename A>
__device__ __forceinline__ A shfl(A v, int off) {
  return __shfl_xor_sync(0xffffffffu, v, off);
}

// ---- block merges: NV values of state per thread -> the row's state in every thread ----------

// Merge functions of kl_gap.h, applied to arrays of state values.
template <typename A>
struct GapMerge {
  static constexpr int kN = 5;
  __device__ static void init(A* v) { k::gap_init(v[0], v[1], v[2], v[3], v[4]); }
  __device__ static void merge(A* v, const A* o) { k::gap_merge(v[0], v[1], v[2], v[3], v[4], o[0], o[1], o[2], o[3], o[4]); }
};

template <typename A>
struct CakMerge {
  static constexpr int kN = 9;
  __device__ static void init(A* v) { k::cak_init(v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8]); }
  __device__ static void merge(A* v, const A* o) {
    k::cak_merge(v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], o[0], o[1], o[2], o[3], o[4], o[5], o[6],
                 o[7], o[8]);
  }
};

template <typename A>
struct SoftmaxMerge {
  static constexpr int kN = 2;
  __device__ static void init(A* v) {
    v[0] = k::neg_inf<A>();
    v[1] = A(0);
  }
  __device__ static void merge(A* v, const A* o) {
    A s1, s2;
    k::merge(v[0], v[1], o[0], o[1], s1, s2);
  }
};

template <typename A>
struct WelfordMerge {  // two rows' statistics side by side: student (0..2), teacher (3..5)
  static constexpr int kN = 6;
  __device__ static void init(A* v) {
    for (int i = 0; i < kN; ++i) v[i] = A(0);
  }
  __device__ static void merge(A* v, const A* o) {
    k::welford_merge(v[0], v[1], v[2], o[0], o[1], o[2]);
    k::welford_merge(v[3], v[4], v[5], o[3], o[4], o[5]);
  }
};

// smem holds kN * (kThreads / 32) values. Ends with a barrier, so smem may be reused at once.
template <typename M, typename A, int kThreads>
__device__ void block_merge(A* v, A* smem) {
  constexpr int kN = M::kN;
  for (int off = 16; off > 0; off >>= 1) {
    A o[kN];
#pragma unroll
    for (int i = 0; i < kN; ++i) o[i] = shfl(v[i], off);
    M::merge(v, o);
  }
  constexpr int kWarps = kThreads / 32;
  if (kWarps > 1) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) {
#pragma unroll
      for (int i = 0; i < kN; ++i) smem[i * kWarps + warp] = v[i];
    }
    __syncthreads();
    M::init(v);
    for (int w = 0; w < kWarps; ++w) {
      A o[kN];
#pragma unroll
      for (int i = 0; i < kN; ++i) o[i] = smem[i * kWarps + w];
      M::merge(v, o);
    }
  }
  __syncthreads();
}

// ---- kernels ------------------------------------------------------------------------------------

template <typename T, typename A, int kThreads>
__global__ void __launch_bounds__(kThreads)
    kl_gap_kernel(const T* __restrict__ s, const T* __restrict__ h, int64_t C, A inv_t, A gscale,
                  T* __restrict__ gs, T* __restrict__ gh, A* __restrict__ loss) {
  __shared__ A smem[GapMerge<A>::kN * (kThreads / 32)];
  const int64_t off = static_cast<int64_t>(blockIdx.x) * C;
  A v[5];
  GapMerge<A>::init(v);
  for (int64_t j = threadIdx.x; j < C; j += kThreads)
    k::gap_push(v[0], v[1], v[2], v[3], v[4], static_cast<A>(s[off + j]) * inv_t, static_cast<A>(h[off + j]) * inv_t);
  block_merge<GapMerge<A>, A, kThreads>(v, smem);
  const k::GapRow<A> r = k::gap_finalize(v[0], v[1], v[2], v[3], v[4]);
  for (int64_t j = threadIdx.x; j < C; j += kThreads) {
    A g1, g2;
    k::gap_grads(r, static_cast<A>(s[off + j]) * inv_t, static_cast<A>(h[off + j]) * inv_t, gscale, g1, g2);
    gs[off + j] = static_cast<T>(g1);
    gh[off + j] = static_cast<T>(g2);
  }
  if (threadIdx.x == 0) loss[blockIdx.x] = r.d;
}

template <typename T, typename A, int kThreads>
__global__ void __launch_bounds__(kThreads) top1_kernel(const T* __restrict__ z, int64_t C, A* __restrict__ out) {
  __shared__ A smem[SoftmaxMerge<A>::kN * (kThreads / 32)];
  const int64_t off = static_cast<int64_t>(blockIdx.x) * C;
  A v[2];
  SoftmaxMerge<A>::init(v);
  for (int64_t j = threadIdx.x; j < C; j += kThreads) {
    A old, e;
    k::push(v[0], v[1], static_cast<A>(z[off + j]), old, e);
  }
  block_merge<SoftmaxMerge<A>, A, kThreads>(v, smem);
  if (threadIdx.x == 0) out[blockIdx.x] = A(1) / v[1];
}

// gamma = mean of the rows' top-1 probabilities, summed in double by one block.
template <typename A>
__global__ void __launch_bounds__(256) mean_kernel(const A* __restrict__ x, int64_t n, A* __restrict__ out) {
  __shared__ double part[256 / 32];
  double acc = 0;
  for (int64_t i = threadIdx.x; i < n; i += 256) acc += static_cast<double>(x[i]);
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0;
    for (int w = 0; w < 256 / 32; ++w) total += part[w];
    *out = static_cast<A>(total / static_cast<double>(n));
  }
}

template <typename A>
__global__ void fill_kernel(A* out, A value) {
  *out = value;
}

template <typename T, typename A, int kThreads, bool kStd>
__global__ void __launch_bounds__(kThreads)
    ca_kld_kernel(const T* __restrict__ zs, const T* __restrict__ zt, int64_t C, A inv_t, A eps,
                  const A* __restrict__ gamma_ptr, A grad_scale, T* __restrict__ g, A* __restrict__ loss) {
  __shared__ A smem[CakMerge<A>::kN * (kThreads / 32)];
  const int64_t off = static_cast<int64_t>(blockIdx.x) * C;
  const A gamma = *gamma_ptr;
  k::Affine<A> fs = k::plain_affine(inv_t), ft = k::plain_affine(inv_t);
  if (kStd) {
    A st[6];
    WelfordMerge<A>::init(st);
    for (int64_t j = threadIdx.x; j < C; j += kThreads) {
      k::welford_push(st[0], st[1], st[2], static_cast<A>(zs[off + j]));
      k::welford_push(st[3], st[4], st[5], static_cast<A>(zt[off + j]));
    }
    block_merge<WelfordMerge<A>, A, kThreads>(st, smem);
    fs = k::standardize_affine(st[0], st[1], st[2], inv_t, eps);
    ft = k::standardize_affine(st[3], st[4], st[5], inv_t, eps);
  }
  A v[9];
  CakMerge<A>::init(v);
  for (int64_t j = threadIdx.x; j < C; j += kThreads) {
    const A a = k::affine_apply(fs, static_cast<A>(zs[off + j]));
    const A b = k::affine_apply(ft, static_cast<A>(zt[off + j]));
    k::cak_push<A, kStd>(v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], a, b);
  }
  block_merge<CakMerge<A>, A, kThreads>(v, smem);
  const k::CakRow<A> r = k::cak_finalize(v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], gamma, fs, inv_t, kStd);
  for (int64_t j = threadIdx.x; j < C; j += kThreads) {
    const A a = k::affine_apply(fs, static_cast<A>(zs[off + j]));
    const A b = k::affine_apply(ft, static_cast<A>(zt[off + j]));
    g[off + j] = static_cast<T>(k::cak_grad(r, a, b, grad_scale));
  }
  if (threadIdx.x == 0) loss[blockIdx.x] = r.loss;
}

// ---- launch ---------------------------------------------------------------------------------------

// Threads per row block: enough to cover short rows with few idle lanes, 512 for long rows.
template <typename F>
void with_threads(int64_t C, F&& f) {
  if (C <= 128) f(std::integral_constant<int, 32>{});
  else if (C <= 1024) f(std::integral_constant<int, 128>{});
  else if (C <= 4096) f(std::integral_constant<int, 256>{});
  else f(std::integral_constant<int, 512>{});
}

void check_pair(const char* op, const char* n1, const at::Tensor& x, const char* n2, const at::Tensor& y) {
  TORCH_CHECK(x.device().is_cuda() && x.device() == y.device(), op, ": ", n1, " and ", n2,
              " must be on the same CUDA device, got ", x.device(), " and ", y.device());
  k::check_pair_layout(op, n1, x, n2, y);
  TORCH_CHECK(x.size(0) <= 2147483647LL, op, ": at most 2^31 - 1 rows, got ", x.size(0));
}

using k::acc_type;
using k::check_temperature;

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_gap_cuda(const at::Tensor& soft, const at::Tensor& hard,
                                                          double temperature, double grad_scale) {
  constexpr const char* op = "s2h::kl_gap";
  check_pair(op, "soft", soft, "hard", hard);
  check_temperature(op, temperature);
  c10::cuda::CUDAGuard guard(soft.device());
  const at::Tensor s = soft.contiguous(), h = hard.contiguous();
  const int64_t B = s.size(0), C = s.size(1);
  at::Tensor loss = at::empty({B}, s.options().dtype(acc_type(s.scalar_type())));
  at::Tensor gs = at::empty({B, C}, s.options());
  at::Tensor gh = at::empty({B, C}, s.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "s2h::kl_gap", [&] {
    using T = scalar_t;
    using A = at::opmath_type<T>;
    with_threads(C, [&](auto threads) {
      constexpr int kThreads = decltype(threads)::value;
      kl_gap_kernel<T, A, kThreads><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
          s.const_data_ptr<T>(), h.const_data_ptr<T>(), C, A(1.0 / temperature), A(grad_scale / temperature),
          gs.mutable_data_ptr<T>(), gh.mutable_data_ptr<T>(), loss.mutable_data_ptr<A>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {loss, gs, gh};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ca_kld_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                          double temperature, std::optional<double> gamma,
                                                          bool standardize, double eps, double grad_scale) {
  constexpr const char* op = "s2h::ca_kld";
  check_pair(op, "student", student, "teacher", teacher);
  check_temperature(op, temperature);
  TORCH_CHECK(!gamma.has_value() || (*gamma >= 0.0 && *gamma <= 1.0), op, ": gamma must lie in [0, 1], got ",
              gamma.value_or(0.0));
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be a finite number >= 0, got ", eps);
  c10::cuda::CUDAGuard guard(student.device());
  const at::Tensor zs = student.contiguous(), zt = teacher.contiguous();
  const int64_t B = zs.size(0), C = zs.size(1);
  const auto acc = acc_type(zs.scalar_type());
  at::Tensor loss = at::empty({B}, zs.options().dtype(acc));
  at::Tensor g = at::empty({B, C}, zs.options());
  at::Tensor gamma_out = at::empty({}, zs.options().dtype(acc));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, zs.scalar_type(), "s2h::ca_kld", [&] {
    using T = scalar_t;
    using A = at::opmath_type<T>;
    with_threads(C, [&](auto threads) {
      constexpr int kThreads = decltype(threads)::value;
      if (gamma.has_value()) {
        fill_kernel<A><<<1, 1, 0, stream>>>(gamma_out.mutable_data_ptr<A>(), A(*gamma));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {  // the teacher's mean top-1 probability (raw logits, T = 1) over the batch
        at::Tensor top1 = at::empty({B}, zs.options().dtype(acc));
        top1_kernel<T, A, kThreads><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
            zt.const_data_ptr<T>(), C, top1.mutable_data_ptr<A>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        mean_kernel<A><<<1, 256, 0, stream>>>(top1.const_data_ptr<A>(), B, gamma_out.mutable_data_ptr<A>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      const auto launch = [&](auto std_flag) {
        constexpr bool kStd = decltype(std_flag)::value;
        ca_kld_kernel<T, A, kThreads, kStd><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
            zs.const_data_ptr<T>(), zt.const_data_ptr<T>(), C, A(1.0 / temperature), A(eps),
            gamma_out.const_data_ptr<A>(), A(grad_scale), g.mutable_data_ptr<T>(), loss.mutable_data_ptr<A>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (standardize) launch(std::true_type{});
      else launch(std::false_type{});
    });
  });
  return {loss, g, gamma_out};
}

}  // namespace
}  // namespace s2h

TORCH_LIBRARY_IMPL(s2h, CUDA, m) {
  m.impl("kl_gap", &s2h::kl_gap_cuda);
  m.impl("ca_kld", &s2h::ca_kld_cuda);
}
