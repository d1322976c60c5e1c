"""Shared fixtures."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """One intra-op thread for tests that train tiny models: on a shared 2-core machine two spinning OpenMP
    threads per process can slow such a run down tenfold, while one thread costs little when it is idle."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
