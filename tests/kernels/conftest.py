"""Fixtures of the kernel tests (the root conftest.py sets TRITON_INTERPRET and the backends)."""
import contextlib

import pytest

from s2h_kernels import _cpu_config


@pytest.fixture
def cpu_env():
    """``cpu_env(S2H_CPU_ISA="avx2", S2H_SPMM_STREAM="0")``: sets CPU-kernel environment variables
    for the rest of the test and has the C++ side re-read them (it reads them once); restored and
    re-read after the test."""
    with contextlib.ExitStack() as stack:
        yield lambda **env: stack.enter_context(_cpu_config.environment(**env))
