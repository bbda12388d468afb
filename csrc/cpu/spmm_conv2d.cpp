// CPU direct sparse conv2d, without im2col.  Schema in csrc/ops.cpp:
//
//   s2h::spmm_conv2d(values, row_ptr, col_idx, x, bias?, kernel_size, stride, padding,
//                    dilation, groups, relu)                        y = act(conv2d(x, W) + bias)
//
// The input is copied once into a zero-padded, stride-phase-split buffer (csrc/common/spmm.h,
// conv_tap_offset), every column of the packed (M, C/g*kh*kw) weight becomes an element offset
// into it, and the output is computed on the grid q = oh*wq + ow with contiguous loads along ow
// by the driver and micro-kernels of the matmul (csrc/cpu/spmm_driver.h); the AVX-512 epilogue
// compresses the grid columns ow < wo into the output rows (other ISAs copy them out).  1x1
// convs without padding read the input itself.  This file holds the input copy and the op.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/spmm.h"
#include "cpu/cpu_isa.h"
#include "cpu/spmm_driver.h"
#include "cpu/spmm_scratch.h"
#if S2H_X86
#include <immintrin.h>
#endif

// GCC flags the "undefined" lanes inside its own AVX-512 intrinsic headers.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace s2h::spmm {
namespace {

// Both width phases of one stride-2 row in one pass over it: d0[j] = s[2*j] for j < n0 and
// d1[j] = s[2*j + 1] for j < n1.  One copy per ISA (the compiler vectorises each; vpermt2ps on
// AVX-512), picked with the kernels' ISA so that S2H_CPU_ISA tests every one.
template <typename T>
using Stride2Fn = void (*)(const T* __restrict, T* __restrict, int64_t, T* __restrict, int64_t);
#define S2H_DEFINE_STRIDE2(NAME, ATTR)                                                           \
  template <typename T>                                                                          \
  ATTR void NAME(const T* __restrict s, T* __restrict d0, int64_t n0, T* __restrict d1, int64_t n1) { \
    const int64_t n = std::min(n0, n1);                                                          \
    for (int64_t j = 0; j < n; ++j) {                                                            \
      d0[j] = s[2 * j];                                                                          \
      d1[j] = s[2 * j + 1];                                                                      \
    }                                                                                            \
    for (int64_t j = n; j < n0; ++j) d0[j] = s[2 * j];                                           \
    for (int64_t j = n; j < n1; ++j) d1[j] = s[2 * j + 1];                                       \
  }
S2H_DEFINE_STRIDE2(copy_stride2_scalar, )
#if S2H_X86
S2H_DEFINE_STRIDE2(copy_stride2_avx512, S2H_TARGET_AVX512)
S2H_DEFINE_STRIDE2(copy_stride2_avx2, S2H_TARGET_AVX2)
#endif
#undef S2H_DEFINE_STRIDE2

template <typename T>
Stride2Fn<T> stride2_for(cpu::Isa isa) {
  using cpu::Isa;
#if S2H_X86
  if (isa == Isa::avx512) return copy_stride2_avx512<T>;
  if (isa == Isa::avx2) return copy_stride2_avx2<T>;
#endif
  return copy_stride2_scalar<T>;
}

// One input row into its padded row for stride 1, padding included, in whole vectors:
// d[j] = s[j - pw] where that is inside [0, w), else 0.  Masked loads read only the lanes inside
// the row (they do not fault on the others).  Faster than memset / memcpy per row (7-58
// elements) on 14x14 and 7x7 inputs; for stride 2 the same with a vpermt2ps per vector was slower
// than copy_stride2 (benchmarks/results/spmm_cpu.md).
template <typename T>
using PadRowFn = void (*)(const T* s, int64_t w, int64_t pw, T* d, int64_t wq);
#if S2H_X86
S2H_TARGET_BEGIN(S2H_ISA_AVX512)
// Lanes l of a 16-lane load at source index k0 with 0 <= k0 + l < w.
inline __mmask16 row_lanes(int64_t k0, int64_t w) {
  const int64_t lo = std::clamp<int64_t>(-k0, 0, 16), hi = std::clamp<int64_t>(w - k0, 0, 16);
  return static_cast<__mmask16>(((1u << hi) - 1u) & ~((1u << lo) - 1u));
}
inline __mmask16 first_lanes(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u); }

void pad_row_s1_avx512(const float* s, int64_t w, int64_t pw, float* d, int64_t wq) {
  for (int64_t j = 0; j < wq; j += 16) {
    const int64_t k0 = j - pw;
    _mm512_mask_storeu_ps(d + j, first_lanes(wq - j), _mm512_maskz_loadu_ps(row_lanes(k0, w), s + k0));
  }
}
S2H_TARGET_END
#endif

// The vector row filler for this dtype, ISA and stride, or null (the copy loops below).
template <typename T>
PadRowFn<T> pad_row_for(cpu::Isa isa, int64_t sw) {
  using cpu::Isa;
#if S2H_X86
  if constexpr (std::is_same_v<T, float>) {
    if (isa == Isa::avx512 && sw == 1) return pad_row_s1_avx512;
  }
#endif
  (void)isa, (void)sw;
  return nullptr;
}

// Copy x (B, C, H, W) into the zero-padded, stride-phase-split buffer of conv_tap_offset.
// Per-row geometry is hoisted out of the copy loops: on large stride-2 inputs the per-row
// divisions cost as much as the whole sparse product at high sparsity.
// Threads split (image, row) ranges for stride 1 (see the split below): the product then gives
// each thread contiguous output tiles (run: the static conv split), whose input rows that thread
// wrote itself and finds in its own L2.  Split by channel, half of every tile's input sat in the
// other core's L2.
template <typename T>
void fill_phases(const T* x, T* buf, int64_t batch, int64_t c, int64_t h, int64_t w, int64_t sh, int64_t sw,
                 int64_t ph, int64_t pw, int64_t wq, int64_t row0, int64_t prows) {
  // Width phase b: columns j in [j0[b], j1[b]) hold input column j*sw + b - pw, the rest is padding.
  std::vector<int64_t> j0(static_cast<size_t>(sw)), j1(static_cast<size_t>(sw));
  for (int64_t b = 0; b < sw; ++b) {
    j0[b] = std::min<int64_t>(wq, std::max<int64_t>(0, (pw - b + sw - 1) / sw));
    const int64_t last = w - 1 + pw - b;  // j*sw <= last
    j1[b] = last < 0 ? j0[b] : std::max<int64_t>(j0[b], std::min<int64_t>(wq, last / sw + 1));
  }
  const int64_t plane = prows * wq;  // phase rows [row0, row0 + prows) of every plane
  const Stride2Fn<T> copy_stride2 = stride2_for<T>(cpu::active_isa());
  const PadRowFn<T> pad_row = pad_row_for<T>(cpu::active_isa(), sw);
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, c * sh * sw * wq));
  // Rows [i0, i1) of channels [c0, c1) of image img, every stride phase.
  auto fill = [&](int64_t img, int64_t i0, int64_t i1, int64_t c0, int64_t c1) {
    for (int64_t ch = c0; ch < c1; ++ch) {  // channel-major: sequential writes within a plane
      const T* src = x + (img * c + ch) * h * w;
      T* dst = buf + (img * c + ch) * sh * sw * plane;
      for (int64_t a = 0; a < sh; ++a) {
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t r = conv_src_index(i, a, sh, ph, h);
          T* row = dst + a * sw * plane + (i - row0) * wq;  // width phase b at row + b * plane
          if (r < 0) {
            for (int64_t b = 0; b < sw; ++b) std::memset(row + b * plane, 0, sizeof(T) * wq);
            continue;
          }
          const T* sr = src + r * w;
          if (pad_row) {
            pad_row(sr, w, pw, row, wq);
            continue;
          }
          if (sw == 2) {
            // Phase b starts at input column lo*2 + b - pw, which is 0 or 1: the phase whose
            // columns are even and the one whose columns are odd come from one pass.
            const int64_t be = (pw % 2 == 0) ? 0 : 1;  // the phase of the even columns
            T* de = row + be * plane;
            T* dd = row + (1 - be) * plane;
            copy_stride2(sr, de + j0[be], j1[be] - j0[be], dd + j0[1 - be], j1[1 - be] - j0[1 - be]);
            for (int64_t b = 0; b < 2; ++b) {
              T* d = row + b * plane;
              for (int64_t j = 0; j < j0[b]; ++j) d[j] = T(0);
              for (int64_t j = j1[b]; j < wq; ++j) d[j] = T(0);
            }
            continue;
          }
          for (int64_t b = 0; b < sw; ++b) {
            T* d = row + b * plane;
            const int64_t lo = j0[b], hi = j1[b];
            const T* sp = sr + lo * sw + b - pw;
            std::memset(d, 0, sizeof(T) * lo);
            if (sw == 1) {
              std::memcpy(d + lo, sp, sizeof(T) * (hi - lo));
            } else {
              for (int64_t j = 0; j < hi - lo; ++j) d[lo + j] = sp[j * sw];
            }
            std::memset(d + hi, 0, sizeof(T) * (wq - hi));
          }
        }
      }
    }
  };
  // Stride 1: threads split (image, row) ranges, matching the contiguous runs of output tiles
  // the product gives each thread.  Strided: (image, channel) ranges.  Each thread's rows end
  // mid cache line in every phase plane, and with 4 planes per channel the lines both threads
  // write cost more than the locality gains (measured both ways: benchmarks/results/spmm_cpu.md).
  if (sh * sw > 1) {
    at::parallel_for(0, batch * c, 1, [&](int64_t begin, int64_t end) {
      for (int64_t img = begin / c; img * c < end; ++img)
        fill(img, row0, row0 + prows, std::max(begin - img * c, int64_t(0)), std::min(end - img * c, c));
    });
    return;
  }
  at::parallel_for(0, batch * prows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t img = begin / prows; img * prows < end; ++img)
      fill(img, row0 + std::max(begin - img * prows, int64_t(0)), row0 + std::min(end - img * prows, prows), 0, c);
  });
}

at::Tensor spmm_conv2d_cpu(const at::Tensor& values, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                           const at::Tensor& x_in, const c10::optional<at::Tensor>& bias_in, at::IntArrayRef kernel_size,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                           bool relu) {
  TORCH_CHECK(x_in.dim() == 4, "spmm_conv2d: x must be 4-D (B, C, H, W), got shape ", x_in.sizes());
  check_csr(values, row_ptr, col_idx, bias_in, x_in, "spmm_conv2d");
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "spmm_conv2d: kernel_size, stride, padding and dilation must have 2 entries");
  const int64_t kh = kernel_size[0], kw = kernel_size[1], sh = stride[0], sw = stride[1];
  const int64_t ph = padding[0], pw = padding[1], dh = dilation[0], dw = dilation[1];
  TORCH_CHECK(kh > 0 && kw > 0 && sh > 0 && sw > 0 && dh > 0 && dw > 0 && ph >= 0 && pw >= 0,
              "spmm_conv2d: kernel_size, stride and dilation must be positive and padding non-negative");
  const int64_t m = row_ptr.numel() - 1;
  const int64_t batch = x_in.size(0), c = x_in.size(1), h = x_in.size(2), w = x_in.size(3);
  TORCH_CHECK(groups > 0 && c % groups == 0 && m % groups == 0, "spmm_conv2d: groups=", groups,
              " must divide the input channels (", c, ") and the output channels (", m, ")");
  const int64_t cg = c / groups;
  const int64_t ho = conv_out_size(h, kh, sh, ph, dh), wo = conv_out_size(w, kw, sw, pw, dw);
  TORCH_CHECK(ho > 0 && wo > 0, "spmm_conv2d: input ", x_in.sizes(), " is too small for the kernel");
  at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty({batch, m, ho, wo}, x.options());
  at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  if (batch == 0 || m == 0) return y;
  const int64_t kcols = cg * kh * kw;

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "spmm_conv2d", [&] {
    Problem<scalar_t> p{};
    p.vals = values.data_ptr<scalar_t>();
    p.row_ptr = row_ptr.data_ptr<int32_t>();
    p.col = col_idx.data_ptr<int32_t>();
    p.m = m;
    p.batch = batch;
    p.y = y.data_ptr<scalar_t>();
    p.y_bstride = m * ho * wo;
    p.ldy = ho * wo;
    p.bias = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
    p.relu = relu;
    p.group_rows = m / groups;
    p.k = kcols;
    p.col_group = kh * kw;
    std::vector<int64_t> tab(static_cast<size_t>(kcols));
    at::Tensor buf;
    if (kh == 1 && kw == 1 && ph == 0 && pw == 0) {
      // 1x1: the input itself (strided convs read a subsampled copy); no padding, no grid wrap.
      at::Tensor xs = (sh == 1 && sw == 1) ? x : x.slice(2, 0, h, sh).slice(3, 0, w, sw).contiguous();
      buf = xs;
      const int64_t hw = ho * wo;
      for (int64_t k = 0; k < kcols; ++k) tab[k] = k * hw;
      p.x = buf.data_ptr<scalar_t>();
      p.x_bstride = c * hw;
      p.group_stride = cg * hw;
      p.n = hw;
    } else {
      const int64_t hq = conv_phase_size(h, sh, ph), wq = conv_phase_size(w, sw, pw);
      const int64_t per_item = c * sh * sw * hq * wq;
      // Tap offsets into planes of `rows` phase rows, starting at phase row row0: the taps of
      // channel 0, then a channel stride (no divisions per column: with hundreds of channels the
      // per-column formula was a visible share of a call).
      auto tap_table = [=](int64_t* t, int64_t row0, int64_t rows) {
        const int64_t taps = std::min(kh * kw, kcols), chan = sh * sw * rows * wq;  // kcols = 0: no channels
        for (int64_t j = 0; j < taps; ++j) t[j] = conv_tap_offset(j, kh, kw, sh, sw, dh, dw, rows, wq) - row0 * wq;
        for (int64_t j = taps; j < kcols; ++j) t[j] = t[j - taps] + chan;
      };
      // The padded phase rows [row0, row0 + rows) of `items` images into a scratch buffer (the
      // calling thread's), with the tap table `t` and into's pointers made to match.
      const scalar_t* xp = x.data_ptr<scalar_t>();
      const at::TensorOptions opts = x.options();
      auto copy_input = [=](Problem<scalar_t>& into, int64_t items, int64_t row0, int64_t rows, int64_t* t) {
        // Slack after the last item: grid columns ow >= wo may read up to wq elements past a
        // phase, and the AVX-512 grid kernels load whole vectors past the grid end (< 16).
        const int64_t item = c * sh * sw * rows * wq, slack = wq + 64;
        into.input = x_scratch<scalar_t>({items * item + slack}, {1}, items * item + slack, opts);
        scalar_t* b = into.input.data_ptr<scalar_t>();
        fill_phases<scalar_t>(xp, b, items, c, h, w, sh, sw, ph, pw, wq, row0, rows);
        std::fill(b + items * item, b + items * item + slack, scalar_t(0));
        tap_table(t, row0, rows);
        into.x = b;
        into.tab = t;
        into.x_bstride = item;
        into.group_stride = cg * sh * sw * rows * wq;
      };
      int64_t* shared_tab = tab.data();
      p.shared_input = [=](Problem<scalar_t>& shared) { copy_input(shared, batch, 0, hq, shared_tab); };
      // Phase rows that output rows [oh0, oh1] read: up to the taps' largest row shift below.
      const int64_t shift_h = (kh - 1) * dh / sh;
      p.own_input = [=](int64_t q0, int64_t q1, Problem<scalar_t>& local) {
        const int64_t row0 = q0 / wq, rows = std::min(hq, (q1 - 1) / wq + shift_h + 1) - row0;
        thread_local std::vector<int64_t> own_tab;
        own_tab.resize(static_cast<size_t>(kcols));
        copy_input(local, 1, row0, rows, own_tab.data());
      };
      p.x = nullptr;  // x and tab's contents: set by shared_input or own_input
      p.x_bstride = per_item;
      p.group_stride = cg * sh * sw * hq * wq;
      p.n = ho * wq;
      p.group_phases = std::min(sh, kh) * std::min(sw, kw);
      p.group_span = ((kh - 1) * dh / sh) * wq + (kw - 1) * dw / sw;
      if (wq != wo) {
        p.wq = wq;
        p.wo = wo;
      }
    }
    TORCH_CHECK(p.x_bstride + p.n <= INT32_MAX, "spmm_conv2d: one input image is too large for 32-bit offsets");
    p.tab = tab.data();
    run(p);
  });
  return y;
}

}  // namespace
}  // namespace s2h::spmm

TORCH_LIBRARY_IMPL(s2h, CPU, m) {
  m.impl("spmm_conv2d", &s2h::spmm::spmm_conv2d_cpu);
}
