// Shared by the CPU (.cpp) and CUDA (.cu) sources: the per-element and per-row math lives in
// S2H_HD inline functions, so the math CUDA runs is the math the CPU tests check.
#pragma once

#if defined(__CUDACC__)
#define S2H_HD __host__ __device__ __forceinline__
#else
#define S2H_HD inline
#endif

// S2H_HD, and always inlined on the host: vectorised CPU loops need every call in them inlined,
// and GCC's heuristics give up on these inside the per-ISA (target-attribute) functions.
#if defined(__CUDACC__)
#define S2H_HD_INLINE S2H_HD
#else
#define S2H_HD_INLINE S2H_HD __attribute__((always_inline))
#endif

// The CPU kernels are compiled per x86 ISA (AVX-512, AVX2 + FMA, baseline) and chosen at run
// time on x86-64.  Other CPUs (aarch64: Grace Hopper, Graviton, Apple silicon) build only the
// portable kernels, which the compiler vectorises for the target's baseline (NEON on aarch64).
#if defined(__x86_64__) || defined(_M_X64)
#define S2H_X86 1
#else
#define S2H_X86 0
#endif
