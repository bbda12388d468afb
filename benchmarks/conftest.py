"""Set-up shared by the benchmarks (the root conftest.py sets TRITON_INTERPRET and the gpu marker)."""
import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def bench_threads():
    """S2H_BENCH_THREADS=n pins the intra-op threads (1 is steadier on a 2-core machine shared with other jobs)."""
    n = os.environ.get("S2H_BENCH_THREADS")
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    yield
    torch.set_num_threads(old)
