// The CPU instruction-set layer of every CPU kernel (docs/DESIGN.md §5): one enum, one environment
// variable, one set of target strings.
//
// No -march=native: on x86-64 the hot loops are compiled per ISA level with target attributes
// (S2H_TARGET_AVX512 / S2H_TARGET_AVX2 on a function, or a S2H_TARGET_BEGIN / S2H_TARGET_END
// region) and the level is chosen at run time by active_isa(). Other CPUs (aarch64) build only the
// portable kernels (Isa::scalar), which the compiler vectorises for the target's baseline.
//
// S2H_CPU_ISA=avx512|avx2|scalar (or auto / unset: the best this CPU runs) forces a level; it is
// read once, on first use (reload_cpu_config() re-reads it, for tests). Unknown values and levels
// above what the CPU runs are errors, raised by every kernel call until the variable is fixed.
#pragma once

#include "common/macros.h"

namespace s2h::cpu {

enum class Isa : int { scalar = 0, avx2 = 1, avx512 = 2 };

const char* isa_name(Isa isa);

// The best level this CPU runs: avx512 needs AVX-512 F/VL/BW/DQ, avx2 needs AVX2 and FMA.
Isa best_isa();

// The level the kernels run: best_isa(), or lower when S2H_CPU_ISA asks for it. Cheap (one atomic
// load) after the first call.
Isa active_isa();

// Re-reads S2H_CPU_ISA and every CPU tuning knob from the environment (tests and measurements;
// not while kernels run on other threads). Throws on a bad value, as the kernels then do.
void reload_cpu_config();

}  // namespace s2h::cpu

// Target feature strings of the ISA levels: every source compiles a level with the same features,
// the ones best_isa() checks (F16C is not checked: every AVX2 CPU has it, and clang's
// __builtin_cpu_supports does not know the name).
#define S2H_ISA_AVX512 "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c,popcnt"
#define S2H_ISA_AVX2 "avx2,fma,f16c"
#if S2H_X86
#define S2H_TARGET_AVX512 __attribute__((target(S2H_ISA_AVX512)))
#define S2H_TARGET_AVX2 __attribute__((target(S2H_ISA_AVX2)))
#else
#define S2H_TARGET_AVX512
#define S2H_TARGET_AVX2
#endif

// A region of code compiled for one ISA (e.g. a kernel template instantiated once per level).
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
