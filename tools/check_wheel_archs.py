"""Proves a wheel holds exactly the cubins asked for: `python tools/check_wheel_archs.py WHEEL "8.0;9.0"`.

Lists the ELF (cubin) and PTX entries of s2h_kernels/_C*.so inside the wheel with cuobjdump (pip's
nvidia-cuda-cuobjdump) and compares the sm_XX set with the requested architectures.
"""
import glob
import os
import re
import subprocess
import sys
import tempfile
import zipfile


def cuobjdump() -> str:
    import nvidia

    for root in nvidia.__path__:
        hits = glob.glob(os.path.join(root, "*", "bin", "cuobjdump"))
        if hits:
            return hits[0]
    raise SystemExit("cuobjdump not found: pip install nvidia-cuda-cuobjdump")


def main(wheel: str, archs: str) -> None:
    wanted = {"sm_" + a.strip().removesuffix("+PTX").replace(".", "") for a in archs.replace(",", ";").split(";") if a.strip()}
    ptx_wanted = {"sm_" + a.strip().removesuffix("+PTX").replace(".", "") for a in archs.split(";") if a.strip().endswith("+PTX")}
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if re.match(r"s2h_kernels/_C.*\.so$", n)]
        if len(names) != 1:
            raise SystemExit(f"expected one s2h_kernels/_C*.so in {wheel}, found {names}")
        so = zf.extract(names[0], tmp)
        elf = subprocess.run([cuobjdump(), "--list-elf", so], capture_output=True, text=True).stdout
        ptx = subprocess.run([cuobjdump(), "--list-ptx", so], capture_output=True, text=True).stdout
    found = set(re.findall(r"\.(sm_\d+a?)\.cubin", elf))
    found_ptx = set(re.findall(r"\.(sm_\d+a?)\.ptx", ptx))
    print(f"wheel: {os.path.basename(wheel)}\nrequested: {sorted(wanted)}\ncubins: {sorted(found)}\nptx: {sorted(found_ptx)}")
    if found != wanted or found_ptx != ptx_wanted:
        raise SystemExit("MISMATCH: the wheel does not hold exactly the requested architectures")
    print("OK: exactly the requested cubins")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else os.environ.get("S2H_CUDA_ARCHS", "8.0;9.0"))
