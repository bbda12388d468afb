// Sparse (CSR) x dense matmul on CUDA, Sputnik-style: one warp per output row and per tile of
// 128 columns (4 per lane, float4 loads when X rows are 16-byte aligned), rows taken in the
// "row swizzle" order of the packed weight (decreasing nnz, so the long rows start first and the
// short ones fill the tail).  Each warp stages 32 (column, value) pairs in registers and
// broadcasts them with shuffles; X rows are read coalesced.  N == 1 uses a warp dot product.
// The epilogue (bias, ReLU) is csrc/common/spmm.h, which the CPU tests check.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/spmm.h"

namespace s2h::spmm {
namespace {

constexpr int kWarps = 4;        // rows per block
constexpr int kTile = 128;       // columns per warp
constexpr int kPerLane = kTile / 32;

template <typename T, bool VEC4>
__global__ void __launch_bounds__(kWarps * 32)
spmm_rows_kernel(const T* __restrict__ vals, const int32_t* __restrict__ row_ptr, const int32_t* __restrict__ col,
                 const int32_t* __restrict__ order, const T* __restrict__ x, const T* __restrict__ bias,
                 T* __restrict__ y, int64_t m, int64_t n, int64_t ldx, bool relu) {
  const int lane = threadIdx.x & 31;
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (slot >= m) return;
  const int64_t row = order ? order[slot] : slot;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kTile + lane * kPerLane;
  const int32_t start = row_ptr[row], end = row_ptr[row + 1];
  T acc[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) acc[i] = T(0);
  for (int32_t base = start; base < end; base += 32) {
    const int32_t j = base + lane;
    const int32_t my_col = j < end ? col[j] : 0;
    const T my_val = j < end ? vals[j] : T(0);
    const int cnt = min(32, end - base);
    for (int t = 0; t < cnt; ++t) {
      const int64_t c = __shfl_sync(0xffffffffu, my_col, t);
      const T w = __shfl_sync(0xffffffffu, my_val, t);
      const T* xr = x + c * ldx + c0;
      if constexpr (VEC4) {
        if (c0 + kPerLane <= n) {
          const float4 v = *reinterpret_cast<const float4*>(xr);
          acc[0] += w * v.x;
          acc[1] += w * v.y;
          acc[2] += w * v.z;
          acc[3] += w * v.w;
          continue;
        }
      }
#pragma unroll
      for (int i = 0; i < kPerLane; ++i)
        if (c0 + i < n) acc[i] += w * xr[i];
    }
  }
  const T b = bias ? bias[row] : T(0);
#pragma unroll
  for (int i = 0; i < kPerLane; ++i)
    if (c0 + i < n) y[row * n + c0 + i] = epilogue(acc[i], b, relu);
}

// N == 1: one warp per row, lanes stride over the nonzeros, shuffle reduction.
template <typename T>
__global__ void __launch_bounds__(kWarps * 32)
spmv_kernel(const T* __restrict__ vals, const int32_t* __restrict__ row_ptr, const int32_t* __restrict__ col,
            const int32_t* __restrict__ order, const T* __restrict__ x, const T* __restrict__ bias,
            T* __restrict__ y, int64_t m, int64_t ldx, bool relu) {
  const int lane = threadIdx.x & 31;
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (slot >= m) return;
  const int64_t row = order ? order[slot] : slot;
  T acc = T(0);
  for (int32_t j = row_ptr[row] + lane; j < row_ptr[row + 1]; j += 32) acc += vals[j] * x[static_cast<int64_t>(col[j]) * ldx];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
  if (lane == 0) y[row] = epilogue(acc, bias ? bias[row] : T(0), relu);
}

at::Tensor spmm_cuda(const at::Tensor& values, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                     const at::Tensor& x_in, const c10::optional<at::Tensor>& bias_in, bool relu,
                     const at::Tensor& order) {
  c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t m = row_ptr.numel() - 1, n = x_in.size(1);
  at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  at::Tensor y = at::empty({m, n}, x.options());
  at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  if (m == 0 || n == 0) return y;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int32_t* order_ptr = order.defined() ? order.data_ptr<int32_t>() : nullptr;  // null: natural order
  const dim3 block(kWarps * 32);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "spmm_cuda", [&] {
    const scalar_t* b = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
    const dim3 rows_grid(static_cast<unsigned>((m + kWarps - 1) / kWarps));
    if (n == 1) {
      spmv_kernel<scalar_t><<<rows_grid, block, 0, stream>>>(
          values.data_ptr<scalar_t>(), row_ptr.data_ptr<int32_t>(), col_idx.data_ptr<int32_t>(),
          order_ptr, x.data_ptr<scalar_t>(), b, y.data_ptr<scalar_t>(), m, x.stride(0), relu);
    } else {
      const dim3 grid(rows_grid.x, static_cast<unsigned>((n + kTile - 1) / kTile));
      const bool vec4 = std::is_same_v<scalar_t, float> && x.stride(0) % 4 == 0 &&
                        reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0;
      auto launch = [&](auto kernel) {
        kernel<<<grid, block, 0, stream>>>(values.data_ptr<scalar_t>(), row_ptr.data_ptr<int32_t>(),
                                           col_idx.data_ptr<int32_t>(), order_ptr,
                                           x.data_ptr<scalar_t>(), b, y.data_ptr<scalar_t>(), m, n, x.stride(0), relu);
      };
      if (vec4) launch(spmm_rows_kernel<scalar_t, true>);
      else launch(spmm_rows_kernel<scalar_t, false>);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

at::Tensor spmm_cuda_op(const at::Tensor& values, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                        const c10::optional<at::Tensor>& row_order, const at::Tensor& x,
                        const c10::optional<at::Tensor>& bias, bool relu) {
  TORCH_CHECK(x.dim() == 2, "spmm: x must be 2-D (K, N), got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "spmm: x must be float32 or float64, got ",
              x.scalar_type());
  TORCH_CHECK(values.scalar_type() == x.scalar_type(), "spmm: values and x must have the same dtype");
  TORCH_CHECK(row_ptr.scalar_type() == at::kInt && col_idx.scalar_type() == at::kInt, "spmm: row_ptr and col_idx must be int32");
  if (bias.has_value())
    TORCH_CHECK(bias->numel() == row_ptr.numel() - 1 && bias->scalar_type() == x.scalar_type(),
                "spmm: bias must have M entries of x's dtype");
  at::Tensor order;
  if (row_order.has_value()) {
    TORCH_CHECK(row_order->scalar_type() == at::kInt && row_order->numel() == row_ptr.numel() - 1,
                "spmm: row_order must be int32 with M entries");
    order = row_order->contiguous();
  }
  return spmm_cuda(values.contiguous(), row_ptr.contiguous(), col_idx.contiguous(), x, bias, relu, order);
}

}  // namespace
}  // namespace s2h::spmm

TORCH_LIBRARY_IMPL(s2h, CUDA, m) {
  m.impl("spmm", &s2h::spmm::spmm_cuda_op);
}
