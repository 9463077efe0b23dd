"""benchmarks/tune_util.py: the coordinate descent the Triton launch sweeps use."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

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


def test_sweep_drops_mismatching_variants_times_the_choice_and_resets_the_tables(tmp_path, capsys):
    """The driver on a stand-in module (CPU): kernel a is fastest at X = 2 and
    gives wrong outputs at X = 3 (dropped, though faster); kernel b keeps its
    defaults; the end-to-end rows compare defaults with the choice; LAUNCH is
    back to {} afterwards and the JSON holds the log."""
    import json
    import types

    import torch

    mod = types.SimpleNamespace(KERNELS=("a", "b"), TUNED={"a": {"X": 9}, "b": {}}, LAUNCH={"a": {}, "b": {}})
    speed = {None: 4.0, 1: 3.0, 2: 2.0, 3: 1.0}

    def fwd_bwd(inputs):
        wrong = mod.LAUNCH["a"].get("X") == 3
        return [inputs * (2.0 if wrong else 1.0)]

    def timer(fn, kname):
        fn()
        return speed[mod.LAUNCH["a"].get("X")] if kname == "ka" else 5.0

    def total(fn):
        fn()
        return speed[mod.LAUNCH["a"].get("X")] + 5.0

    t = tune_util.Target("stand-in", "n", mod, {"a": {"X": [1, 2, 3]}, "b": {"Y": [7]}}, {"a": "ka", "b": "kb"},
                         lambda shape, seed: torch.ones(shape), fwd_bwd)
    with pytest.raises(SystemExit, match="expected n"):
        t.parse_shape("4,5")
    out = tune_util.sweep(t, "4", ["4", "8"], ["a", "b"], tol=1e-6, json_path=str(tmp_path / "s.json"),
                          timer=timer, total=total)
    assert out["chosen"]["a"]["config"] == {"X": 2} and out["chosen"]["b"]["config"] == {}
    assert any(r["config"] == {"X": 3} and "mismatch" in r["note"] for r in out["log"])
    assert [r["speedup"] for r in out["rows"]] == [9.0 / 7.0] * 2
    assert mod.LAUNCH == {"a": {}, "b": {}} and mod.TUNED == {"a": {}, "b": {}}
    assert json.loads((tmp_path / "s.json").read_text())["chosen"]["a"]["config"] == {"X": 2}
    assert 'TUNED = {"a": {"X": 2}, "b": {}}' in capsys.readouterr().out


def test_tune_main_parses_and_refuses_without_cuda(monkeypatch, capsys):
    """The sweeps' shared command line: defaults, the kernel choice checked,
    the arguments handed to sweep(); exit 2 with a message without CUDA."""
    seen = []
    monkeypatch.setattr(tune_util, "sweep", lambda *a: seen.append(a))
    target = tune_util.Target("t", "batch,seqlen", object(), {}, {}, None, None)
    opts = {"a": {}, "b": {}}
    monkeypatch.setattr(tune_util.torch.cuda, "is_available", lambda: False)
    assert tune_util.tune_main(target, [], "x_tune", "1,2", ["1,2"], opts) == 2
    assert "x_tune: needs a CUDA GPU" in capsys.readouterr().err and not seen
    monkeypatch.setattr(tune_util.torch.cuda, "is_available", lambda: True)
    assert tune_util.tune_main(target, ["--kernels", "b", "--tol", "1e-3"], "x_tune", "1,2", ["1,2", "3,4"],
                               opts) == 0
    assert seen == [(target, "1,2", ["1,2", "3,4"], ["b"], 1e-3, None)]
    with pytest.raises(SystemExit):
        tune_util.tune_main(target, ["--kernels", "c"], "x_tune", "1,2", ["1,2"], opts)
