// S2H_CPU_ISA, read once (csrc/cpu/cpu_isa.h).
#include "cpu/cpu_isa.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "cpu/spmm_tuning.h"

namespace s2h::cpu {
namespace {

constexpr int kUnread = -1;
std::atomic<int> g_active{kUnread};

Isa from_environment() {
  TORCH_CHECK(std::getenv("S2H_SPMM_ISA") == nullptr,
              "S2H_SPMM_ISA was replaced by S2H_CPU_ISA (avx512, avx2, scalar or auto), which every CPU kernel reads");
  const char* env = std::getenv("S2H_CPU_ISA");
  const Isa best = best_isa();
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return best;
  Isa want;
  if (std::strcmp(env, "avx512") == 0) want = Isa::avx512;
  else if (std::strcmp(env, "avx2") == 0) want = Isa::avx2;
  else if (std::strcmp(env, "scalar") == 0) want = Isa::scalar;
  else TORCH_CHECK(false, "S2H_CPU_ISA=", env, " is not one of avx512, avx2, scalar, auto");
  TORCH_CHECK(static_cast<int>(want) <= static_cast<int>(best), "S2H_CPU_ISA=", env,
              " but this CPU runs at most ", isa_name(best));
  return want;
}

}  // namespace

const char* isa_name(Isa isa) {
  return isa == Isa::avx512 ? "avx512" : isa == Isa::avx2 ? "avx2" : "scalar";
}

Isa best_isa() {
#if S2H_X86
  static const Isa best = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
      return Isa::avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
    return Isa::scalar;
  }();
  return best;
#else
  return Isa::scalar;  // the portable kernels, vectorised for the target's baseline
#endif
}

Isa active_isa() {
  int v = g_active.load(std::memory_order_acquire);
  if (v == kUnread) {  // first use (or after a bad value): concurrent first readers agree
    v = static_cast<int>(from_environment());
    g_active.store(v, std::memory_order_release);
  }
  return static_cast<Isa>(v);
}

void reload_cpu_config() {
  g_active.store(kUnread, std::memory_order_release);
  active_isa();
  spmm::reload_tuning();
}

}  // namespace s2h::cpu
