// CPU sparse (CSR) x dense matmul.  Schema in csrc/ops.cpp:
//
//   s2h::spmm(values, row_ptr, col_idx, row_order?, x, bias?, relu)   y = act(W @ x + bias)
//
// This file prepares X (an aligned copy when it pays, the tail columns for the dot kernel) and
// describes the product to the driver (csrc/cpu/spmm_driver.h), which runs the micro-kernels
// (csrc/cpu/spmm_kernels.h).  Batch-1 Linear layers in float32 run s2h::spmv_sell instead
// (csrc/cpu/spmv_sell.cpp), chosen in Python.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <climits>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu/spmm_driver.h"
#include "cpu/spmm_scratch.h"
#include "cpu/spmm_tuning.h"

namespace s2h::spmm {
namespace {

at::Tensor spmm_cpu(const at::Tensor& values, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                    const c10::optional<at::Tensor>& /*row_order: GPU only*/, const at::Tensor& x_in,
                    const c10::optional<at::Tensor>& bias_in, bool relu) {
  TORCH_CHECK(x_in.dim() == 2, "spmm: x must be 2-D (K, N), got shape ", x_in.sizes());
  check_csr(values, row_ptr, col_idx, bias_in, x_in, "spmm");
  const int64_t m = row_ptr.numel() - 1, n = x_in.size(1);
  // Unit stride along N (any row stride); N == 1 wants a contiguous column for the gather.
  const bool ok = x_in.stride(1) == 1 || n == 1;
  at::Tensor x = (ok && (n != 1 || x_in.stride(0) == 1)) ? x_in : x_in.contiguous();
  // Rows of X that do not start on a 64-byte line make every vector load a split load (markedly
  // slower when X lives in L2): copy X once into 16-float aligned rows, when each row of X is read
  // often enough (nnz / K times) to repay the copy.  A last vector with only 1-2 valid lanes
  // (N = 17, 49, 50, ...) still costs a whole cache line of X per nonzero: those columns are
  // copied out as contiguous vectors and computed with the gather dot kernel, when that line is a
  // large share of the loads (N < 48) or comes from far (X over S2H_SPMM_TAIL_X bytes); with a
  // small X the rows are too short to repay the dot kernel's per-row cost (measurements:
  // benchmarks/results/spmm_cpu.md).
  const int64_t nnz = col_idx.numel(), k = x.size(0);
  const SpmmTuning& cfg = tuning();
  const bool reused = x.scalar_type() == at::kFloat && n >= 16 && k > 0 && nnz >= cfg.align * k;
  const bool far_or_few = n < 48 || k * ((n + 15) / 16 * 16) * 4 > cfg.tail_x;
  const int64_t tail = reused && n > 16 && far_or_few && n % 16 <= cfg.tail_dot ? n % 16 : 0;
  const bool misaligned = x.stride(0) % 16 != 0 || reinterpret_cast<uintptr_t>(x.data_ptr()) % 64 != 0;
  const int64_t n_main = n - tail;  // columns computed by the tile kernels
  const float* tail_cols = nullptr;  // tail columns c at tail_cols + c * k
  if (reused && (misaligned || tail > 0)) {
    const int64_t ld = (n_main + 15) / 16 * 16, lds = x.stride(0);
    at::Tensor xa = x_scratch<float>({k, n_main}, {ld, 1}, k * ld + tail * k, x.options());
    const float* src = x.data_ptr<float>();
    float* dst = xa.data_ptr<float>();
    float* dst_tail = dst + k * ld;
    // Row by row with memcpy: faster than Tensor.copy_ into the strided view.
    at::parallel_for(0, k, std::max<int64_t>(1, (1 << 16) / n), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        std::memcpy(dst + r * ld, src + r * lds, sizeof(float) * n_main);
        for (int64_t c = 0; c < tail; ++c) dst_tail[c * k + r] = src[r * lds + n_main + c];
      }
    });
    x = xa;
    tail_cols = dst_tail;
  }
  TORCH_CHECK(x.numel() == 0 || x.stride(0) * (x.size(0) - 1) + n <= INT32_MAX, "spmm: x is too large for 32-bit offsets");
  at::Tensor y = at::empty({m, n}, x.options());
  at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  if (m == 0 || n == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "spmm", [&] {
    Problem<scalar_t> p{};
    p.vals = values.data_ptr<scalar_t>();
    p.row_ptr = row_ptr.data_ptr<int32_t>();
    p.col = col_idx.data_ptr<int32_t>();
    p.m = m;
    p.x = x.data_ptr<scalar_t>();
    p.x_bstride = 0;
    p.batch = 1;
    p.ldx = n_main == 1 ? 1 : x.stride(0);
    p.n = n_main;
    p.k = x.size(0);
    p.y = y.data_ptr<scalar_t>();
    p.y_bstride = 0;
    p.ldy = n;
    p.bias = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
    p.relu = relu;
    run(p);
    TORCH_INTERNAL_ASSERT(tail == 0 || (std::is_same_v<scalar_t, float>));
    for (int64_t c = 0; c < tail; ++c) {  // one column each: N == 1, the dot kernel (float only)
      p.x = reinterpret_cast<const scalar_t*>(tail_cols) + c * k;
      p.ldx = 1;
      p.n = 1;
      p.y = y.data_ptr<scalar_t>() + n_main + c;
      run(p);
    }
  });
  return y;
}

}  // namespace
}  // namespace s2h::spmm

TORCH_LIBRARY_IMPL(s2h, CPU, m) {
  m.impl("spmm", &s2h::spmm::spmm_cpu);
}
