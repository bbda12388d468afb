"""Compile one or more .cu files for sm_90 with torch's headers, as CI does: `python tools/nvcc_check.py FILE...`."""
import os
import subprocess
import sys
import sysconfig
import time

from torch.utils.cpp_extension import include_paths

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
nvcc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
for src in sys.argv[1:]:
    flags = ["-std=c++20", "-O3", "--expt-relaxed-constexpr", "-gencode=arch=compute_90,code=sm_90",
             "-Xcompiler", "-fPIC", "-DS2H_WITH_CUDA=1", f"-I{os.path.join(root, 'csrc')}",
             f"-I{sysconfig.get_paths()['include']}"] + [f"-I{p}" for p in include_paths()]
    start = time.time()
    subprocess.run([nvcc, "-c", src, "-o", os.devnull] + flags, check=True)
    print(f"{src}: ok in {time.time() - start:.1f} s")
