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

// ---- block merge: NV values of state per thread -> the row's state in every thread -------------
// The merge functions (GapMerge, CakMerge, SoftmaxMerge, WelfordMerge), the per-thread sweeps, the
// fold over warps and the row finalisations are csrc/common/kl_gap.h, which the CPU tests run
// through its host model of this block (s2h_internal::*_block_model); what only a GPU runs is the
// exchange below: the xor shuffles and the shared-memory hand-off.

// smem holds kN * (kThreads / 32) values. Ends with a barrier, so smem may be reused at once.
template <typename M, typename A, int kThreads>
__device__ void block_merge(A* v, A* smem) {
  constexpr int kN = M::kN, kWarps = kThreads / 32;
  for (int off = 16; off > 0; off >>= 1) {
    A o[kN];
#pragma unroll
    for (int i = 0; i < kN; ++i) o[i] = shfl(v[i], off);
    M::merge(v, o);
  }
  if (threadIdx.x % 32 == 0) {
#pragma unroll
    for (int i = 0; i < kN; ++i) smem[i * kWarps + threadIdx.x / 32] = v[i];
  }
  __syncthreads();
  k::fold_warps<M>(v, smem, kWarps);
  __syncthreads();
}

// ---- kernels ------------------------------------------------------------------------------------

template <typename T, typename A, int kThreads>
__global__ void __launch_bounds__(kThreads)
    kl_gap_kernel(const T* __restrict__ s, const T* __restrict__ h, int64_t C, A inv_t, A gscale,
                  T* __restrict__ gs, T* __restrict__ gh, A* __restrict__ loss) {
  using M = k::GapMerge<A>;
  __shared__ A smem[M::kN * (kThreads / 32)];
  const int64_t off = static_cast<int64_t>(blockIdx.x) * C;
  A v[M::kN];
  M::init(v);
  k::gap_push_strided(s + off, h + off, C, threadIdx.x, kThreads, inv_t, v);
  block_merge<M, A, kThreads>(v, smem);
  const k::GapRow<A> r = k::gap_finalize(v);
  k::gap_grads_strided(s + off, h + off, C, threadIdx.x, kThreads, inv_t, gscale, r, gs + off, gh + off);
  if (threadIdx.x == 0) loss[blockIdx.x] = r.d;
}

template <typename T, typename A, int kThreads>
__global__ void __launch_bounds__(kThreads) top1_kernel(const T* __restrict__ z, int64_t C, A* __restrict__ out) {
  using M = k::SoftmaxMerge<A>;
  __shared__ A smem[M::kN * (kThreads / 32)];
  const int64_t off = static_cast<int64_t>(blockIdx.x) * C;
  A v[M::kN];
  M::init(v);
  k::top1_push_strided(z + off, C, threadIdx.x, kThreads, v);
  block_merge<M, A, kThreads>(v, smem);
  if (threadIdx.x == 0) out[blockIdx.x] = k::top1_finalize(v);
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
  using M = k::CakMerge<A>;
  __shared__ A smem[M::kN * (kThreads / 32)];
  const int64_t off = static_cast<int64_t>(blockIdx.x) * C;
  const A gamma = *gamma_ptr;
  k::Affine<A> fs = k::plain_affine(inv_t), ft = k::plain_affine(inv_t);
  if (kStd) {
    using W = k::WelfordMerge<A>;
    A st[W::kN];
    W::init(st);
    k::welford_push_strided(zs + off, zt + off, C, threadIdx.x, kThreads, st);
    block_merge<W, A, kThreads>(st, smem);
    k::affines_from_welford(st, inv_t, eps, fs, ft);
  }
  A v[M::kN];
  M::init(v);
  k::cak_push_strided<T, A, kStd>(zs + off, zt + off, C, threadIdx.x, kThreads, fs, ft, v);
  block_merge<M, A, kThreads>(v, smem);
  const k::CakRow<A> r = k::cak_finalize(v, gamma, fs, inv_t, kStd);
  k::cak_grads_strided(zs + off, zt + off, C, threadIdx.x, kThreads, fs, ft, r, grad_scale, g + off);
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
using k::ca_kld_outputs;
using k::check_ca_kld_scalars;

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
  check_ca_kld_scalars(op, temperature, gamma, eps);
  c10::cuda::CUDAGuard guard(student.device());
  const at::Tensor zs = student.contiguous(), zt = teacher.contiguous();
  const int64_t B = zs.size(0), C = zs.size(1);
  at::Tensor loss, g, gamma_out;
  std::tie(loss, g, gamma_out) = ca_kld_outputs(zs);
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
        at::Tensor top1 = at::empty({B}, loss.options());
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
