"""Fixtures for the model tests.

Every test draws fresh random weights and inputs from the `seed` fixture of
tests/conftest.py (printed; MEGACPP_TEST_SEED=<n> replays it).
"""
from __future__ import annotations

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "all_threads: run with torch's default intra-op thread count")


@pytest.fixture(autouse=True)
def _one_thread(request):
    """The tests' tensors are tiny: extra intra-op threads only add barriers,
    and those spin for milliseconds when another process shares the cores."""
    if request.node.get_closest_marker("all_threads"):
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def exact_fp32():
    """TF32 off for the test: float32 comparisons (or a float32 reference) on
    CUDA would otherwise be blurred by ~1e-3."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
