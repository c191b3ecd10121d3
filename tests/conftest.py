"""Suite-wide settings. Tiny models spend their time in per-op overhead, and on a busy 2-core
machine two OpenMP threads contend badly (tests ran ~40x slower); one thread is fast everywhere."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
