"""Fixtures shared by the tests of the s2h package."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """One intra-op thread: small models run faster on one than on two busy cores, and
    deterministically. Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
