"""The CPU-ISA layer (csrc/cpu/cpu_isa.h): S2H_CPU_ISA is read once, unknown values are refused,
and every CPU kernel reads it (a bad value reaches each op)."""
import os
import subprocess
import sys

import pytest
import torch

import s2h_kernels
from s2h_kernels import SparseWeight, _cpu_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _ops():
    """One call of every CPU op (float32: every op's ISA-dispatched path)."""
    g = torch.Generator().manual_seed(0)
    s, h = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    w = torch.randn(6, 8, generator=g) * (torch.rand(6, 8, generator=g) > 0.5)
    sw = SparseWeight.from_dense(w)
    wc = SparseWeight.from_dense(torch.randn(4, 2 * 9, generator=g))
    return {
        "channel_masks": lambda: s2h_kernels.channel_masks(torch.randn(7, generator=g), [0, 3, 7]),
        "kl_gap": lambda: s2h_kernels.kl_gap(s, h),
        "ca_kld": lambda: s2h_kernels.ca_kld(s, h),
        "spmm": lambda: s2h_kernels.spmm(sw, torch.randn(8, 20, generator=g)),
        "spmv_sell": lambda: s2h_kernels.spmm(sw, torch.randn(8, generator=g)),
        "spmm_conv2d": lambda: s2h_kernels.spmm_conv2d(wc, torch.randn(1, 2, 6, 6, generator=g), 3, padding=1),
    }


def test_every_cpu_op_reads_the_isa_layer():
    """With S2H_CPU_ISA refused, every op fails with that message: each one asks the layer."""
    ops = _ops()
    for op in ops.values():
        op()
    old = os.environ.get("S2H_CPU_ISA")
    os.environ["S2H_CPU_ISA"] = "sse9"
    try:
        with pytest.raises(RuntimeError, match="S2H_CPU_ISA=sse9 is not one of avx512, avx2, scalar, auto"):
            _cpu_config.reload()
        for name, op in ops.items():
            with pytest.raises(RuntimeError, match="S2H_CPU_ISA=sse9"):
                op()
                pytest.fail(f"{name} ran with a refused S2H_CPU_ISA")
    finally:
        if old is None:
            os.environ.pop("S2H_CPU_ISA", None)
        else:
            os.environ["S2H_CPU_ISA"] = old
        _cpu_config.reload()
    for op in ops.values():
        op()


def test_isa_is_read_once(monkeypatch):
    before = _cpu_config.active_isa()
    monkeypatch.setenv("S2H_CPU_ISA", "scalar" if before != "scalar" else "sse9")
    try:
        assert _cpu_config.active_isa() == before  # not re-read per call
        for op in _ops().values():
            op()
    finally:
        monkeypatch.undo()
        _cpu_config.reload()
    assert _cpu_config.active_isa() == before


def test_levels_and_best():
    levels = ("scalar", "avx2", "avx512")
    assert _cpu_config.best_isa() in levels
    if os.environ.get("S2H_CPU_ISA", "") in ("", "auto"):
        assert _cpu_config.active_isa() == _cpu_config.best_isa()
    for level in levels[: levels.index(_cpu_config.best_isa()) + 1]:
        with _cpu_config.environment(S2H_CPU_ISA=level):
            assert _cpu_config.active_isa() == level
    for level in levels[levels.index(_cpu_config.best_isa()) + 1:]:
        with pytest.raises(RuntimeError, match=f"S2H_CPU_ISA={level} but this CPU runs at most"):
            with _cpu_config.environment(S2H_CPU_ISA=level):
                pass


def test_old_spmm_variable_is_refused(cpu_env):
    with pytest.raises(RuntimeError, match="S2H_SPMM_ISA was replaced by S2H_CPU_ISA"):
        cpu_env(S2H_SPMM_ISA="avx2")


def test_bad_value_at_process_start():
    """Set before the process starts: import works, the first kernel call names the variable."""
    script = (
        "import torch, s2h_kernels\n"
        "try:\n"
        "    s2h_kernels.kl_gap(torch.randn(2, 3), torch.randn(2, 3))\n"
        "except RuntimeError as e:\n"
        "    print('refused:', str(e).splitlines()[0])\n"
    )
    env = {**os.environ, "S2H_CPU_ISA": "avx9000", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "refused: S2H_CPU_ISA=avx9000 is not one of avx512, avx2, scalar, auto" in res.stdout
