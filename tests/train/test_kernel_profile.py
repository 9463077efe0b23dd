"""train/kernel_profile: kernel kinds, busy time, and the per-repetition summary."""
from __future__ import annotations

import random

import pytest
import torch

from megacpp.train.kernel_profile import busy_union, kernel_kind, profile_kernels, summarize


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
