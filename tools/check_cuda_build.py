"""Loads a CUDA build of s2h_kernels._C (no GPU needed) and checks every C++ op has a CUDA kernel.

Loading runs the TORCH_LIBRARY_IMPL(s2h, CUDA, ...) registrations, which check each kernel's
signature against its schema: a mismatch that compiles cleanly still fails here.
    python tools/check_cuda_build.py build/cuda-check/lib/s2h_kernels/_C*.so
"""
import sys

import torch

# CPU-only by design: on CUDA the sparse conv runs as F.unfold + s2h::spmm, and batch-1 Linear
# layers as s2h::spmm with N = 1 (s2h_kernels/spmm.py).
CPU_ONLY = {"s2h::spmm_conv2d", "s2h::spmv_sell"}

torch.ops.load_library(sys.argv[1])
ops = sorted(
    name for name in torch._C._dispatch_get_all_op_names() if name.startswith("s2h::") and "triton" not in name
)
missing = [
    op for op in ops if op not in CPU_ONLY and not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")
]
print(f"{len(ops)} s2h ops: {', '.join(ops)}")
if missing:
    raise SystemExit(f"ops without a CUDA kernel: {missing}")
print(f"every C++ op has a CUDA kernel (CPU-only by design: {sorted(CPU_ONLY)})")
