"""benchmarks/mamba_ssm_peer.py builds mamba_ssm's LM at the mamba2-130m preset's shape.

The first tests need no mamba_ssm (CI has none); the last runs the script's
--check (stubs + import + construction on CPU) and skips when mamba_ssm is
not importable.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import megacpp
from megacpp.recipe.count import summarize

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "mamba_ssm_peer.py"


def _peer_module():
    spec = importlib.util.spec_from_file_location("mamba_ssm_peer", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _mamba_ssm_lm_params(cfg: dict) -> int:
    """mamba_ssm MambaLMHeadModel's parameter count, from its layer definitions."""
    d, V, s = cfg["d_model"], cfg["vocab_size"], cfg["ssm_cfg"]
    di, N, G, K = s["expand"] * d, s["d_state"], s["ngroups"], s["d_conv"]
    H = di // s["headdim"]
    conv_dim = di + 2 * G * N
    layer = (d * (2 * di + 2 * G * N + H)      # in_proj [z, x, B, C, dt], no bias
             + conv_dim * K + conv_dim         # depthwise conv weight + bias
             + 3 * H                           # dt_bias, A_log, D
             + di                              # gated RMSNorm
             + di * d                          # out_proj
             + d)                              # block RMSNorm
    return V * d * (1 if cfg["tie_embeddings"] else 2) + cfg["n_layer"] * layer + d


def test_peer_config_is_the_preset_shape():
    peer = _peer_module()
    r = megacpp.load_recipe("mamba2-130m")
    cfg = peer.peer_config(r, 0, False)
    assert (cfg["d_model"], cfg["n_layer"], cfg["vocab_size"], cfg["d_intermediate"]) == (768, 24, 32768, 0)
    s = cfg["ssm_cfg"]
    assert s["layer"] == "Mamba2" and (s["d_state"], s["headdim"], s["expand"], s["ngroups"]) == (128, 64, 2, 1)
    assert s["chunk_size"] == 128 and s["use_mem_eff_path"] is False
    assert cfg["tie_embeddings"] is True and cfg["rms_norm"] is True
    assert _mamba_ssm_lm_params(cfg) == summarize(r).total_params == 115_534_272
    assert (r.policy.micro_batch, r.policy.seq_len) == (8, 2048)


def test_peer_refuses_non_mamba_recipes():
    peer = _peer_module()
    with pytest.raises(SystemExit, match="all-M"):
        peer.peer_config(megacpp.load_recipe("nam-125m"), 0, False)


def test_stub_module_raises_when_called():
    peer = _peer_module()
    stub = peer._stub_module("selective_scan_cuda")
    with pytest.raises(RuntimeError, match="stub"):
        stub.fwd()


@pytest.mark.skipif(importlib.util.find_spec("mamba_ssm") is None, reason="mamba_ssm not importable")
def test_check_mode_imports_and_builds(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [p for p in sys.path if p] + [str(ROOT / "src")])}
    out = subprocess.run([sys.executable, str(SCRIPT), "--check", "--json", str(tmp_path / "c.json")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "check: ok" in out.stdout
    assert "torch nn.Conv1d" in out.stdout and "mamba_chunk_scan_combined (Triton)" in out.stdout
