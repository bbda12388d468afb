// The micro-kernels of the sparse CPU ops (csrc/cpu/spmm_kernels.cpp), in the style of XNNPACK's
// SpMM: one output row times one tile of N columns. For every nonzero w = W[r, k] a kernel
// broadcasts w and FMAs it into V accumulator vectors with V vectors of the X row k: the tile
// lives in registers (AVX-512: up to 16 vectors, so N up to 256 runs in one pass, else 8-vector
// tiles; AVX2: 8 vectors), X is read once per nonzero and W once per tile. Short tiles keep enough
// independent FMA chains by splitting the nonzeros of a row over several accumulator sets. N == 1
// (a Linear layer at batch 1) uses a gather dot product.
//
// One set per ISA level (csrc/cpu/cpu_isa.h): AVX-512, AVX2+FMA and portable C++; float64 always
// runs the portable set, and so do CPUs other than x86-64. The vector tile kernel is written once,
// in spmm_tile.inc, and compiled per level.
#pragma once

#include <cstdint>

#include "cpu/cpu_isa.h"

namespace s2h::spmm {

// A "tile" call computes rows [r0, r1) of one tile of nv (<= tile width)
// columns:  y[r*ldy + i] = epilogue(sum_j vals[j] * xq[off[j] + i], bias[r], relu),  with the
// nonzeros of row r at j in [row_ptr[r], row_ptr[r+1]) and off indexed from nnz_base.
template <typename T>
struct TileArgs {
  const T* vals;
  const int32_t* rs;   // nonzeros of row r in this K panel: j in [rs[r], re[r])
  const int32_t* re;
  const int32_t* off;  // X element offset of each nonzero, off[j - nnz_base]
  int64_t nnz_base;
  int64_t r0, r1;
  const T* xq;  // X + batch offset + first column of the tile
  T* y;         // row r at y + r * ldy (r counted from 0, not r0)
  int64_t ldy;
  int64_t nv;   // valid columns in this tile
  const T* bias;
  bool relu;
  bool first;  // first K panel: start from the bias, else from the partial sums in y
  bool last;   // last K panel: apply the ReLU
  // Conv grid (AVX-512 only): vector v keeps the lanes in wmask[v] and stores them packed at
  // y + r*ldy + wdst[v] (compress on store, expand on reload).  Null: plain rows.
  const uint16_t* wmask;
  const int32_t* wdst;
  // Non-temporal stores (the output outgrows L2; plain rows, single K panel, 64-byte aligned
  // tiles): they skip the read-for-ownership of every output line, which dominates a 1x1 conv at
  // high sparsity (its output is many times its weights).
  bool stream = false;
};
template <typename T>
using TileFn = void (*)(const TileArgs<T>&);

// N == 1: y[r*ldy] = epilogue(sum_j vals[j] * x[col[j]], bias[r], relu) for r in [r0, r1).
template <typename T>
using DotFn = void (*)(const T* vals, const int32_t* row_ptr, const int32_t* col, int64_t r0, int64_t r1,
                       const T* x, T* y, int64_t ldy, const T* bias, bool relu);

template <typename T>
struct Kernels {
  int width;             // columns per vector
  int vmax;              // vectors per tile when N is large
  int vwide;             // most vectors in one tile: N up to width*vwide runs as a single tile
  TileFn<T> full[17];    // by vector count V = 1..vwide, every vector full
  TileFn<T> tail[17];    // by V, the last vector partial
  TileFn<T> wrap[17];    // by V, conv grid epilogue (null: compute into a buffer and copy out)
  DotFn<T> dot;
};

// The kernel set of an ISA level (the portable set for float64 and for levels without vector
// kernels).
template <typename T>
const Kernels<T>& kernels_for(cpu::Isa isa);

// Orders the streaming (non-temporal) stores of the x86 kernels before the caller reads y.
void fence_streaming_stores();

}  // namespace s2h::spmm
