"""Fixtures shared by every test folder.

Tests that draw fresh random weights and inputs take them from `seed`: the
seed is printed (pytest shows it for failing tests) and MEGACPP_TEST_SEED=<n>
replays it.
"""
from __future__ import annotations

import os
import random

import pytest
import torch


@pytest.fixture
def seed(request):
    env = os.environ.get("MEGACPP_TEST_SEED")
    value = int(env) if env else random.SystemRandom().randrange(2**31)
    print(f"{request.node.nodeid}: seed={value} (replay with MEGACPP_TEST_SEED={value})")
    torch.manual_seed(value)
    return value
