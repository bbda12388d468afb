"""tools/gpu_check.py (`make gpu-check`) without a GPU: the no-GPU path, and the report writer fed fake numbers."""
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "gpu_check.py")

_spec = importlib.util.spec_from_file_location("gpu_check", TOOL)
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


def fake_report(match=True, test_rc=0):
    return dict(
        device="NVIDIA H100 80GB HBM3",
        date="2030-01-01 00:00:00",
        env={"torch": "2.14.1", "triton": "3.8.0", "compute capability": "9.0"},
        tests=[dict(name="pytest tests benchmarks -m gpu", rc=test_rc, summary="41 passed in 30.0s", seconds=30.0)],
        bench=[
            dict(op="kl_gap_with_grads fp32", shape="B=512 C=1000",
                 times_ms={"fused triton": 0.010, "fused cuda": 0.012, "eager closed form": 0.050,
                           "torch.compile closed form": 0.020}, match=True, error=""),
            dict(op="spmm fp32", shape="r50.fc", times_ms={"fused triton": 0.020, "eager dense addmm": 0.010},
                 match=match, error="" if match else "fused cuda != fused triton: max abs diff 1.0"),
        ],
        overlap=dict(what="ResNet-56.", steps=5, step_ms=12.5, side_ms=4.0, overlap_ms=1.0, fraction=0.25,
                     streams=[dict(stream="7", kernels=900, ms=8.0, main=True), dict(stream="13", kernels=400, ms=4.0)]),
        prune=dict(command="python -m s2h prune ... --out OUT", rc=0, seconds=20.0, summary={"hard_flops": 0.15}),
    )


def test_report_markdown_and_path(tmp_path):
    path = gpu_check.write_report(fake_report(), str(tmp_path))
    assert os.path.basename(path) == "gpu_NVIDIA_H100_80GB_HBM3.md"
    md = open(path).read()
    assert md.startswith("# GPU check: NVIDIA H100 80GB HBM3")
    assert "**Result: PASS**" in md
    # the benchmark table: one column per implementation, the speed-up of the best baseline over fused triton
    assert "| op | shape | fused triton | fused cuda | eager PyTorch | torch.compile | speed-up | match |" in md
    assert ("| kl_gap_with_grads fp32 | B=512 C=1000 | 0.0100 | 0.0120 | 0.0500 (eager closed form) | "
            "0.0200 (torch.compile closed form) | 2.00x | yes |") in md
    assert "| 0.50x |" in md  # spmm: the dense baseline is faster, reported as such
    assert "**Overlap fraction: 25.0%**" in md and "| 7 (main) | 900 | 8.000 |" in md
    assert "exit 0" in md and '"hard_flops": 0.15' in md


def test_report_fails_on_mismatch_or_failed_tests():
    assert gpu_check.failures(fake_report()) == []
    bad = fake_report(match=False, test_rc=1)
    fails = gpu_check.failures(bad)
    assert len(fails) == 2 and any("spmm" in f for f in fails)
    md = gpu_check.render_markdown(bad)
    assert "**Result: FAIL** (2 problems)" in md and "**NO**" in md


def test_overlap_from_trace():
    k = lambda ts, dur, stream: {"ph": "X", "cat": "kernel", "ts": ts, "dur": dur, "args": {"stream": stream}}  # noqa: E731
    trace = {"traceEvents": [k(0, 100, 7), k(150, 100, 7), k(50, 60, 13), k(240, 20, 13), k(400, 10, 13),
                             {"ph": "X", "cat": "cpu_op", "ts": 0, "dur": 1000}]}
    res = gpu_check.overlap_from_trace(trace)
    # side stream busy 90 us; both busy on [50, 100] and [240, 250]: 60 us
    assert res["side_ms"] == pytest.approx(0.090) and res["overlap_ms"] == pytest.approx(0.060)
    assert res["fraction"] == pytest.approx(60 / 90)
    one = gpu_check.overlap_from_trace({"traceEvents": [k(0, 10, 7)]})
    assert one["fraction"] is None and "one stream" in one["note"]


def test_device_slug():
    assert gpu_check.device_slug("NVIDIA A100-SXM4-80GB") == "NVIDIA_A100-SXM4-80GB"
    assert gpu_check.device_slug("  /weird: name ") == "weird_name"


def test_without_gpu_nothing_is_written(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": ROOT}
    res = subprocess.run([sys.executable, TOOL, "--out-dir", str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "no CUDA GPU found" in res.stdout and "Nothing was measured" in res.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_cpu_dry_run(tmp_path):
    """The benchmark and two-branch-step plumbing on the CPU (public API only: s2h.convert, s2h.S2HPruner,
    s2h_kernels ops): catches API drift before a GPU run does. About 30 s."""
    res = subprocess.run([sys.executable, TOOL, "--cpu-dry-run", "--out-dir", str(tmp_path)], capture_output=True,
                         text=True, timeout=900, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    md = (tmp_path / "gpu_CPU_dry_run.md").read_text()
    assert "**Result: PASS**" in md and md.count("| yes |") >= 7
