"""End-to-end training on CPU: manifest, resume equivalence, aux-loss gates, compare."""
from __future__ import annotations

import json

import pytest
import torch

from megacpp import load_recipe
from megacpp.cli import main
from megacpp.run.compare import compare
from megacpp.train.metrics import read_metrics
from megacpp.train.trainer import Trainer

from train_testutil import tiny_sets


def _run(tmp_path, snap, name="run", resume=False, max_steps=None, **sets):
    recipe = load_recipe("nam-tiny", tiny_sets(**sets))
    out = tmp_path / name
    return Trainer(recipe, out, snap, resume=resume, device="cpu", quiet=True, max_steps=max_steps).run()


def _train_losses(run_dir):
    return [(r["step"], r["loss"], r.get("stp")) for r in read_metrics(run_dir) if r["kind"] == "train"]


def test_end_to_end_manifest(tmp_path, tiny_snapshot):
    res = _run(tmp_path, tiny_snapshot)
    m = json.loads((res.run_dir / "run.json").read_text())
    # (a) spec
    assert m["spec"]["recipe_hash"] == load_recipe("nam-tiny", tiny_sets()).hash
    assert m["spec"]["recipe"]["model"]["pattern"] == "AEMEAEMEAEMR"
    # (b) pattern
    assert len(m["pattern"]["layers"]) == 12 and m["pattern"]["counts"] == {"A": 3, "M": 3, "R": 1, "E": 5}
    assert all(l["norm_seam"] == "pre" for l in m["pattern"]["layers"])
    # (c) patches
    lce = {p["name"]: p for p in m["patches"]}["linear_ce"]
    assert lce["installed"] and lce["backend"] == "chunked" and lce["parity"][0]["passed"]
    assert "liger" in lce["reason"]
    dsa = {p["name"]: p for p in m["patches"]}["dsa_indexer_fused"]
    assert not dsa["installed"] and "no D" in dsa["reason"]
    # (d) aux losses: configuration and first-active step
    assert m["aux_losses"]["stp"]["start_step"] == 2 and m["aux_losses"]["stp"]["first_active_step"] == 2
    assert m["aux_losses"]["moe"]["first_active_step"] == 0
    assert m["aux_losses"]["mtp"]["enabled"] is False
    # (e) backend
    b = m["backend"]
    for key in ("device", "torch", "precision", "compile", "activation_checkpointing", "world_size",
                "seed", "data", "megacpp", "git"):
        assert key in b
    assert b["data"]["snapshot_id"] and b["data"]["tokenizer_sha256"]
    # the scans' kernels (CPU: the references; the SSD's states are autograd's there)
    assert b["ssd_backend"]["backend"] == "reference" and b["ssd_backend"]["chunk_states"] == "autograd (reference)"
    assert b["conv_backend"]["backend"] == "reference" and "paths" not in b["conv_backend"]
    assert b["gated_norm_backend"] == {"backend": "reference", "reason": "no CUDA"}
    assert b["swiglu_backend"] == {"backend": "reference", "reason": "no CUDA"}  # nam-tiny's experts
    assert b["fused_projections"] is False  # off unless MEGACPP_FUSED_PROJECTIONS=1
    assert b["moe_wgrad_splits"] == 1  # policy.kernels.moe_wgrad_splits as the E layers took it
    assert b["grad_sum"] == "autograd"  # the foreach sum needs CUDA graphs' kept .grads
    assert b["mamba_in_proj_split_layers"] == 0  # nam-tiny: Mamba-3 (no split), policy "one"
    assert b["moe_gate_activation_layers"] == 0  # policy.kernels.moe_gate "combine" (the default)
    assert b["precision"]["residual"] == "float32"  # policy.precision.residual = "fp32"
    # (f) outcome
    o = m["outcome"]
    assert o["status"] == "finished" and o["end_reason"] == "completed" and o["steps"] == 6
    assert o["tokens"] == 6 * 8 * 64 and o["final_val_bpb"] > 0 and o["wall_seconds"] > 0
    assert o["first_val_step"] == 0 and o["final_val_step"] == 6   # the evals' steps: at start, at the end
    assert o["clocks"] == {"available": False, "why": "not a CUDA device"}  # the card's clocks: none here
    assert (res.run_dir / "recipe.toml").is_file()
    assert load_recipe(str(res.run_dir / "recipe.toml")).hash == m["spec"]["recipe_hash"]
    assert list((res.run_dir / "tb").glob("events.*"))
    # each auxiliary loss logged on its own
    recs = [r for r in read_metrics(res.run_dir) if r["kind"] == "train"]
    assert all("moe_balance" in r and "moe_z" in r for r in recs)
    assert [("stp" in r) for r in recs] == [False, False, True, True, True, True]


def test_resume_equals_straight_run(tmp_path, tiny_snapshot):
    straight = _train_losses(_run(tmp_path, tiny_snapshot, "straight").run_dir)
    _run(tmp_path, tiny_snapshot, "split", max_steps=4)
    res = _run(tmp_path, tiny_snapshot, "split", resume=True)
    resumed = _train_losses(res.run_dir)
    # the first run logged steps 0-3, the resumed one 4-5 (checkpoint at 4)
    assert [s for s, _, _ in resumed] == list(range(6))
    assert resumed == straight


def test_stp_gate_adds_nothing_before_start(tmp_path, tiny_snapshot):
    """Before the start step the STP term is not computed: gradients equal an STP-off run."""
    grads = []
    for stp in ("true", "false"):
        recipe = load_recipe("nam-tiny", tiny_sets(**{"policy.aux.stp.enabled": stp,
                                                      "policy.aux.stp.start_step": 5}))
        t = Trainer(recipe, tmp_path / f"g{stp}", tiny_snapshot, device="cpu", quiet=True)
        t.t_start = 0.0
        t._build()
        batch = next(iter(t.loader))
        terms = t._micro_step(batch, step=0)
        assert "stp" not in terms
        grads.append([p.grad.clone() for p in t.model.parameters() if p.grad is not None])
        if stp == "true":
            t.model.zero_grad()
            after = t._micro_step(batch, step=5)
            assert float(after["stp"]) > 0
            assert float(after["aux_total"]) > 0
        t.loader.close()
    assert len(grads[0]) == len(grads[1])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_all_aux_losses_logged_apart(tmp_path, tiny_snapshot):
    res = _run(tmp_path, tiny_snapshot, "aux", **{
        "model.pattern": "ADMREF", "model.depth": 6, "model.mtp.depths": 1,
        "policy.steps": 3, "policy.aux.dsa.dense_warmup_steps": 1, "policy.aux.stp.start_step": 0})
    recs = [r for r in read_metrics(res.run_dir) if r["kind"] == "train"]
    for key in ("stp", "moe_balance", "moe_z", "mtp", "dsa_indexer"):
        assert all(key in r and r[key] == r[key] for r in recs), key
    m = json.loads((res.run_dir / "run.json").read_text())
    dsa = {p["name"]: p for p in m["patches"]}["dsa_indexer_fused"]
    assert dsa["installed"] and dsa["backend"] == "chunked"
    assert m["aux_losses"]["dsa"]["first_active_step"] == 0


def test_compare_names_patch_aux_start_and_pattern(tmp_path, tiny_snapshot, capsys):
    a = _run(tmp_path, tiny_snapshot, "a", **{"policy.steps": 2}).run_dir
    b = _run(tmp_path, tiny_snapshot, "b", **{"policy.steps": 2, "policy.patches.linear_ce": "off",
                                              "policy.aux.stp.start_step": 1,
                                              "model.overrides.11": "F"}).run_dir
    res = compare(a, b)
    d = res["differences"]
    keys = {section: [k for k, _, _ in rows] for section, rows in d.items()}
    assert "patches.linear_ce.installed" in keys["patches"]
    assert "aux_losses.stp.start_step" in keys["aux_losses"]
    assert "pattern.resolved" in keys["pattern"]
    assert "spec.recipe_hash" in keys["spec"]
    assert main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "patches.linear_ce.installed: True  ->  False" in out
    assert "aux_losses.stp.start_step: 2  ->  1" in out
    # the card's clocks: none on CPU; where a manifest has them, the clock and the MFU at it
    rows = {label: (x, y) for label, x, y in res["metrics"]}
    assert rows["median SM clock MHz"] == (None, None) and rows["median MFU at that clock"] == (None, None)
    import megacpp.run.compare as cmp
    ma, mb = cmp.read_manifest(a), cmp.read_manifest(b)
    mb["outcome"]["clocks"] = {"available": True, "sm_mhz_median": 1980.0, "sm_clock_share": 1.0}
    got = {label: y for label, _, y in cmp.metrics_side_by_side(a, b, ma, mb)}
    assert got["median SM clock MHz"] is None          # sampled over the whole run: not the steps' clock
    mb["outcome"]["clocks"] = {"available": True, "sm_mhz_median": 1584.0, "sm_clock_share": 0.8,
                               "window": "training steps from step 3"}
    recs = [{"kind": "train", "mfu": v} for v in (0.40, 0.36, 0.44)]
    got = {label: y for label, _, y in cmp.metrics_side_by_side(a, b, ma, mb)}
    assert got["median SM clock MHz"] == 1584.0
    orig = cmp.read_metrics
    try:
        cmp.read_metrics = lambda run: recs
        got = {label: y for label, _, y in cmp.metrics_side_by_side(a, b, ma, mb)}
    finally:
        cmp.read_metrics = orig
    assert got["median MFU"] == 0.40 and got["median MFU at that clock"] == pytest.approx(0.5)


def test_eval_generate_report_cli(tmp_path, tiny_snapshot, capsys):
    run = _run(tmp_path, tiny_snapshot, "cli", **{"policy.steps": 2}).run_dir
    assert main(["eval", str(run), "--split", "test", "--batches", "5", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["bpb"] > 0 and ev["tokens"] > 0
    assert main(["generate", str(run), "--prompt", "int main(", "--max-tokens", "8", "--json"]) == 0
    gen = json.loads(capsys.readouterr().out)
    assert gen["tokens"] <= 8
    assert main(["report", str(run)]) == 0
    assert (run / "report" / "loss.png").stat().st_size > 1000
    assert "Run report" in (run / "report" / "summary.md").read_text()


def test_gated_norm_record_names_each_group_width_when_they_differ(monkeypatch):
    """As nam-125m: Mamba-2's one wide group and Gated DeltaNet's heads. Where the
    dispatch sends the widths to different backends, the record says which took what."""
    import megacpp.ops.gated_norm as gn
    from megacpp.model.norm import GatedRMSNorm
    from megacpp.train.trainer import gated_norm_record

    narrow, wide = 8, 48
    model = torch.nn.ModuleList([GatedRMSNorm(wide, 1e-5, group_size=wide), GatedRMSNorm(16, 1e-5, group_size=narrow)])
    monkeypatch.setattr(gn, "gated_norm_backend", lambda d, t, g: "triton" if g <= narrow else "reference")
    monkeypatch.setattr(gn, "gated_norm_backend_reason", lambda d, t, g: "" if g <= narrow else "too wide")
    rec = gated_norm_record(model, torch.device("cpu"), torch.bfloat16)
    assert rec == {"backend": "mixed", "reason": f"{wide}: too wide",
                   "by_group": {str(narrow): "triton", str(wide): "reference"}}
    monkeypatch.setattr(gn, "gated_norm_backend", lambda d, t, g: "reference")
    monkeypatch.setattr(gn, "gated_norm_backend_reason", lambda d, t, g: "no CUDA")
    assert gated_norm_record(model, torch.device("cpu"), torch.bfloat16) == {"backend": "reference",
                                                                              "reason": "no CUDA"}
