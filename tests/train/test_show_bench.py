"""benchmarks/show_bench.py --diff: what changed from one bench result to another."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import show_bench  # noqa: E402


def _result(hash_, tps, busy, kinds, top):
    return {"recipe": "nam-125m", "recipe_hash": hash_ * 16, "tokens_per_s": tps, "step_ms_median": 65536 / tps * 1e3,
            "peak_memory_gib": 16.0 + len(top), "step_profile": {"busy_ms": busy, "kinds_ms": kinds,
                                                                 "top": [{"name": n, "ms": ms} for n, ms in top]}}


def test_diff_names_the_change_and_matches_inductor_kernels_across_graphs(tmp_path, capsys):
    a = _result("a", 400_000, 160.0, {"gemm": 64.0, "fused": 35.0},
                [("triton_poi_fused_cat_mul_silu_2", 4.0), ("_dx_kernel", 4.8), ("topk", 1.0)])
    b = _result("b", 440_000, 150.0, {"gemm": 64.0, "fused": 30.0, "triton": 1.0},
                [("triton_poi_fused_cat_mul_silu_26", 2.5), ("_dx_kernel", 4.7)])
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps({"peer": {}, "megacpp": b}))   # a peer script's JSON holds it under "megacpp"
    assert show_bench.main(["--diff", str(pa), str(pb)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "nam-125m (aaaaaaaaaaaa) -> nam-125m (bbbbbbbbbbbb)"
    assert "tokens/s 400,000 -> 440,000 (+10.0%)" in out[1]
    assert "GPU busy 160.0 -> 150.0 ms; by kind: fused 35.0 -> 30.0, triton 0.0 -> 1.0, gemm 64.0 -> 64.0" in out[2]
    moved = out[4:]
    # the fusion compiled in two graphs (suffixes _2 and _26) is one kernel; the largest move first
    assert "4.00 ->    2.50 ms  triton_poi_fused_cat_mul_silu" in moved[0]
    assert "1.00 ->    -    ms  topk" in moved[1]
    assert show_bench.main(["--diff", str(pa)]) == 2


def test_rows_one_line_a_file_and_a_cut_run_said(tmp_path, capsys):
    a = _result("a", 410_000, 153.0, {}, [])
    a.update(mfu=0.281, precision="bf16", clocks={"sm_mhz_median": 1897.5})
    b = dict(a, tokens_per_s=424_300.0, mfu=0.291, peak_memory_gib=17.39, precision="bf16 (residual stream bf16)",
             clocks={})
    pa, pb, cut = tmp_path / "p1.json", tmp_path / "rs1.json", tmp_path / "r1.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    cut.write_text("")                      # a bench killed by its time limit wrote nothing
    assert show_bench.main(["--rows", str(pa), str(cut), str(pb)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3
    assert out[0].startswith("p1.json") and "410,000 tok/s" in out[0] and "MFU  28.1%" in out[0]
    assert "SM 1897.5" in out[0] and out[0].endswith("bf16")
    assert out[1].startswith("r1.json") and "no result" in out[1]
    assert "424,300 tok/s" in out[2] and "peak 17.39 GiB" in out[2] and "SM ?" in out[2]
    assert out[2].endswith("(residual stream bf16)")
