"""Fixtures for the reference-op tests.

Every test draws fresh random inputs from the `seed` fixture of
tests/conftest.py (printed; MEGACPP_TEST_SEED=<n> replays it).
"""
from __future__ import annotations

import pytest
import torch


@pytest.fixture
def gen(seed):
    """A torch.Generator seeded from `seed`, for drawing shapes."""
    return torch.Generator().manual_seed(seed)
