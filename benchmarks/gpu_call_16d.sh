#!/usr/bin/env bash
# Sixteenth session, fourth call (one H200; carry .whl-min): the FP8 grouped GEMM's CUDA tests
# after the quantizer's exact-bits scales and the Triton quantizer, then its micro-benchmark.
source benchmarks/gpu_session.sh
timeout -s INT 110 python3 -m pytest -q -rA --tb=short -p no:cacheprovider -p no:warnings -m gpu \
  tests/ops/test_fp8_grouped.py 2>&1 | grep -E "PASSED|FAILED|SKIPPED|passed|failed|Error" | tee $OUT/tests.txt
timeout 80 python3 benchmarks/fp8_grouped_bench.py --iters 10 --json $OUT/fp8_grouped_d.json 2>&1 | grep -v Warn | tail -14
