from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def _single_thread():
    """These tensors are tiny: on a small or shared CPU, intra-op threads cost far more than they
    save (we measured 100x slowdowns of elementwise ops with two busy cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
