// The schema of every s2h op, in one TORCH_LIBRARY block. Implementations register per device
// in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu; fake kernels and autograd are registered in Python
// (s2h_kernels/_registration.py, called from s2h_kernels/<op>.py). Keep one block per op, in the
// op's own section. The Python module s2h_kernels._C itself is csrc/module.cpp.
#include <torch/library.h>

TORCH_LIBRARY(s2h, m) {
  // ---- channel_masks (s2h_kernels/channel_masks.py) ----
  // hard_mode: 0 = threshold t = mean(w) (paper), 1 = ceil(E) rounded up to the divisor.
  // num_channels = sum_g buckets_g * divisors_g, passed in so fake kernels know w's size.
  m.def("channel_masks(Tensor u, Tensor offsets, Tensor divisors, float temperature, int hard_mode,"
        " SymInt num_channels) -> (Tensor w, Tensor expected, Tensor keep)");
  m.def("channel_masks_backward(Tensor grad_w, Tensor grad_expected, Tensor u, Tensor offsets,"
        " Tensor divisors, float temperature) -> Tensor");

  // ---- kl_gap / ca_kld (s2h_kernels/kl_gap.py, kl_gap_with_grads.py, ca_kld.py) ----
  // Per-row loss (float32 for 16-bit inputs) and both gradients of it, times grad_scale, in one pass.
  m.def("kl_gap(Tensor soft, Tensor hard, float temperature, float grad_scale=1.0)"
        " -> (Tensor loss, Tensor grad_soft, Tensor grad_hard)");
  // gamma=None: the teacher's mean top-1 probability (softmax of the raw logits) over the batch.
  m.def("ca_kld(Tensor student, Tensor teacher, float temperature, float? gamma, bool standardize,"
        " float eps, float grad_scale=1.0) -> (Tensor loss, Tensor grad_student, Tensor gamma)");

  // ---- spmm, spmv_sell, spmm_conv2d (s2h_kernels/spmm.py, spmm_conv2d.py) ----
  // W (M x K) as int32 CSR (row_ptr [M+1], col_idx [nnz]) + values [nnz]; y = act(W @ x + bias).
  // row_order (optional): the GPU row swizzle, rows by decreasing nnz; the CPU ignores it.
  m.def("spmm(Tensor values, Tensor row_ptr, Tensor col_idx, Tensor? row_order, Tensor x, Tensor? bias, bool relu)"
        " -> Tensor");
  // W @ x for one column x (a Linear layer at batch 1), W in the SELL-16 packing of
  // SparseWeight.sell(): y in the layout of x ((K,) -> (m,), (1, K) -> (1, m), (K, 1) -> (m, 1)).  CPU only.
  m.def("spmv_sell(Tensor values, Tensor cols, Tensor slice_ptr, Tensor rows, int m, Tensor x, Tensor? bias,"
        " bool relu) -> Tensor");
  // Direct sparse conv2d; W is the (M, C/groups*kh*kw) matrix in F.unfold column order.
  m.def("spmm_conv2d(Tensor values, Tensor row_ptr, Tensor col_idx, Tensor x, Tensor? bias, int[2] kernel_size,"
        " int[2] stride, int[2] padding, int[2] dilation, int groups, bool relu) -> Tensor");
}
