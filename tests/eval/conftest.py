"""Shared by the evaluation tests."""

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The digits classifier trains in seconds on one thread; two intra-op threads on a busy 2-core box slow
    its tiny training ~10x. Restored after each module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
