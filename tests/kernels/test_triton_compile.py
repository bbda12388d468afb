"""Every Triton kernel, compiled for sm_80 (A100) and sm_90 (H100) without a GPU.

Under ``TRITON_INTERPRET=1`` the kernel tests never compile anything; the compiler alone sees tile
shapes ``tl.dot`` rejects, shared memory over the limit, loop-carried dtype changes and the real
backend's dtype rules. ``tools/triton_cases.py`` (run in a subprocess: the interpreter flag is set
for this process by conftest.py before triton is imported) finds the kernels by introspection,
records the launches the launchers make at the shapes of its ``LAUNCHES`` table on meta tensors,
and compiles each with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``.

A kernel that is found but launched by no case fails ``test_every_kernel_is_compiled``: adding a
kernel means adding its op's shapes to ``LAUNCHES``.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "triton_cases.py")

ALL_FLOATS = {"float32", "float16", "bfloat16", "float64"}
# The dtypes each Triton op's kernels must be compiled for: what the public op accepts (spmm runs
# half inputs in float32, so its kernel sees float32 and float64 only; dual_linear also in TF32).
ACCEPTED = {
    "s2h::kl_gap_triton": ALL_FLOATS,
    "s2h::ca_kld_triton": ALL_FLOATS,
    "s2h::channel_masks_triton": ALL_FLOATS,
    "s2h::channel_masks_triton_backward": ALL_FLOATS,
    "s2h::dual_linear_triton": ALL_FLOATS | {"float32+tf32"},
    "s2h::spmm_triton": {"float32", "float64"},
}


def _run(tmp_path, *args, timeout=1800):
    out = tmp_path / "cases.json"
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, TOOL, "--json", str(out), *args], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=timeout)
    if "ptxas" in res.stdout + res.stderr and "not found" in res.stdout + res.stderr:
        pytest.skip("no ptxas for Triton on this machine")
    data = json.loads(out.read_text()) if out.exists() else None
    assert data is not None, f"tools/triton_cases.py wrote nothing (rc {res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res, data


def _failures(data):
    return [f"{r['kernel']} sm_{r['arch']} {r['dtype']} [{r['config']}] ({r['shapes'][0]}): {r['error'][:1500]}"
            for r in data["results"] if not r["ok"]]


@pytest.fixture(scope="module")
def fast(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("triton_fast"), "--subset", "fast")


def test_every_kernel_is_compiled(fast):
    """Introspection finds the kernels; each is compiled for both archs and every dtype its op accepts."""
    res, data = fast
    assert not data["errors"], "\n".join(data["errors"])
    assert len(data["kernels"]) >= 7 and len(data["ops"]) >= 6, res.stdout
    compiled = {}
    for r in data["results"]:
        compiled.setdefault(r["kernel"], set()).add(r["arch"])
    missing = [k for k in data["kernels"] if compiled.get(k) != {80, 90}]
    assert not missing, f"kernels not compiled for both sm_80 and sm_90: {missing}"
    assert set(data["ops"]) <= set(ACCEPTED), f"new Triton op(s): add their dtypes to ACCEPTED: {set(data['ops']) - set(ACCEPTED)}"
    for op in data["ops"]:
        for kernel in {r["kernel"] for r in data["results"] if r["op"] == op}:
            dtypes = {r["dtype"] for r in data["results"] if r["op"] == op and r["kernel"] == kernel}
            assert dtypes >= ACCEPTED[op], f"{kernel} ({op}) not compiled for {ACCEPTED[op] - dtypes}"


def test_representative_configs_compile_for_sm80_and_sm90(fast):
    """The smallest and largest config each launcher picks, every dtype, both archs."""
    res, data = fast
    assert not _failures(data), "\n".join(_failures(data))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # Every compile went through ptxas (its -v report was read back).
    assert all(r["regs"] > 0 for r in data["results"]), [r for r in data["results"] if r["regs"] <= 0][:3]


@pytest.mark.slow
def test_every_launcher_config_compiles(tmp_path):
    """The full sweep: every block size / warps / constexpr the launchers can pick (about 3 minutes on 2 cores)."""
    res, data = _run(tmp_path, "--subset", "full")
    assert not data["errors"], "\n".join(data["errors"])
    assert not _failures(data), "\n".join(_failures(data))
    assert res.returncode == 0, res.stdout[-3000:]


def test_a_kernel_without_cases_fails(tmp_path):
    """The coverage check itself: a new kernel no launcher case reaches is an error; its helper is not."""
    extra = tmp_path / "new_op.py"
    extra.write_text(textwrap.dedent(
        """
        import triton
        import triton.language as tl

        @triton.jit
        def scaled(x, s):
            return x * s

        @triton.jit
        def forgotten_kernel(x_ptr, n, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            tl.store(x_ptr + offs, scaled(tl.load(x_ptr + offs, mask=offs < n), 2.0), mask=offs < n)
        """
    ))
    res, data = _run(tmp_path, "--list", "--extra-module", str(extra), timeout=600)
    assert res.returncode == 1
    assert "forgotten_kernel" in data["kernels"] and "scaled" in data["helpers"]
    assert any("forgotten_kernel" in e for e in data["errors"]), data["errors"]
    assert not any("scaled" in e for e in data["errors"])
