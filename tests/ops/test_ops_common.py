"""Shared helpers of the reference ops."""
from __future__ import annotations

import torch

from megacpp.ops._common import compute_dtype, pad_seq, segsum


def test_segsum_definition(gen):
    a = -torch.rand(2, 7, dtype=torch.float64)
    out = segsum(a)
    for i in range(7):
        for j in range(7):
            want = a[:, j + 1 : i + 1].sum(-1) if i >= j else torch.full((2,), float("-inf"), dtype=torch.float64)
            assert torch.allclose(out[:, i, j], want, rtol=0, atol=1e-15)


def test_segsum_is_accurate_after_a_huge_decay(gen):
    # One enormous decay followed by gentle ones: prefix sums sit near -2000,
    # so differences of prefix sums in float32 lose ~1e-4 absolute; summing
    # the segments directly keeps float32's relative accuracy.
    a = -torch.rand(64, dtype=torch.float64) * 0.05
    a[0] = -2000.0
    ref = segsum(a)
    got = segsum(a.float()).double()
    lower = torch.ones(64, 64, dtype=torch.bool).tril()
    assert (got - ref)[lower].abs().max() < 1e-6
    assert torch.equal(got[~lower], ref[~lower])


def test_compute_dtype_and_pad():
    h, f, d = torch.zeros(1, dtype=torch.bfloat16), torch.zeros(1), torch.zeros(1, dtype=torch.float64)
    assert compute_dtype(h) == torch.float32
    assert compute_dtype(h, None, f) == torch.float32
    assert compute_dtype(h, d) == torch.float64
    x = torch.ones(2, 3, 4)
    y = pad_seq(x, 2)
    assert y.shape == (2, 5, 4) and torch.equal(y[:, :3], x) and not y[:, 3:].any()
    assert pad_seq(x, 0) is x
