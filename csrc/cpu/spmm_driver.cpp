// The driver of the sparse CPU ops (design: csrc/cpu/spmm_driver.h): tile width, K panels, the
// split between threads, and the walk over tiles and panels that calls the micro-kernels.
#include "cpu/spmm_driver.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <type_traits>

#include "common/spmm.h"
#include "cpu/cpu_isa.h"
#include "cpu/spmm_kernels.h"
#include "cpu/spmm_scratch.h"
#include "cpu/spmm_tuning.h"

namespace s2h::spmm {
namespace {

// X offsets of the nonzeros of rows [r0, r1), off[j - row_ptr[r0]]: col * ldx for a matmul, the
// tap table's offset (plus the group's) for a conv.
template <typename T>
void nonzero_offsets(const Problem<T>& p, int64_t r0, int64_t r1, int32_t* off) {
  const int64_t nnz0 = p.row_ptr[r0], nnz1 = p.row_ptr[r1];
  if (p.tab == nullptr) {
    for (int64_t j = nnz0; j < nnz1; ++j) off[j - nnz0] = static_cast<int32_t>(p.col[j] * p.ldx);
    return;
  }
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t base = (r / p.group_rows) * p.group_stride;
    for (int64_t j = p.row_ptr[r]; j < p.row_ptr[r + 1]; ++j) off[j - nnz0] = static_cast<int32_t>(p.tab[p.col[j]] + base);
  }
}

// K panels: pp[q*rows + (r - r0)] = first nonzero of row r with column >= q*panel_cols, and
// pp[panels*rows + (r - r0)] its end.
template <typename T>
void panel_starts(const Problem<T>& p, int64_t r0, int64_t r1, int64_t panels, int64_t panel_cols, int32_t* pp) {
  const int64_t rows = r1 - r0;
  for (int64_t r = r0; r < r1; ++r) {
    int64_t j = p.row_ptr[r];
    const int64_t e = p.row_ptr[r + 1];
    for (int64_t q = 0; q < panels; ++q) {
      const int64_t lo = q * panel_cols;
      while (j < e && p.col[j] < lo) ++j;
      pp[q * rows + (r - r0)] = static_cast<int32_t>(j);
    }
    pp[panels * rows + (r - r0)] = static_cast<int32_t>(e);
  }
}

// Conv grid, native epilogue: per vector of the tile at grid column q0 (nv valid columns), the
// lanes of q = oh*wq + ow with ow < wo and where the first of them is stored (oh*wo + ow).
template <typename T>
void grid_lanes(const Problem<T>& p, int width, int64_t q0, int64_t nv, int64_t nvec, uint16_t* wmask, int32_t* wdst) {
  for (int64_t v = 0; v < nvec; ++v) {
    uint32_t mask = 0;
    int32_t dst = -1;
    for (int64_t l = 0; l < width; ++l) {
      const int64_t q = q0 + v * width + l;
      if (q >= q0 + nv) break;
      const int64_t oh = q / p.wq, ow = q - oh * p.wq;
      if (ow < p.wo) {
        mask |= 1u << l;
        if (dst < 0) dst = static_cast<int32_t>(oh * p.wo + ow);
      }
    }
    wmask[v] = static_cast<uint16_t>(mask);
    wdst[v] = dst < 0 ? 0 : dst;
  }
}

// Conv grid, other ISAs: the columns ow < wo of the tile buffer's rows [r0, r1) into the output.
template <typename T>
void copy_out_grid(const Problem<T>& p, const T* tile, int64_t tc, int64_t r0, int64_t r1, T* yb, int64_t q0,
                   int64_t nv) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* src = tile + (r - r0) * tc;
    T* dst = yb + r * p.ldy;
    int64_t q = q0;
    const int64_t qe = q0 + nv;
    while (q < qe) {
      const int64_t oh = q / p.wq, ow = q - oh * p.wq;
      const int64_t seg = std::min(p.wq - ow, qe - q);  // up to the end of this grid row
      if (ow < p.wo) std::memcpy(dst + oh * p.wo + ow, src + (q - q0), sizeof(T) * std::min(seg, p.wo - ow));
      q += seg;
    }
  }
}

// Rows [r0, r1) x the tiles of the (batch x column-tile) grid that next_tiles(t0, t1) hands out
// (ranges, until it returns false).
template <typename T, typename NextTiles>
void run_part(const Problem<T>& p, const Kernels<T>& k, int64_t tc, int64_t panel_cols, int64_t r0, int64_t r1,
              NextTiles&& next_tiles) {
  if (r0 >= r1) return;
  const int64_t nnz0 = p.row_ptr[r0], nnz1 = p.row_ptr[r1];
  const int64_t ntiles = (p.n + tc - 1) / tc;

  if (p.n == 1 && p.batch == 1 && p.tab == nullptr && p.ldx == 1) {  // Linear at batch 1
    int64_t t0, t1;
    while (next_tiles(t0, t1)) k.dot(p.vals, p.row_ptr, p.col, r0, r1, p.x, p.y, p.ldy, p.bias, p.relu);
    return;
  }

  Scratch<T>& s = scratch<T>();
  s.off.resize(static_cast<size_t>(std::max<int64_t>(nnz1 - nnz0, 1)));
  nonzero_offsets(p, r0, r1, s.off.data());
  const int64_t rows = r1 - r0;
  const int64_t panels = std::max<int64_t>(1, (p.k + panel_cols - 1) / panel_cols);  // K == 0: one empty panel
  if (panels > 1) {
    s.pp.resize(static_cast<size_t>((panels + 1) * rows));
    panel_starts(p, r0, r1, panels, panel_cols, s.pp.data());
  }
  const bool wrap = p.wq > 0;
  const bool wrap_native = wrap && k.wrap[1] != nullptr;
  if (wrap && !wrap_native) s.tile.resize(static_cast<size_t>(rows * tc));
  uint16_t wmask[16];
  int32_t wdst[16];
  const int64_t y_bytes = p.batch * (p.y_bstride > 0 ? p.y_bstride : p.m * p.ldy) * (int64_t)sizeof(T);
  const bool stream = panels == 1 && !wrap && p.ldy % 16 == 0 && y_bytes >= tuning().stream;

  TileArgs<T> a{};
  a.vals = p.vals;
  a.off = s.off.data();
  a.nnz_base = nnz0;
  a.r0 = r0;
  a.r1 = r1;
  a.bias = p.bias;
  a.relu = p.relu;
  int64_t t0, t1;
  while (next_tiles(t0, t1))
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = t / ntiles, q0 = (t - b * ntiles) * tc;
    const int64_t nv = std::min(tc, p.n - q0);
    const int64_t nvec = (nv + k.width - 1) / k.width;
    TileFn<T> fn = (nv % k.width == 0) ? k.full[nvec] : k.tail[nvec];
    a.xq = p.x + b * p.x_bstride + q0;
    a.nv = nv;
    T* yb = p.y + b * p.y_bstride;
    if (!wrap) {
      a.y = yb + q0;
      a.ldy = p.ldy;
    } else if (wrap_native) {  // lanes of the grid stored packed at oh*wo + ow
      grid_lanes(p, k.width, q0, nv, nvec, wmask, wdst);
      a.wmask = wmask;
      a.wdst = wdst;
      a.y = yb;
      a.ldy = p.ldy;
      fn = k.wrap[nvec];
    } else {  // compute into the per-thread tile buffer, keep the columns ow < wo afterwards
      a.y = s.tile.data() - r0 * tc;
      a.ldy = tc;
    }
    for (int64_t q = 0; q < panels; ++q) {
      if (panels == 1) {
        a.rs = p.row_ptr;
        a.re = p.row_ptr + 1;
      } else {
        a.rs = s.pp.data() + q * rows - r0;
        a.re = s.pp.data() + (q + 1) * rows - r0;
      }
      a.first = q == 0;
      a.last = q == panels - 1;
      a.stream = stream && reinterpret_cast<uintptr_t>(a.y) % 64 == 0;
      fn(a);
    }
    if (wrap && !wrap_native) copy_out_grid(p, s.tile.data(), tc, r0, r1, yb, q0, nv);
  }
}

// How run() cuts a problem: the tile width, the K panel, and the split between threads.
struct Plan {
  int64_t tc;          // columns per tile
  int64_t ntiles;      // tiles over all batch items
  int64_t parts;       // threads that work (1: no parallel region)
  bool by_rows;        // threads split the rows (nnz-balanced chunks) ...
  bool by_tiles;       // ... or the tiles (every thread all rows)
  int64_t panel_cols;  // columns of W per K panel (all of K: no panels)
};

template <typename T>
Plan plan(const Problem<T>& p, const Kernels<T>& k, const SpmmTuning& cfg) {
  Plan pl{};
  // Tile: all of N when it fits in vwide vectors (one pass over the rows: every nonzero reads
  // its X row once, whole), else vmax vectors.
  const int64_t nvec_all = (p.n + k.width - 1) / k.width;
  const int64_t vtile = cfg.tile_v.value_or(nvec_all <= k.vwide ? nvec_all : k.vmax);
  pl.tc = k.width * std::min<int64_t>(k.vwide, std::max<int64_t>(1, vtile));
  pl.ntiles = p.batch * ((p.n + pl.tc - 1) / pl.tc);
  const int64_t nnz = p.row_ptr[p.m];
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // Work of the whole problem in "nonzero x tile" units; tiny problems stay on one thread (the
  // threshold keeps OpenMP's cost per parallel region small against the work).
  const int64_t work = (nnz + 4 * p.m) * pl.ntiles * std::min<int64_t>(p.n, pl.tc);
  pl.parts = std::min<int64_t>(threads, std::max<int64_t>(1, work / cfg.work));
  // Rows (nnz-balanced ranges, every thread walks all tiles) or tiles (every thread all rows).
  // Per thread, rows read all of X and 1/parts of W from memory, tiles 1/parts of X and all of
  // W (W is re-read per tile from L2 either way): split the tiles when X outweighs W and there
  // are enough of them to balance, or when there are too few rows.
  const int64_t x_bytes = (p.x_bstride > 0 ? p.batch * p.x_bstride : p.k * p.ldx) * (int64_t)sizeof(T);
  const int64_t w_bytes = nnz * (int64_t)(sizeof(T) + sizeof(int32_t));
  pl.by_tiles = pl.parts > 1 &&
                ((pl.ntiles >= 3 * pl.parts && (p.m < 8 * pl.parts || x_bytes > w_bytes)) || p.m < pl.parts);
  pl.by_rows = pl.parts > 1 && !pl.by_tiles;
  if (pl.by_rows) pl.parts = std::min(pl.parts, p.m);
  const int64_t rows_per_thread = pl.by_rows ? (p.m + pl.parts - 1) / pl.parts : p.m;

  // K panels: the X rows of one tile for a range of columns sized to stay in L1, all rows of a
  // thread walked per panel with their partial sums kept in y.  Worth it while a row still has
  // enough nonzeros per panel and (for a plain matmul) the partial sums of the thread's rows
  // stay near L1; a conv gains more (the kh*kw taps of a channel share its lines).
  pl.panel_cols = std::max<int64_t>(p.k, 1);
  const bool conv = p.col_group > 1;  // kh*kw > 1 taps per input channel
  const int64_t tile_bytes = std::min(pl.tc, p.n) * (int64_t)sizeof(T);
  const int64_t per_group = p.group_phases * (std::min(pl.tc, p.n) + p.group_span) * (int64_t)sizeof(T);
  const int64_t cols = std::max<int64_t>(1, cfg.l1 / std::max<int64_t>(per_group, 1)) * p.col_group;
  const double per_row_panel = (double)nnz / p.m * (double)cols / std::max<int64_t>(p.k, 1);
  // Plain matmul: only when the X rows of a tile do not stay near L1 anyway and the partial sums
  // of the thread's rows are small (on ResNet GEMMs panels help small row counts at moderate
  // sparsity and hurt large ones, more so at high sparsity: benchmarks/results/spmm_cpu.md).
  const bool partials_fit = conv || (rows_per_thread * tile_bytes <= cfg.partials && p.k * tile_bytes > 256 * 1024);
  const int64_t pmin = cfg.pmin.value_or(conv ? 6 : 12);
  if (cols < p.k && partials_fit && per_row_panel >= (double)pmin) pl.panel_cols = cols;
  return pl;
}

// Dynamic scheduling hands out tiles in ranges; a single range, once.
auto once(int64_t lo, int64_t hi) {
  return [lo, hi, done = false](int64_t& t0, int64_t& t1) mutable {
    if (done || lo >= hi) return false;
    t0 = lo, t1 = hi, done = true;
    return true;
  };
}

}  // namespace

template <typename T>
void run(Problem<T> p) {
  const Kernels<T>& k = kernels_for<T>(std::is_same_v<T, float> ? cpu::active_isa() : cpu::Isa::scalar);
  const SpmmTuning& cfg = tuning();
  const Plan pl = plan(p, k, cfg);
  const int64_t tc = pl.tc, ntiles = pl.ntiles, parts = pl.parts, panel_cols = pl.panel_cols;
  if (p.m == 0 || ntiles == 0) return;
  // Convs split by tiles: one contiguous run of tiles per thread (see below).
  const bool conv_runs = pl.by_tiles && p.tab != nullptr && p.x_bstride > 0 && cfg.conv_static;
  const bool own = p.own_input && conv_runs && p.batch == 1;
  // By rows every thread reads all of the input: at batch 1 each makes its whole copy itself
  // (faster than one shared copy, whose lines both cores read and every call has to take back).
  const bool own_rows = p.own_input && pl.by_rows && p.batch == 1;
  if (!own && !own_rows && p.shared_input) p.shared_input(p);
  if (parts <= 1) {
    run_part(p, k, tc, panel_cols, 0, p.m, once(0, ntiles));
    fence_streaming_stores();
    return;
  }
  // Dynamic scheduling over nnz-balanced chunks (several per thread): a thread that the OS
  // preempts (a busy machine) delays the call by one chunk, not by half of it.
  const int64_t per_thread = std::max<int64_t>(1, cfg.chunks);
  std::atomic<int64_t> counter{0};
  if (pl.by_rows) {
    const int64_t chunks = std::min(p.m, parts * per_thread);
    at::parallel_for(0, parts, 1, [&](int64_t, int64_t) {
      Problem<T> local = p;
      if (own_rows) p.own_input(0, p.n, local);
      for (int64_t c; (c = counter.fetch_add(1)) < chunks;)
        run_part(local, k, tc, panel_cols, split_rows(p.row_ptr, p.m, chunks, c, 4),
                 split_rows(p.row_ptr, p.m, chunks, c + 1, 4), once(0, ntiles));
      fence_streaming_stores();
    });
  } else if (conv_runs) {
    // Conv: thread i takes the i-th contiguous run of tiles, about the output rows whose input
    // rows it copied in fill_phases (the same contiguous split when parts equals the thread
    // count), so most of its X is in its own L2.  1x1 convs read the input itself; contiguous
    // runs cost them nothing.
    // At batch 1 each thread also copies the input rows of its tiles itself (own_input): a
    // shared copy has lines that both threads read, and every call's copy then has to take them
    // back from the other core (on Zen 4 that made a 2-thread stride-2 copy as slow per thread
    // as the whole copy on one thread).  The halo rows (the taps' row shift) are copied by both
    // threads.
    at::parallel_for(0, parts, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t t0 = i * ntiles / parts, t1 = (i + 1) * ntiles / parts;
        if (!own) {
          run_part(p, k, tc, panel_cols, 0, p.m, once(t0, t1));
        } else if (t0 < t1) {
          Problem<T> local = p;
          p.own_input(t0 * tc, std::min(t1 * tc, p.n), local);
          run_part(local, k, tc, panel_cols, 0, p.m, once(t0, t1));
        }
      }
      fence_streaming_stores();
    });
  } else {
    const int64_t step = std::max<int64_t>(1, ntiles / (parts * per_thread));
    at::parallel_for(0, parts, 1, [&](int64_t, int64_t) {
      run_part(p, k, tc, panel_cols, 0, p.m, [&](int64_t& t0, int64_t& t1) {
        t0 = counter.fetch_add(step);
        if (t0 >= ntiles) return false;
        t1 = std::min(ntiles, t0 + step);
        return true;
      });
      fence_streaming_stores();
    });
  }
}

template void run<float>(Problem<float>);
template void run<double>(Problem<double>);

void check_csr(const at::Tensor& values, const at::Tensor& row_ptr, const at::Tensor& col_idx,
               const std::optional<at::Tensor>& bias, const at::Tensor& x, const char* op) {
  TORCH_CHECK(row_ptr.dim() == 1 && row_ptr.numel() >= 1 && row_ptr.scalar_type() == at::kInt, op,
              ": row_ptr must be a 1-D int32 tensor of M+1 entries, got ", row_ptr.sizes(), " ", row_ptr.scalar_type());
  TORCH_CHECK(col_idx.dim() == 1 && col_idx.scalar_type() == at::kInt, op, ": col_idx must be a 1-D int32 tensor, got ",
              col_idx.sizes(), " ", col_idx.scalar_type());
  TORCH_CHECK(values.dim() == 1 && values.numel() == col_idx.numel(), op, ": values must be 1-D with nnz = ",
              col_idx.numel(), " entries, got ", values.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": x must be float32 or float64 on the CPU, got ", x.scalar_type());
  TORCH_CHECK(values.scalar_type() == x.scalar_type(), op, ": values (", values.scalar_type(), ") and x (",
              x.scalar_type(), ") must have the same dtype");
  TORCH_CHECK(values.is_contiguous() && row_ptr.is_contiguous() && col_idx.is_contiguous(), op,
              ": values, row_ptr and col_idx must be contiguous");
  const int64_t m = row_ptr.numel() - 1;
  const int32_t* rp = row_ptr.data_ptr<int32_t>();
  TORCH_CHECK(rp[m] == col_idx.numel() && rp[0] == 0, op,
              ": row_ptr must start at 0 and end at nnz = ", col_idx.numel());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->numel() == m, op, ": bias must have M = ", m, " entries, got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias dtype ", bias->scalar_type(), " != x dtype ",
                x.scalar_type());
  }
}

}  // namespace s2h::spmm
