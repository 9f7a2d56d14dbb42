from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def _single_thread():
    """The models here are tiny: one thread avoids thread-pool hand-offs that dominate on a busy
    2-core CI machine (preprocessing one clip drops from tens of ms to ~1 ms)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
