// Channel masks for all groups in one launch on CUDA: one block per group, chunked block scans.
// The per-element and per-group math (softmax shift and weights, channel writes, bucket gradients,
// the group's expected width and keep count) is csrc/common/channel_masks.h, which the CPU kernel
// runs too; what only a GPU runs here is the block structure (cub scans and reductions).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "common/channel_masks.h"

namespace s2h {
namespace {

constexpr int kThreads = 256;

template <typename acc_t>
struct MaxOp {
  __device__ acc_t operator()(acc_t a, acc_t b) const { return a > b ? a : b; }
};

template <typename acc_t>
struct SumOp {
  __device__ acc_t operator()(acc_t a, acc_t b) const { return a + b; }
};

template <typename acc_t>
struct Shared {
  union {
    typename cub::BlockReduce<acc_t, kThreads>::TempStorage reduce;
    typename cub::BlockReduce<int64_t, kThreads>::TempStorage count;
    typename cub::BlockScan<acc_t, kThreads>::TempStorage scan;
  };
  acc_t bcast;
};

// Block-wide reduction of one value per thread; every thread gets the result.
template <typename acc_t, typename Op>
__device__ acc_t block_all_reduce(acc_t local, Op op, Shared<acc_t>& sh) {
  const acc_t r = cub::BlockReduce<acc_t, kThreads>(sh.reduce).Reduce(local, op);
  if (threadIdx.x == 0) sh.bcast = r;
  __syncthreads();
  const acc_t all = sh.bcast;
  __syncthreads();
  return all;
}

// Block-wide softmax shift and sum of exp over the group's scaled logits. (p = weight / s: a
// reciprocal taken once here made ptxas spill 8 B around its slow path in the forward kernel.)
template <typename scalar_t, typename acc_t>
__device__ void softmax_stats(const scalar_t* u, int64_t n, acc_t inv_tau, Shared<acc_t>& sh, acc_t& m,
                              acc_t& s) {
  acc_t local = -INFINITY;
  for (int64_t j = threadIdx.x; j < n; j += kThreads) local = max(local, acc_t(u[j]) * inv_tau);
  m = softmax_shift(block_all_reduce(local, MaxOp<acc_t>(), sh));
  local = 0;
  for (int64_t j = threadIdx.x; j < n; j += kThreads) local += bucket_exp(acc_t(u[j]), inv_tau, m);
  s = block_all_reduce(local, SumOp<acc_t>(), sh);
}

// Group g's first channel: sum over earlier groups of buckets * divisor (G is small; this saves
// a separate prefix-sum launch).
template <typename acc_t>
__device__ int64_t group_channel_start(const int64_t* offsets, const int64_t* divisors, int64_t g, Shared<acc_t>& sh) {
  int64_t local = 0;
  for (int64_t i = threadIdx.x; i < g; i += kThreads) local += group_channels(offsets, divisors, i);
  const int64_t total = cub::BlockReduce<int64_t, kThreads>(sh.count).Sum(local);
  __shared__ int64_t start;
  if (threadIdx.x == 0) start = total;
  __syncthreads();
  return start;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) channel_masks_fwd_kernel(
    const scalar_t* __restrict__ u_all, const int64_t* __restrict__ offsets, const int64_t* __restrict__ divisors,
    scalar_t* __restrict__ w_all, scalar_t* __restrict__ expected,
    int64_t* __restrict__ keep, acc_t inv_tau, int64_t mode) {
  using Scan = cub::BlockScan<acc_t, kThreads>;
  using Count = cub::BlockReduce<int64_t, kThreads>;
  __shared__ Shared<acc_t> sh;
  const int64_t g = blockIdx.x;
  const int64_t n = offsets[g + 1] - offsets[g];
  const int64_t d = divisors[g];
  const scalar_t* u = u_all + offsets[g];
  scalar_t* w_out = w_all + group_channel_start(offsets, divisors, g, sh);
  acc_t m, s;
  softmax_stats(u, n, inv_tau, sh, m, s);
  const int64_t chunks = (n + kThreads - 1) / kThreads;
  // Two identical reverse scans: the first sums w (for mean(w) and E), the second writes
  // channels and counts kept buckets. Thread t holds bucket chunk_end - 1 - t, so an inclusive
  // prefix over threads is a reverse cumsum over buckets.
  acc_t sum_w = 0, mean_w = 0;
  int64_t above = 0;
  for (int pass = 0; pass < 2; ++pass) {
    acc_t carry = 0, local_w = 0;
    int64_t local_above = 0;
    for (int64_t c = chunks - 1; c >= 0; --c) {
      const int64_t j = c * kThreads + (kThreads - 1 - threadIdx.x);
      const bool valid = j < n;
      const acc_t p = valid ? bucket_exp(acc_t(u[j]), inv_tau, m) / s : acc_t(0);
      acc_t w, total;
      Scan(sh.scan).InclusiveSum(p, w, total);
      __syncthreads();
      w += carry;
      carry += total;
      if (valid) {
        if (pass == 0) {
          local_w += w;
        } else {
          local_above += kept_by_threshold(w, mean_w);
          write_bucket_channels(w_out, j, d, w);
        }
      }
    }
    if (pass == 0) {
      sum_w = block_all_reduce(local_w, SumOp<acc_t>(), sh);
      mean_w = mean_keep_probability(sum_w, n);
    } else {
      above = Count(sh.count).Sum(local_above);
    }
  }
  if (threadIdx.x == 0) {
    const GroupOut<acc_t> out = finalize_group(sum_w, above, n, d, mode);
    expected[g] = scalar_t(out.expected);
    keep[g] = out.keep;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) channel_masks_bwd_kernel(
    const scalar_t* __restrict__ grad_w_all, const scalar_t* __restrict__ grad_expected,
    const scalar_t* __restrict__ u_all, const int64_t* __restrict__ offsets, const int64_t* __restrict__ divisors,
    scalar_t* __restrict__ grad_u_all, acc_t inv_tau) {
  using Scan = cub::BlockScan<acc_t, kThreads>;
  __shared__ Shared<acc_t> sh;
  const int64_t g = blockIdx.x;
  const int64_t n = offsets[g + 1] - offsets[g];
  const int64_t d = divisors[g];
  const scalar_t* u = u_all + offsets[g];
  const scalar_t* gw = grad_w_all + group_channel_start(offsets, divisors, g, sh);
  scalar_t* gu = grad_u_all + offsets[g];
  const acc_t ge = acc_t(grad_expected[g]);
  acc_t m, s;
  softmax_stats(u, n, inv_tau, sh, m, s);
  const int64_t chunks = (n + kThreads - 1) / kThreads;
  // Two identical forward scans of the bucket gradients: the first gives dot = sum p*gp, the
  // second writes du = p (gp - dot) / tau.
  acc_t dot = 0;
  for (int pass = 0; pass < 2; ++pass) {
    acc_t carry = 0, local_dot = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t j = c * kThreads + threadIdx.x;
      const bool valid = j < n;
      acc_t gb = 0, p = 0;
      if (valid) {
        gb = bucket_grad_at(gw, j, d, ge);
        p = bucket_exp(acc_t(u[j]), inv_tau, m) / s;
      }
      acc_t gp, total;
      Scan(sh.scan).InclusiveSum(gb, gp, total);
      __syncthreads();
      gp += carry;
      carry += total;
      if (valid) {
        if (pass == 0) local_dot += p * gp;
        else gu[j] = scalar_t(softmax_input_grad(p, gp, dot, inv_tau));
      }
    }
    if (pass == 0) {
      dot = block_all_reduce(local_dot, SumOp<acc_t>(), sh);
    }
  }
}

void check_inputs(const at::Tensor& u, const at::Tensor& offsets, const at::Tensor& divisors) {
  TORCH_CHECK(u.is_cuda() && offsets.device() == u.device() && divisors.device() == u.device(),
              "s2h::channel_masks: u, offsets and divisors must be on one CUDA device, got ", u.device(), ", ",
              offsets.device(), ", ", divisors.device());
  TORCH_CHECK(u.dim() == 1 && at::isFloatingType(u.scalar_type()), "s2h::channel_masks: u must be a 1-D float tensor");
  TORCH_CHECK(offsets.dim() == 1 && offsets.scalar_type() == at::kLong && offsets.numel() >= 2,
              "s2h::channel_masks: offsets must be 1-D int64 with at least 2 entries");
  TORCH_CHECK(divisors.dim() == 1 && divisors.scalar_type() == at::kLong && divisors.numel() == offsets.numel() - 1,
              "s2h::channel_masks: divisors must be 1-D int64 with one entry per group");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_masks_cuda(const at::Tensor& u_, const at::Tensor& offsets_,
                                                                  const at::Tensor& divisors_, double temperature,
                                                                  int64_t hard_mode, int64_t num_channels) {
  check_inputs(u_, offsets_, divisors_);
  TORCH_CHECK(temperature > 0, "s2h::channel_masks: temperature must be > 0, got ", temperature);
  c10::cuda::CUDAGuard guard(u_.device());
  const at::Tensor u = u_.contiguous(), offsets = offsets_.contiguous(), divisors = divisors_.contiguous();
  const int64_t groups = offsets.numel() - 1;
  at::Tensor w = at::empty({num_channels}, u.options());
  at::Tensor expected = at::empty({groups}, u.options());
  at::Tensor keep = at::empty({groups}, u.options().dtype(at::kLong));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "channel_masks_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    channel_masks_fwd_kernel<scalar_t, acc_t><<<groups, kThreads, 0, stream>>>(
        u.data_ptr<scalar_t>(), offsets.data_ptr<int64_t>(), divisors.data_ptr<int64_t>(), w.data_ptr<scalar_t>(), expected.data_ptr<scalar_t>(), keep.data_ptr<int64_t>(), acc_t(1.0 / temperature),
        hard_mode);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {w, expected, keep};
}

at::Tensor channel_masks_backward_cuda(const at::Tensor& grad_w, const at::Tensor& grad_expected, const at::Tensor& u_,
                                       const at::Tensor& offsets_, const at::Tensor& divisors_, double temperature) {
  check_inputs(u_, offsets_, divisors_);
  c10::cuda::CUDAGuard guard(u_.device());
  const at::Tensor u = u_.contiguous(), offsets = offsets_.contiguous(), divisors = divisors_.contiguous();
  const at::Tensor gw = grad_w.contiguous().to(u.scalar_type()), ge = grad_expected.contiguous().to(u.scalar_type());
  at::Tensor gu = at::empty_like(u);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "channel_masks_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    channel_masks_bwd_kernel<scalar_t, acc_t><<<offsets.numel() - 1, kThreads, 0, stream>>>(
        gw.data_ptr<scalar_t>(), ge.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), offsets.data_ptr<int64_t>(),
        divisors.data_ptr<int64_t>(), gu.data_ptr<scalar_t>(), acc_t(1.0 / temperature));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gu;
}

}  // namespace

TORCH_LIBRARY_IMPL(s2h, CUDA, m) {
  m.impl("channel_masks", &channel_masks_cuda);
  m.impl("channel_masks_backward", &channel_masks_backward_cuda);
}

}  // namespace s2h
