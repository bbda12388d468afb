"""Builds s2h_kernels._C: the C++ CPU kernels always, the CUDA kernels when a toolkit is found.

Environment:
  S2H_SKIP_CUDA=1      build CPU kernels only, even when nvcc is present
  S2H_CUDA_ARCHS       ';'-separated compute capabilities, default "8.0;9.0"; entries like
                       "9.0a" and "9.0+PTX" are accepted (falls back to TORCH_CUDA_ARCH_LIST)
  MAX_JOBS             parallel compile jobs for ninja
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

# torch derives CUDA_HOME from `which nvcc` when unset; a wrapper script on PATH (as in
# /usr/local/bin/nvcc here) then points it at a directory without libcudart. Prefer the toolkit.
if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

# torch adds no -gencode flags of its own once ours are present, so the binary holds exactly these.
DEFAULT_ARCHS = "8.0;9.0"


def cuda_toolkit_found() -> bool:
    if os.environ.get("S2H_SKIP_CUDA", "0") == "1":
        return False
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return True
    return shutil.which("nvcc") is not None or os.path.exists("/usr/local/cuda/bin/nvcc")


def gencode_flags(archs: str) -> list[str]:
    """-gencode flags for exactly the listed architectures ("9.0a", "8.0+PTX" allowed)."""
    flags = []
    for entry in archs.replace(",", ";").split(";"):
        entry = entry.strip()
        if not entry:
            continue
        ptx = entry.endswith("+PTX")
        arch = entry.removesuffix("+PTX")
        num = arch.replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    if not flags:
        raise ValueError(f"S2H_CUDA_ARCHS={archs!r} names no architecture")
    return flags


def extension():
    root = os.path.dirname(os.path.abspath(__file__))
    include = [os.path.join(root, "csrc")]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # No -march=native: wheels run on other machines. ISA-specific code is compiled per
    # function with target attributes (or `#pragma GCC target` regions) and chosen at run time.
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-fno-trapping-math"]
    link = ["-fopenmp"]
    if cuda_toolkit_found():
        archs = os.environ.get("S2H_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS
        sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
        nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"] + gencode_flags(archs)
        return CUDAExtension(
            "s2h_kernels._C", sources, include_dirs=include,
            define_macros=[("S2H_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link,
        )
    return CppExtension(
        "s2h_kernels._C", sources, include_dirs=include,
        extra_compile_args={"cxx": cxx}, extra_link_args=link,
    )


setup(
    name="s2h",
    version="0.1.0",
    description="Fused kernels and a thin training layer for S2HPruner and teacher-guided one-shot pruning",
    packages=find_packages(include=["s2h", "s2h.*", "s2h_kernels", "s2h_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "torchvision", "torch-pruning", "tqdm", "matplotlib", "scikit-learn"],
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["s2h=s2h.cli:main"]},
)
