// Tuning knobs of the sparse CPU kernels (csrc/cpu/spmm_*.cpp): S2H_SPMM_* environment variables,
// for tests and measurements. Read once, on first use, into one struct (reload_cpu_config() in
// csrc/cpu/cpu_isa.h re-reads them); a variable that is unset or empty keeps the default. The
// defaults are the measured choices (benchmarks/results/spmm_cpu.md).
#pragma once

#include <cstdint>
#include <optional>

namespace s2h::spmm {

struct SpmmTuning {
  // S2H_SPMM_TILE_V: vectors per column tile (default: all of N when it fits in the ISA's widest
  // tile, else the ISA's usual tile).
  std::optional<int64_t> tile_v;
  int64_t l1 = 32 * 1024;         // S2H_SPMM_L1: bytes of X rows a K panel may keep in L1
  int64_t partials = 64 * 1024;   // S2H_SPMM_PARTIALS: largest partial sums of a thread's rows (matmul panels)
  std::optional<int64_t> pmin;    // S2H_SPMM_PMIN: nonzeros per row and panel that pay a panel (6 conv, 12 matmul)
  int64_t work = 1 << 14;         // S2H_SPMM_WORK: work per thread before going parallel
  int64_t sell_work = 1 << 14;    // S2H_SPMM_SELL_WORK: packed entries per thread before spmv_sell goes parallel
  int64_t sell_loads = -1;        // S2H_SPMM_SELL_LOADS: spmv_sell loads x lane by lane (1) or gathers (0); -1: on AMD
  int64_t chunks = 4;             // S2H_SPMM_CHUNKS: chunks per thread of the dynamic split
  int64_t align = 16;             // S2H_SPMM_ALIGN: reuse (nnz / K) that pays the aligned copy of X
  int64_t tail_dot = 2;           // S2H_SPMM_TAIL_DOT: tail columns (N % 16) the dot kernel takes
  int64_t tail_x = 512 * 1024;    // S2H_SPMM_TAIL_X: X bytes from which it takes them at any N
  int64_t stream = 2 << 20;       // S2H_SPMM_STREAM: output bytes from which stores bypass the caches
  int64_t keep_scratch = 64 << 20;  // S2H_SPMM_KEEP_SCRATCH: largest copy buffer kept per thread
  bool conv_static = true;        // S2H_SPMM_CONV_STATIC=0: convs split tiles dynamically, like matmuls
};

// The knobs, read from the environment on first use. Cheap: one atomic load.
const SpmmTuning& tuning();

// Re-reads the knobs (called by s2h::cpu::reload_cpu_config).
void reload_tuning();

}  // namespace s2h::spmm
