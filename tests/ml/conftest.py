"""Shared fixtures of the luoshu.ml tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The ml tests run many small kernels; on a shared machine one thread avoids OpenMP spin contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
