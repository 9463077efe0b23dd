"""NVFP4 emulation: the fast quantize-dequantize against the plain reference
(bitwise), hand-worked roundings, error bounds, and the emulated Linear."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megacpp.train.lowp.nvfp4 import (NVFP4EmulatedLinear, nvfp4_linear, nvfp4_qdq, nvfp4_quantize,
                                      round_e2m1)
from megacpp.train.lowp.reference import E4M3_VALUES, e4m3_value, nvfp4_reference, round_to_table


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32 if t.element_size() == 4 else torch.uint8)


def assert_matches_reference(x: torch.Tensor) -> None:
    fast = nvfp4_quantize(x)
    q, codes, g, deq = nvfp4_reference(x)
    assert torch.equal(bits(fast.global_scale), bits(g))
    assert torch.equal(fast.scale.view(torch.uint8), codes), "block scales differ"
    assert torch.equal(bits(fast.q), bits(q)), "e2m1 values differ"
    assert torch.equal(bits(fast.dequantize()), bits(deq)), "dequantized values differ"


# ---------------------------------------------------------------- against the reference
@pytest.mark.parametrize("shape", [(4, 16), (3, 5, 32), (7, 64)])
def test_fast_equals_reference_on_gaussian(shape):
    assert_matches_reference(torch.randn(shape))


def test_fast_equals_reference_across_dynamic_range():
    # rows spanning 10 decades: scales in e4m3's normal and subnormal range, and underflow to 0
    x = torch.randn(10, 48) * torch.logspace(-8, 2, 10)[:, None]
    assert_matches_reference(x)
    t = nvfp4_quantize(x)
    assert (t.scale.float() == 0).any(), "the smallest rows should underflow their block scale"
    assert (t.scale.float() < 2 ** -6).any() and (t.scale.float() >= 2 ** -6).any()


def test_fast_equals_reference_on_awkward_values():
    x = torch.randn(6, 32)
    x[0] = 0.0                       # all-zero rows
    x[1, :16] = 3.0                  # a constant block
    x[2, 3] = -x.abs().max() * 4     # one outlier sets the global scale
    x[3, :16] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 2)
    x[4] = -x[4].abs()               # all negative
    assert_matches_reference(x)
    assert_matches_reference(torch.zeros(2, 16))
    assert_matches_reference(torch.randn(4, 32).to(torch.bfloat16))


def test_reference_e4m3_table_matches_torch_cast():
    # the reference decodes e4m3 from its bits; torch's own cast must agree on every code
    codes = torch.arange(127, dtype=torch.uint8)
    assert torch.equal(codes.view(torch.float8_e4m3fn).float(), torch.tensor(E4M3_VALUES, dtype=torch.float32))
    assert e4m3_value(0x7E) == 448.0 and e4m3_value(1) == 2.0 ** -9 and e4m3_value(8) == 2.0 ** -6


# ---------------------------------------------------------------- worked by hand
def test_e2m1_ties_go_to_even_and_saturate():
    v = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.5, 100.0, 0.26, 0.24, 2.6])
    want = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 0.5, 0.0, 3.0])
    assert torch.equal(round_e2m1(v), want)
    assert torch.equal(round_e2m1(-v), -want)
    assert torch.isnan(round_e2m1(torch.tensor([float("nan")]))).all()
    assert round_to_table(1.25, [0.0, 0.5, 1.0, 1.5]) == 2 and round_to_table(1.75, [1.0, 1.5, 2.0]) == 2


def test_hand_worked_blocks():
    # The 2688 in block 0 makes the global scale exactly 1 (2688 = 6 * 448) and
    # that block's scale 448. Block 1 has amax 6: scale 1, so its values are
    # rounded on the bare grid. Block 2 has amax 6.375: the scale ratio
    # 1.0625 is a tie between e4m3 1.0 and 1.125 and goes to 1.0 (even),
    # so its 6.375 saturates to 6.
    b0 = [2688.0] + [0.0] * 15
    b1 = [6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5, 0.1]
    b2 = [6.375, 1.0] + [0.0] * 14
    t = nvfp4_quantize(torch.tensor([b0 + b1 + b2]))
    assert float(t.global_scale) == 1.0
    assert t.scale.float().tolist() == [[448.0, 1.0, 1.0]]
    q1 = [6, 0, 1, 1, 2, 2, 4, 4, -0.0, -1, -1, -2, -2, -4, -4, 0]
    assert t.q[0, 16:32].tolist() == q1
    assert torch.signbit(t.q[0, 24])  # -0.25 rounds to -0, sign kept
    assert t.q[0, 32:34].tolist() == [6.0, 1.0]
    assert t.dequantize()[0, 0] == 2688.0


def test_representable_values_round_trip_exactly():
    # grid values times a power of two, one 6 per block so every block scale is exact
    g = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    blocks = torch.cat([g, -g.flip(0)]).reshape(1, 16)
    x = torch.cat([blocks * 2.0 ** k for k in range(-4, 4)], dim=1)
    x[0, 7] = 6 * 2.0 ** -4
    assert torch.equal(nvfp4_qdq(x * 448 / 2 ** 3), x * 448 / 2 ** 3)


def test_non_finite_input_is_not_hidden():
    for bad in (float("nan"), float("inf")):
        x = torch.randn(2, 32)
        x[1, 5] = bad
        assert torch.isnan(nvfp4_qdq(x)).any()


def test_rejects_unaligned_reduction_dim():
    with pytest.raises(ValueError, match="multiple of 16"):
        nvfp4_quantize(torch.randn(4, 24))


# ---------------------------------------------------------------- error bounds
def test_round_trip_error_bounds_on_random_data():
    torch.manual_seed(1234)
    x = torch.randn(64, 256) * torch.logspace(-2, 2, 64)[:, None]
    t = nvfp4_quantize(x)
    err = (t.dequantize() - x).abs()
    S = (t.scale.float() * t.global_scale).repeat_interleave(16, dim=-1)
    # per element: half the widest grid gap near |x|, i.e. at most max(S/4, |x|/5)
    # (0.25 of 0.75 at the 0.5/1 gap, 1 of 5 at the 4/6 gap; the saturated
    # region above 6 stays under |x|/5 because the e4m3 scale is at most 1/16 low)
    bound = torch.maximum(S / 4, x.abs() / 5) * (1 + 1e-6) + 1e-30
    assert (err <= bound).all(), float((err / bound).max())
    # per block: no error beyond the block's amax / 6 (one grid step of 2 halved, times the scale)
    bmax = x.abs().reshape(64, 16, 16).amax(-1).repeat_interleave(16, dim=-1)
    assert (err <= bmax / 6 * (1 + 1 / 16) * 1.0001).all()
    # overall: about 9-10% relative RMS error on Gaussian blocks
    rel = float((t.dequantize() - x).norm() / x.norm())
    assert 0.05 < rel < 0.12, rel


def test_largest_block_scale_is_e4m3_max():
    # the largest block scale lands on e4m3's top value 448, others below it
    x = torch.randn(8, 128)
    t = nvfp4_quantize(x)
    assert float(t.scale.float().max()) == 448.0
    assert (t.scale.float() > 0).all()


# ---------------------------------------------------------------- the emulated Linear
def test_nvfp4_linear_forward_and_straight_through_gradients():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 32, requires_grad=True)
    w = torch.randn(48, 32, requires_grad=True)
    b = torch.randn(48, requires_grad=True)
    y = nvfp4_linear(x, w, b)
    qx, qw = nvfp4_qdq(x.detach()), nvfp4_qdq(w.detach())
    ref = F.linear(qx.double(), qw.double(), b.detach().double())
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y, F.linear(x, w, b), rtol=1e-3, atol=1e-3)  # rounding did happen
    gy = torch.randn_like(y)
    y.backward(gy)
    # straight-through: the gradients of F.linear(qdq(x), qdq(w)) with d qdq / dx = identity
    assert torch.allclose(x.grad.double(), gy.double() @ qw.double(), rtol=1e-5, atol=1e-5)
    assert torch.allclose(w.grad.double(), gy.reshape(-1, 48).double().T @ qx.reshape(-1, 32).double(),
                          rtol=1e-5, atol=1e-4)
    assert torch.allclose(b.grad, gy.sum((0, 1)))


def test_nvfp4_linear_under_bf16_autocast():
    torch.manual_seed(0)
    x = torch.randn(16, 64)
    w = torch.randn(32, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = nvfp4_linear(x, w)
    assert y.dtype == torch.bfloat16
    ref = F.linear(nvfp4_qdq(x).double(), nvfp4_qdq(w.detach()).double())
    assert torch.allclose(y.double(), ref, rtol=2e-2, atol=2e-2 * float(ref.abs().mean()))
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()


def test_emulated_linear_module_shares_parameters_and_state_dict():
    lin = torch.nn.Linear(32, 16)
    new = NVFP4EmulatedLinear.from_linear(lin)
    assert new.weight is lin.weight and new.bias is lin.bias
    assert new.state_dict().keys() == lin.state_dict().keys()
    x = torch.randn(4, 32)
    assert torch.allclose(new(x), nvfp4_linear(x, lin.weight, lin.bias))
