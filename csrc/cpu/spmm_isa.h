// Run-time ISA choice of the sparse matmul kernels (csrc/cpu/spmm.cpp, csrc/cpu/spmv_sell.cpp),
// and their environment knobs.  S2H_SPMM_ISA=avx512|avx2|scalar forces an ISA (for tests).
#pragma once

#include <c10/util/Exception.h>

#include "common/macros.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>

// A region of code compiled for one ISA (spmm.cpp compiles its tile template once per ISA).
// Clang ignores `#pragma GCC target`; its equivalent gives every function in the region the
// target attribute.
#define S2H_PRAGMA(x) _Pragma(#x)
#if defined(__clang__)
#define S2H_TARGET_BEGIN(isa) S2H_PRAGMA(clang attribute push(__attribute__((target(isa))), apply_to = function))
#define S2H_TARGET_END S2H_PRAGMA(clang attribute pop)
#else
#define S2H_TARGET_BEGIN(isa) S2H_PRAGMA(GCC push_options) S2H_PRAGMA(GCC target(isa))
#define S2H_TARGET_END S2H_PRAGMA(GCC pop_options)
#endif

namespace s2h::spmm {

inline int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  return (v && *v) ? std::atoll(v) : fallback;
}

enum class Isa : int { scalar = 0, avx2 = 1, avx512 = 2 };

inline const char* isa_name(Isa isa) {
  return isa == Isa::avx512 ? "avx512" : isa == Isa::avx2 ? "avx2" : "scalar";
}

inline Isa best_isa() {
#if S2H_X86
  static const Isa best = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return Isa::avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
    return Isa::scalar;
  }();
  return best;
#else
  return Isa::scalar;  // the portable kernels, vectorised for the target's baseline
#endif
}

inline Isa active_isa() {
  const char* env = std::getenv("S2H_SPMM_ISA");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return best_isa();
  Isa want;
  if (std::strcmp(env, "avx512") == 0) want = Isa::avx512;
  else if (std::strcmp(env, "avx2") == 0) want = Isa::avx2;
  else if (std::strcmp(env, "scalar") == 0) want = Isa::scalar;
  else TORCH_CHECK(false, "spmm: S2H_SPMM_ISA=", env, " is not one of auto, avx512, avx2, scalar");
  TORCH_CHECK(static_cast<int>(want) <= static_cast<int>(best_isa()), "spmm: S2H_SPMM_ISA=", env,
              " but this CPU supports at most ", isa_name(best_isa()));
  return want;
}

}  // namespace s2h::spmm
