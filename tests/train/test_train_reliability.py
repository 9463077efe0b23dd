"""Crash safety and hostile input: SIGKILL + resume, corrupt checkpoints, preflight errors."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megacpp import load_recipe
from megacpp.errors import MegacppError
from megacpp.train.metrics import read_metrics
from megacpp.train.trainer import Trainer

from train_testutil import tiny_sets

STEPS = 8


def _cmd(snap, out, resume=False, extra=()):
    cmd = [sys.executable, "-m", "megacpp", "train", "--recipe", "nam-tiny", "--data", str(snap),
           "--out", str(out), "--device", "cpu", "--quiet"]
    for s in tiny_sets(**{"policy.steps": STEPS, "policy.checkpoint_interval": 1,
                          "policy.eval_interval": 100, "policy.eval_batches": 0}):
        cmd += ["--set", s]
    cmd += list(extra)
    if resume:
        cmd.append("--resume")
    return cmd


def _losses(run):
    # the last record per step wins: steps after the last checkpoint are re-run after a kill
    by_step = {}
    for r in read_metrics(run):
        if r["kind"] == "train":
            by_step[r["step"]] = r["loss"]
    return [by_step[s] for s in sorted(by_step)]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_snapshot):
    out = tmp_path_factory.mktemp("ref") / "run"
    subprocess.run(_cmd(tiny_snapshot, out), check=True, capture_output=True)
    return _losses(out)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_anywhere_then_resume_is_identical(tmp_path, tiny_snapshot, reference_run, seed):
    rng = random.Random(seed)
    out = tmp_path / "run"
    proc = subprocess.Popen(_cmd(tiny_snapshot, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # kill once a random number of steps has been logged (mid-step or mid-save)
    target = rng.randrange(1, STEPS - 1)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        n = sum(1 for r in read_metrics(out) if r["kind"] == "train")
        if n >= target:
            time.sleep(rng.random() * 0.3)
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = subprocess.run(_cmd(tiny_snapshot, out, resume=True), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert _losses(out) == reference_run
    m = json.loads((out / "run.json").read_text())
    assert m["outcome"]["status"] == "finished" and m["outcome"]["steps"] == STEPS


def test_corrupt_newest_checkpoint_falls_back(tmp_path, tiny_snapshot, reference_run):
    out = tmp_path / "run"
    subprocess.run(_cmd(tiny_snapshot, out, extra=["--max-steps", "5"]), check=True, capture_output=True)
    ckpts = sorted((out / "checkpoints").glob("step_*"))
    newest = ckpts[-1]
    assert newest.name == "step_00000005"
    data = bytearray((newest / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (newest / "model.safetensors").write_bytes(bytes(data))
    done = subprocess.run(_cmd(tiny_snapshot, out, resume=True), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    m = json.loads((out / "run.json").read_text())
    warnings = " ".join(m["outcome"]["warnings"])
    assert "step_00000005 skipped: model.safetensors checksum mismatch" in warnings
    assert "resumed from step_00000004" in warnings
    assert _losses(out) == reference_run


def test_graceful_sigterm_saves_and_exits_zero(tmp_path, tiny_snapshot):
    out = tmp_path / "run"
    cmd = _cmd(tiny_snapshot, out, extra=["--set", "policy.steps=400", "--set", "policy.checkpoint_interval=1000"])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not any(r["kind"] == "train" for r in read_metrics(out)):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    m = json.loads((out / "run.json").read_text())
    assert m["outcome"]["end_reason"] == "signal:SIGTERM"
    step = m["outcome"]["steps"]
    assert 0 < step < 400
    assert (out / "checkpoints" / f"step_{step:08d}" / "index.json").is_file()


def test_nonfinite_guard_stops_with_last_good_state(tmp_path, tiny_snapshot, monkeypatch):
    import megacpp.train.trainer as tr

    real = tr.lm_loss
    calls = {"n": 0}

    def poisoned(model, hidden, labels, reduction="mean"):
        calls["n"] += 1
        loss = real(model, hidden, labels, reduction)
        return loss * float("nan") if calls["n"] > 4 else loss  # steps 0-1 fine (2 micro each)

    monkeypatch.setattr(tr, "lm_loss", poisoned)
    recipe = load_recipe("nam-tiny", tiny_sets(**{"policy.max_nonfinite_steps": 3, "policy.steps": 10,
                                                  "policy.eval_batches": 0}))
    res = Trainer(recipe, tmp_path / "run", tiny_snapshot, device="cpu", quiet=True).run()
    assert res.end_reason == "nonfinite" and res.steps == 5
    m = res.manifest
    assert m["outcome"]["nonfinite_steps_skipped"] == 3
    assert any("consecutive non-finite" in w for w in m["outcome"]["warnings"])
    recs = [r for r in read_metrics(res.run_dir) if r["kind"] == "train"]
    assert [r["stepped"] for r in recs] == [True, True, False, False, False]
    assert (res.run_dir / "checkpoints" / "step_00000005").is_dir()


# ------------------------------------------------------------------ hostile input
def _fails_clean(tmp_path, argv, needles, in_process=True):
    """The CLI refuses argv with exit status 2 and one message naming needles,
    no traceback, nothing written under --out. The first case of each test runs
    `python -m megacpp` as a process; the rest call the same `cli.main` in this
    one (an uncaught exception fails the test there), each process start being
    ~3 s of importing torch on the CI machine."""
    out = tmp_path / "run"
    if in_process:
        import contextlib
        import io
        from megacpp.cli import main
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main([*argv, "--out", str(out)])
            except SystemExit as e:  # argparse's own refusals
                code = e.code
        stderr = err.getvalue()
    else:
        p = subprocess.run([sys.executable, "-m", "megacpp", *argv, "--out", str(out)], capture_output=True,
                           text=True)
        code, stderr = p.returncode, p.stderr
    assert code == 2, stderr
    assert "Traceback" not in stderr
    for n in needles:
        assert n in stderr, (n, stderr)
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


def test_hostile_recipe_inputs(tmp_path, tiny_snapshot):
    bad = tmp_path / "bad.toml"
    cases = [
        ('base = "nam-tiny"\n[model\n', ["bad.toml:2", "malformed TOML"]),
        ('base = "nam-tiny"\n[model]\ncolour = 1\n', ["bad.toml:3", "model.colour", "unknown key"]),
        ('base = "nam-tiny"\n[policy]\nsteps = "many"\n', ["bad.toml:3", "policy.steps", "integer"]),
        ('base = "nam-tiny"\n[policy]\nmicro_batch = -4\n', ["policy.micro_batch", "positive"]),
        ('base = "nam-tiny"\n[model]\nhidden_size = 1000000000\n', ["model.hidden_size", "beyond"]),
        ('base = "nam-tiny"\n[model]\npattern = ""\n', ["model.pattern", "no layer letters"]),
        ('base = "nam-tiny"\n[model]\npattern = "AZ"\n', ["model.pattern", "unknown layer letter 'Z'"]),
    ]
    for k, (body, needles) in enumerate(cases):
        bad.write_text(body)
        _fails_clean(tmp_path, ["train", "--recipe", str(bad), "--data", str(tiny_snapshot)], needles,
                     in_process=k > 0)


def _copy_snapshot(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_hostile_data_inputs(tmp_path, tiny_snapshot):
    base = ["train", "--recipe", "nam-tiny"] + sum((["--set", s] for s in tiny_sets()), [])
    # a truncated parquet shard
    snap = _copy_snapshot(tiny_snapshot, tmp_path / "s1")
    shard = sorted(snap.rglob("*.parquet"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    _fails_clean(tmp_path, base + ["--data", str(snap)], [shard.name], in_process=False)
    # a truncated tokenizer file
    snap = _copy_snapshot(tiny_snapshot, tmp_path / "s2")
    tok = snap / "tokenizer.json"
    tok.write_text(tok.read_text()[:50])
    _fails_clean(tmp_path, base + ["--data", str(snap)], ["tokenizer.json"])
    # a snapshot from another schema version
    snap = _copy_snapshot(tiny_snapshot, tmp_path / "s3")
    man = json.loads((snap / "snapshot.json").read_text())
    man["schema_version"] = 999
    (snap / "snapshot.json").write_text(json.dumps(man))
    _fails_clean(tmp_path, base + ["--data", str(snap)], ["snapshot.json", "schema"])
    # tokenizer bigger than the model's vocabulary
    _fails_clean(tmp_path, ["train", "--recipe", "nam-tiny", "--data", str(tiny_snapshot)]
                 + sum((["--set", s] for s in tiny_sets(**{"model.vocab_size": 300})), []),
                 ["tokenizer has 512 tokens", "model.vocab_size"])
    # rows packed for another sequence length
    _fails_clean(tmp_path, ["train", "--recipe", "nam-tiny", "--data", str(tiny_snapshot)]
                 + sum((["--set", s] for s in tiny_sets(**{"policy.seq_len": 128})), []),
                 ["seq_len 64", "policy.seq_len is 128"])
    # missing snapshot
    _fails_clean(tmp_path, base + ["--data", str(tmp_path / "nope")], ["nope"])


def test_preflight_refuses_existing_run_and_memory(tmp_path, tiny_snapshot):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text("{}")
    with pytest.raises(MegacppError, match="already holds a run"):
        Trainer(load_recipe("nam-tiny", tiny_sets()), out, tiny_snapshot, device="cpu")
    with pytest.raises(MegacppError, match="memory estimate"):
        Trainer(load_recipe("nam-tiny", tiny_sets(**{"policy.micro_batch": 32768, "policy.global_batch": 32768})),
                tmp_path / "big", tiny_snapshot, device="cpu")
    assert not (tmp_path / "big").exists()


def test_memory_margin_warning_bounds():
    from megacpp.train.trainer import ESTIMATE_MARGIN, memory_margin_warning

    gib = 2**30
    assert memory_margin_warning(10 * gib, 10 * gib * ESTIMATE_MARGIN, "cuda:0") is None
    w = memory_margin_warning(10 * gib, 12 * gib, "cuda:0")
    assert "10.0 GiB" in w and "12.0 GiB" in w and "cuda:0" in w and "policy.micro_batch" in w


def test_preflight_warns_when_the_estimate_fits_without_margin(tmp_path, tiny_snapshot, monkeypatch, capsys):
    from megacpp.recipe.count import summarize
    from megacpp.train import trainer as trainer_mod

    recipe = load_recipe("nam-tiny", tiny_sets(**{"policy.steps": 2, "policy.eval_batches": 0}))
    need = summarize(recipe).memory["device_estimate"]
    monkeypatch.setattr(trainer_mod, "memory_available", lambda device: int(need * 1.2))
    result = Trainer(recipe, tmp_path / "run", tiny_snapshot, device="cpu", quiet=True).run()
    assert "measured peaks have run up to" in capsys.readouterr().err
    assert any("measured peaks have run up to" in w for w in result.manifest["outcome"]["warnings"])
