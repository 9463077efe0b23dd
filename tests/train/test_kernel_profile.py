"""train/kernel_profile: kernel kinds, busy time, and the per-repetition summary."""
from __future__ import annotations

import random

import pytest
import torch

from megacpp.train.kernel_profile import (GEMM_OPS, busy_union, gemm_flops, gemm_rows, gemm_text, kernel_kind,
                                          profile_gemms, profile_kernels, summarize)


@pytest.mark.parametrize("name,kind", [
    ("nvjet_tst_128x256_64x4_2x1_v_bz_coopB_TNT", "gemm"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "gemm"),
    ("triton_tem_fused_flex_attention_backward_0", "attention"),
    ("triton_tem_fused_mm_3", "gemm"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", "attention"),
    ("triton_poi_fused__to_copy_add_mul_silu_7", "fused"),
    ("triton_red_fused_mean_pow_rsqrt_2", "fused"),
    ("_dx_kernel", "triton"),
    ("_state_fwd_kernel", "triton"),
    ("void at::native::elementwise_kernel<128, 2>(int, ...)", "other"),
    ("Memcpy DtoD (Device -> Device)", "other"),
    ("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "comm"),
    ("ncclDevKernel_ReduceScatter_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "comm"),
])
def test_kernel_kind(name, kind):
    assert kernel_kind(name) == kind


def _brute_union(intervals, step=0.5):
    # count half-unit cells covered by any interval (integer endpoints)
    cells = set()
    for s, e in intervals:
        x = s
        while x < e:
            cells.add(x)
            x += step
    return len(cells) * step


def test_busy_union_matches_a_brute_force_count():
    rng = random.Random(7)
    for _ in range(50):
        iv = []
        for _ in range(rng.randint(0, 12)):
            s = rng.randint(0, 40)
            iv.append((float(s), float(s + rng.randint(0, 10))))
        assert busy_union(iv) == pytest.approx(_brute_union(iv))


def test_summarize_is_per_repetition_and_sorted():
    # two repetitions: a gemm of 3 µs and two fused kernels of 1 µs each, overlapping once
    ev = []
    for rep in range(2):
        t = rep * 100.0
        ev += [("nvjet_gemm", t, t + 3.0), ("triton_poi_fused_add_0", t + 2.0, t + 3.0),
               ("triton_poi_fused_add_0", t + 10.0, t + 11.0)]
    p = summarize(ev, reps=2, wall_ms=0.2, top=5)
    assert p.wall_ms == pytest.approx(0.1)
    assert p.kernel_ms == pytest.approx(5e-3)       # 3 + 1 + 1 µs
    assert p.busy_ms == pytest.approx(4e-3)         # the overlap counted once
    assert p.kinds_ms == pytest.approx({"gemm": 3e-3, "fused": 2e-3})
    assert [r["name"] for r in p.top] == ["nvjet_gemm", "triton_poi_fused_add_0"]
    assert p.top[1]["calls"] == 2 and p.kernels == 3


def test_profile_kernels_is_none_without_cuda():
    assert profile_kernels(lambda: None, 2, torch.device("cpu")) is None


def test_communication_only_time_is_what_compute_does_not_cover():
    # one rep: compute 0-10 µs, a collective 5-14 µs (4 µs of it alone), idle 14-20
    ev = [("nvjet_gemm", 0.0, 10.0), ("ncclDevKernel_AllGather_RING_LL", 5.0, 14.0)]
    p = summarize(ev, reps=1, wall_ms=20e-3)
    assert p.busy_ms == pytest.approx(14e-3) and p.compute_busy_ms == pytest.approx(10e-3)
    assert p.comm_only_ms == pytest.approx(4e-3) and p.kinds_ms["comm"] == pytest.approx(9e-3)
    assert summarize([("nvjet_gemm", 0.0, 10.0)], 1, 20e-3).comm_only_ms == 0.0


# ---------------------------------------------------------------- matmuls

def _recorded_shapes(fn):
    """{op name: input shapes} as torch.profiler records them (CPU, record_shapes)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return {e.name: e.input_shapes for e in prof.events() if e.name in GEMM_OPS}


def test_gemm_flops_reads_the_shapes_the_profiler_records():
    g = torch.Generator().manual_seed(0)
    m, k, n, b = 5, 7, 3, 4
    a, w, bias = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g), torch.randn(n, generator=g)
    shapes = _recorded_shapes(lambda: (torch.mm(a, w), torch.addmm(bias, a, w),
                                       torch.bmm(torch.randn(b, m, k), torch.randn(b, k, n))))
    assert gemm_flops("aten::mm", shapes["aten::mm"]) == 2 * m * k * n
    assert gemm_flops("aten::addmm", shapes["aten::addmm"]) == 2 * m * k * n
    assert gemm_flops("aten::bmm", shapes["aten::bmm"]) == 2 * b * m * k * n
    assert gemm_flops("aten::linear", [[m, k], [n, k]]) is None
    if not hasattr(torch, "_grouped_mm"):
        return
    offs = torch.tensor([3, 8], dtype=torch.int32)               # 8 rows over 2 groups
    x, wg = torch.randn(8, 16, generator=g), torch.randn(2, 16, 32, generator=g)
    try:
        fwd = _recorded_shapes(lambda: torch._grouped_mm(x, wg, offs=offs))["aten::_grouped_mm"]
        dw = _recorded_shapes(lambda: torch._grouped_mm(x.t(), torch.randn(8, 32), offs=offs))["aten::_grouped_mm"]
    except (RuntimeError, NotImplementedError) as e:  # no CPU _grouped_mm in this torch
        pytest.skip(f"torch._grouped_mm on CPU: {e}")
    assert gemm_flops("aten::_grouped_mm", fwd) == 2 * 8 * 16 * 32        # every row through its group
    assert gemm_flops("aten::_grouped_mm", dw) == 2 * 16 * 8 * 32         # the weight gradient's shape


def test_gemm_rows_group_by_shape_per_repetition():
    mm = ("aten::mm", [[1000, 2000], [2000, 500]], 10.0)              # 2 GFLOP in 10 µs
    ops = [mm, mm, mm, mm, ("aten::bmm", [[2, 10, 10], [2, 10, 10]], 1.0),
           ("aten::add", [[4], [4]], 50.0), ("aten::mm", [[1, 1], [1, 1]], 0.0)]
    rows = gemm_rows(ops, reps=2)
    assert [r["op"] for r in rows] == ["mm", "bmm"]                  # add and zero-time calls dropped
    top = rows[0]
    assert top["calls"] == 2 and top["ms"] == pytest.approx(0.02)     # per repetition
    assert top["tflops"] == pytest.approx(2 * 1000 * 2000 * 500 / 10e-6 / 1e12)
    assert top["shapes"] == "[1000, 2000] x [2000, 500]"
    assert "of peak" in gemm_text(rows, 989.0)[0] and "(20%)" in gemm_text(rows, 1000.0)[1]


def test_profile_gemms_is_none_without_cuda():
    assert profile_gemms(lambda: None, 1, torch.device("cpu")) is None


def test_idle_gaps_group_by_the_kernels_around_them():
    from megacpp.train.kernel_profile import idle_gaps
    # two reps: a 20 µs gap after the gemm before the loss kernel, a 3 µs one (under
    # the 5 µs floor) and, in rep 1 only, a 50 µs gap before the optimizer; the
    # fused kernel inside the gemm's interval ends first and must not open a gap
    ev = []
    for rep in range(2):
        t = rep * 200.0
        ev += [("nvjet_gemm", t, t + 30.0), ("triton_poi_fused_0", t + 5.0, t + 10.0),
               ("_ce_rows_kernel", t + 50.0, t + 60.0), ("triton_poi_fused_1", t + 63.0, t + 70.0)]
        if rep == 1:
            ev.append(("multi_tensor_apply_kernel", t + 120.0, t + 130.0))
    rows = idle_gaps(ev, reps=2)
    # per repetition: the 130 µs between the reps (the host between two steps) / 2,
    # 50 / 2 = 25 µs before the optimizer, 2 x 20 / 2 = 20 µs before the loss
    assert [(r["before"], r["after"]) for r in rows] == [("triton_poi_fused_1", "nvjet_gemm"),
                                                        ("triton_poi_fused_1", "multi_tensor_apply_kernel"),
                                                        ("nvjet_gemm", "_ce_rows_kernel")]
    assert [r["ms"] for r in rows] == pytest.approx([65e-3, 25e-3, 20e-3])
    assert [r["gaps"] for r in rows] == [0.5, 0.5, 1.0]
    p = summarize(ev, reps=2, wall_ms=2.0)
    assert p.gaps == rows
