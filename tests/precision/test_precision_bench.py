"""benchmarks/precision_bench.py runs end to end on CPU with tiny settings:
the FP8 and fp16 modes print their refusals, bf16 and NVFP4 produce numbers."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "precision_bench.py"


@pytest.mark.slow
def test_precision_bench_runs_on_cpu(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("precision_bench", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "res.json"
    # small rows and batches; linear_ce off: its chunked CPU backend fails under CPU bf16 autocast
    small = ["--micro-batch", "2", "--device", "cpu", "--work", str(tmp_path / "work"), "--json", str(out),
             "--set", "policy.patches.linear_ce=off", "--set", "policy.micro_batch=2", "--set", "policy.global_batch=2",
             "--set", "policy.seq_len=64"]
    rc = bench.main(["--recipe", "nam-tiny", "--steps", "3", "--bench-steps", "1", "--warmup", "0",
                     "--modes", "bf16,fp16,nvfp4_emulated", *small])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["throughput/nam-tiny/bf16"]["tokens_per_s"] > 0
    assert "low_precision=fp8_rowwise" in res["throughput/nam-tiny/fp8_rowwise"]["error"]
    assert res["throughput/nam-tiny/fp8_tensorwise"]["converted"] > 0
    b, n = res["curves/nam-tiny/bf16"], res["curves/nam-tiny/nvfp4_emulated"]
    assert "error" not in b and "error" not in n, (b.get("error"), n.get("error"))
    assert len(b["loss"]) == len(n["loss"]) == 3
    assert len(b["grad_norm"]) == 3 and all(0 < x < float("inf") for x in b["grad_norm"] + n["grad_norm"])
    assert b["loss"][0] != n["loss"][0] and abs(b["loss"][0] - n["loss"][0]) < 0.05  # same data, rounded GEMMs
    assert n["emulated"] and n["converted"] > 0
    assert "fp16 needs a CUDA device" in res["curves/nam-tiny/fp16"]["error"]
    text = capsys.readouterr().out
    assert "loss curves: nam-tiny" in text and ("nvfp4_emulated +" in text or "nvfp4_emulated -" in text)
    # a second invocation merges into the same file
    assert bench.main(["--recipe", "nam-tiny", "--part", "curves", "--steps", "2", "--modes", "nvfp4_emulated",
                       *small]) == 0
    res2 = json.loads(out.read_text())
    assert len(res2["curves/nam-tiny/nvfp4_emulated"]["loss"]) == 2 and "curves/nam-tiny/bf16" in res2
