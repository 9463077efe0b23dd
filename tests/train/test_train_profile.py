"""`megacpp train --profile START:END`: a profiler table of those steps in the run dir."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

import megacpp
from megacpp.train.trainer import Trainer

from train_testutil import tiny_sets


def test_profile_window_writes_table(tiny_snapshot, tmp_path):
    recipe = megacpp.load_recipe("nam-tiny", tiny_sets(**{"policy.eval_batches": 0}))
    Trainer(recipe, tmp_path / "run", tiny_snapshot, device="cpu", quiet=True, max_steps=3,
            profile=(1, 10)).run()  # the run ends inside the window: the table is still written
    text = (tmp_path / "run" / "profile.txt").read_text()
    assert text.startswith("steps 1..2, rank 0, cpu")
    m = re.search(r"wall ([0-9.]+) ms \(([0-9.]+) ms/step\)", text.splitlines()[0])
    assert m and float(m.group(1)) > 0 and abs(float(m.group(2)) - float(m.group(1)) / 2) < 0.2
    assert "by self CPU time" in text and "aten::" in text


def test_profile_bad_window_is_one_clear_error(tmp_path):
    p = subprocess.run([sys.executable, "-m", "megacpp", "train", "--recipe", "nam-tiny", "--out",
                        str(tmp_path / "r"), "--profile", "5"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--profile: expected START:END" in p.stderr
    assert "Traceback" not in p.stderr


def test_kernels_only_needs_a_window_and_cpu_runs_still_record_the_host(tiny_snapshot, tmp_path):
    p = subprocess.run([sys.executable, "-m", "megacpp", "train", "--recipe", "nam-tiny", "--out",
                        str(tmp_path / "r"), "--profile-kernels-only"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--profile-kernels-only: give the steps with --profile" in p.stderr
    recipe = megacpp.load_recipe("nam-tiny", tiny_sets(**{"policy.eval_batches": 0}))
    Trainer(recipe, tmp_path / "run", tiny_snapshot, device="cpu", quiet=True, max_steps=3,
            profile=(1, 3), profile_host=False).run()
    text = (tmp_path / "run" / "profile.txt").read_text()
    # no kernels on a CPU: the host operators are recorded whatever the flag says
    assert "by self CPU time" in text and "aten::" in text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("host", [True, False])
def test_cuda_profile_summary_with_and_without_the_host(tiny_snapshot, tmp_path, host):
    """On a GPU the table opens with the per-step kernel summary (also as
    profile_kernels.json); without the host's operators there is no CPU table."""
    recipe = megacpp.load_recipe("nam-tiny", tiny_sets(**{"policy.eval_batches": 0}))
    Trainer(recipe, tmp_path / "run", tiny_snapshot, device="cuda", quiet=True, max_steps=4,
            profile=(2, 4), profile_host=host).run()
    text = (tmp_path / "run" / "profile.txt").read_text()
    assert "per step: wall" in text and "by self CUDA time" in text
    assert ("by self CPU time" in text) == host
    kp = json.loads((tmp_path / "run" / "profile_kernels.json").read_text())
    assert 0 < kp["busy_ms"] <= kp["wall_ms"] * 1.05 and kp["kernels"] > 0


def test_cuda_graph_runs_mark_a_new_iteration_before_every_forward(tiny_snapshot, tmp_path, monkeypatch):
    """Under CUDA graphs each micro-batch's forward (and each eval batch's) starts
    a cudagraph-trees iteration: two micro-batches a step, two steps and two eval
    batches make six marks; in inductor's default mode there are none."""
    import torch

    from megacpp.train import compile as comp

    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    comp.graph_step_begin({"mode": "default"})
    assert marks == []
    recipe = megacpp.load_recipe("nam-tiny", tiny_sets(**{"policy.eval_batches": 2, "policy.compile.mode": "none"}))
    t = Trainer(recipe, tmp_path / "run", tiny_snapshot, device="cpu", quiet=True, max_steps=2)
    t._build()
    t.loader_iter = iter(t.loader)
    assert t.accum == 2
    t.compile_info = {"mode": "reduce-overhead"}  # as recorded on one CUDA device; nothing compiled here
    t.train_step(0)
    t.train_step(1)
    assert len(marks) == 4
    t.evaluate("val", 2)
    assert len(marks) == 6


@pytest.mark.parametrize("grad_sum", ["autograd", "foreach"])
def test_cuda_graph_runs_keep_their_grads_outside_the_graphs(grad_sum, tiny_snapshot, tmp_path, monkeypatch):
    """Under CUDA graphs every trainable parameter has a .grad of its own from the
    start and keeps that tensor across steps, so no .grad is ever a graph's output
    buffer (autograd adds into it, or with MEGACPP_GRAD_SUM=foreach a step's first
    micro-batch copies into it: train.grads); in other modes grads are dropped
    after a step."""
    import torch

    from megacpp.train import compile as comp

    model = torch.nn.Linear(3, 2)
    assert not comp.keep_grads_outside_graphs(model, {"mode": "default"}) and model.weight.grad is None
    assert comp.keep_grads_outside_graphs(model, {"mode": "reduce-overhead"})
    assert torch.equal(model.weight.grad, torch.zeros(2, 3)) and torch.equal(model.bias.grad, torch.zeros(2))

    monkeypatch.setenv("MEGACPP_GRAD_SUM", grad_sum)
    recipe = megacpp.load_recipe("nam-tiny", tiny_sets(**{"policy.eval_batches": 0, "policy.compile.mode": "none"}))
    t = Trainer(recipe, tmp_path / "run", tiny_snapshot, device="cpu", quiet=True, max_steps=2)
    monkeypatch.setattr(comp, "apply_compile", lambda *a, **k: {"mode": "reduce-overhead"})
    monkeypatch.setattr("megacpp.train.trainer.apply_compile", lambda *a, **k: {"mode": "reduce-overhead"})
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: None)
    t._build()
    t.loader_iter = iter(t.loader)
    params = [p for p in t.model.parameters() if p.requires_grad]
    ptrs = [p.grad.data_ptr() for p in params]
    t.train_step(0)
    t.train_step(1)
    assert [p.grad.data_ptr() for p in params] == ptrs
    if grad_sum == "foreach":
        # one device: the foreach sum, whose next backward copies over the kept .grads
        assert t.grad_acc.enabled and t.grad_acc.fresh
    else:
        assert not t.grad_acc.enabled
