"""benchmarks/tune_util.py: the coordinate descent the Triton launch sweeps use."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import tune_util  # noqa: E402

DEFAULTS = {"BT": 64, "num_warps": 4}


def cost(cfg):
    c = {**DEFAULTS, **cfg}
    if c["BT"] == 128:
        return None, "OutOfResources: shared memory"        # a variant that fails is dropped
    return 1.0 + abs(c["BT"] - 32) / 32 + abs(c["num_warps"] - 8) / 8, 0.0


def test_descent_finds_the_best_valid_config_and_logs_every_try():
    log = []
    res = tune_util.coordinate_descent({"BT": [16, 32, 64, 128], "num_warps": [2, 4, 8]}, cost, log, "k")
    assert res["config"] == {"BT": 32, "num_warps": 8}
    assert res["ms"] == 1.0 and res["default_ms"] == cost({})[0]
    assert log[0] == {"kernel": "k", "config": {}, "ms": res["default_ms"], "note": "default"}
    failed = [r for r in log if r["ms"] is None]
    assert failed and all("OutOfResources" in r["note"] for r in failed)
    assert all(r["config"].get("BT") == 128 for r in failed)


def test_a_default_that_fails_stops_the_descent():
    log = []
    res = tune_util.coordinate_descent({"BT": [16]}, lambda cfg: (None, "boom"), log, "k")
    assert res == {"config": {}, "ms": None, "default_ms": None} and len(log) == 1


def test_small_gains_are_not_taken():
    log = []
    # 1% faster is inside the 2% noise margin: keep the defaults
    res = tune_util.coordinate_descent({"BT": [32]}, lambda cfg: (0.99 if cfg else 1.0, 0.0), log, "k")
    assert res["config"] == {}
