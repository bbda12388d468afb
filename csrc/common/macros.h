// Shared by the CPU (.cpp) and CUDA (.cu) sources: the per-element and per-row math lives in
// S2H_HD inline functions, so the math CUDA runs is the math the CPU tests check.
#pragma once

#if defined(__CUDACC__)
#define S2H_HD __host__ __device__ __forceinline__
#else
#define S2H_HD inline
#endif

// S2H_HD, and always inlined on the host: vectorised CPU loops need every call in them inlined,
// and GCC's heuristics give up on these inside the per-ISA (target_clones) functions.
#if defined(__CUDACC__)
#define S2H_HD_INLINE S2H_HD
#else
#define S2H_HD_INLINE S2H_HD __attribute__((always_inline))
#endif
