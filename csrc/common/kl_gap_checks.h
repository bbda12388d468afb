// Input checks of the KL gap and CA-KLD ops, shared by csrc/cpu/kl_gap.cpp and csrc/cuda/kl_gap.cu
// (host code). The device check stays with each backend.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <tuple>

namespace s2h {
namespace kl {

// Two (rows, classes) logit tensors of one shape and one floating dtype, not empty.
inline void check_pair_layout(const char* op, const char* n1, const at::Tensor& x, const char* n2,
                              const at::Tensor& y) {
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

inline void check_temperature(const char* op, double t) {
  TORCH_CHECK(std::isfinite(t) && t > 0, op, ": temperature must be a finite number > 0, got ", t);
}

// Losses accumulate in float (fp32/fp16/bf16 inputs) or double.
inline at::ScalarType acc_type(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

// The scalar arguments of ca_kld: temperature, gamma (None: the teacher's mean top-1) and eps.
inline void check_ca_kld_scalars(const char* op, double temperature, std::optional<double> gamma, double eps) {
  check_temperature(op, temperature);
  TORCH_CHECK(!gamma.has_value() || (*gamma >= 0.0 && *gamma <= 1.0), op, ": gamma must lie in [0, 1], got ",
              gamma.value_or(0.0));
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be a finite number >= 0, got ", eps);
}

// ca_kld's outputs for contiguous student logits zs (B, C): the per-row loss and gamma in the
// accumulation dtype, the student gradient in zs's dtype.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> ca_kld_outputs(const at::Tensor& zs) {
  const auto acc = zs.options().dtype(acc_type(zs.scalar_type()));
  return {zs.new_empty({zs.size(0)}, acc), zs.new_empty(zs.sizes()), zs.new_empty({}, acc)};
}

}  // namespace kl
}  // namespace s2h
