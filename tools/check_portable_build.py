"""Compiles the C++ sources with the compilers setup.py does not use here: clang on x86-64 and GCC
for aarch64 (Grace Hopper, Graviton).

* clang ignores `#pragma GCC target`, so the per-ISA regions of the CPU kernels need their clang
  spelling (S2H_TARGET_BEGIN, csrc/cpu/spmm_isa.h); a missing one shows only as a clang error.
* aarch64 has no x86 intrinsics, target attributes or __builtin_cpu_supports names: everything
  x86 must sit behind S2H_X86 (csrc/common/macros.h), leaving the portable kernels.

Each source is compiled to an object (code generation included: clang reports target-feature
errors only there) with the flags of setup.py, against this environment's torch headers.

    python tools/check_portable_build.py [--install]

--install: where a compiler is missing, install it with apt-get (Debian: clang, libomp-dev,
g++-aarch64-linux-gnu) when running as root.  A compiler that is still missing is reported as
SKIPPED; a source that does not compile fails the check.
"""
import argparse
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

from torch.utils.cpp_extension import include_paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what setup.py compiles without CUDA: csrc/*.cpp (ops.cpp, module.cpp) and csrc/cpu/*.cpp
SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp"))) + sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
FLAGS = ["-std=c++20", "-O2", "-fopenmp", "-fno-trapping-math", "-fPIC", "-DTORCH_API_INCLUDE_EXTENSION_H",
         "-DTORCH_EXTENSION_NAME=_C"]
# name: (compiler, Debian packages)
COMPILERS = {
    "clang x86-64": ("clang++", ["clang", "libomp-dev"]),
    "gcc aarch64": ("aarch64-linux-gnu-g++", ["g++-aarch64-linux-gnu"]),
}


def install(packages):
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], env=env, check=False, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages], env=env, check=False,
                   timeout=900)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--install", action="store_true", help="apt-get install missing compilers (as root)")
    args = parser.parse_args()
    includes = [f"-I{p}" for p in [os.path.join(ROOT, "csrc"), *include_paths(), sysconfig.get_paths()["include"]]]
    failed, skipped = [], []
    with tempfile.TemporaryDirectory() as out:
        for name, (cxx, packages) in COMPILERS.items():
            if shutil.which(cxx) is None and args.install:
                install(packages)
            if shutil.which(cxx) is None:
                skipped.append(f"{name} ({cxx} not found; Debian: apt-get install {' '.join(packages)})")
                continue
            for src in SOURCES:
                obj = os.path.join(out, os.path.basename(src) + ".o")
                cmd = [cxx, *FLAGS, *includes, "-c", src, "-o", obj, "-w"]
                res = subprocess.run(cmd, capture_output=True, text=True)
                rel = os.path.relpath(src, ROOT)
                if res.returncode != 0:
                    failed.append(f"{name}: {rel}")
                    print(f"FAILED {name}: {rel}\n{res.stderr[-4000:]}", file=sys.stderr)
                else:
                    print(f"ok     {name}: {rel}")
    for s in skipped:
        print(f"SKIPPED {s}")
    if failed:
        raise SystemExit(f"{len(failed)} sources do not compile: {failed}")
    print(f"portable build check: {len(COMPILERS) - len(skipped)} of {len(COMPILERS)} compilers, every source compiles")


if __name__ == "__main__":
    main()
