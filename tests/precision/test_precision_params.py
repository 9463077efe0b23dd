"""params=bf16 (fp32_modules kept float32) and the trainer's precision hook,
end to end on CPU: dtypes, optimizer, manifest, logged skipped steps."""
from __future__ import annotations

import json

import pytest
import torch

import megacpp
from megacpp.errors import MegacppError
from megacpp.train.metrics import read_metrics
from megacpp.train.optim import Optimizers
from megacpp.train.precision import Precision, make_scaler
from megacpp.train.trainer import Trainer

from precision_testutil import precision_snapshot, tiny_sets  # noqa: F401 (fixture)

CPU = torch.device("cpu")
KEPT_PARTS = ("A_log", "D", "dt_bias", "norm", "router")


def kept(name: str) -> bool:
    return any(part.endswith(k) for part in name.split(".") for k in KEPT_PARTS)


def test_bf16_params_keep_fp32_modules_and_train_on_cpu():
    recipe = megacpp.load_recipe("nam-tiny", ["policy.precision.compute=bf16", "policy.precision.params=bf16"])
    torch.manual_seed(0)
    model = megacpp.build_model(recipe.model)
    prec = Precision(recipe.policy.precision, CPU)
    prec.apply(model)
    names = dict(model.named_parameters())
    for name, p in names.items():
        assert p.dtype == (torch.float32 if kept(name) else torch.bfloat16), name
    # the families the issue names are all present and float32
    for suffix in ("mamba.A_log", "mamba.D", "mamba.dt_bias", "recurrent.A_log", "moe.router.weight",
                   "attention.kv_norm.weight", "final_norm.weight"):
        assert any(n.endswith(suffix) and p.dtype == torch.float32 for n, p in names.items()), suffix
    assert names["head.weight"].dtype == names["embed.weight"].dtype == torch.bfloat16
    assert names["layers.1.moe.experts.w_in"].dtype == torch.bfloat16
    rep = prec.describe()["parameters"]
    assert rep["numel_by_dtype"]["bfloat16"] + rep["numel_by_dtype"]["float32"] == sum(
        p.numel() for p in model.parameters())
    assert rep["float32_kept"]["layers.*.mamba.A_log"] == 3

    opt = Optimizers(model, recipe.policy.optimizer, CPU)
    before = {n: p.detach().clone() for n, p in names.items()}
    ids = torch.randint(0, recipe.model.vocab_size, (2, 64))
    for _ in range(2):
        with prec.autocast():
            out = model(ids[:, :-1])
            loss = torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        for n, p in names.items():
            if p.grad is not None:
                assert p.grad.dtype == p.dtype, n
        assert prec.step(opt.optimizers)
        opt.zero_grad()
    assert torch.isfinite(loss)
    for n, p in names.items():
        assert p.dtype == before[n].dtype, n  # the step kept every dtype
    moved = [n for n, p in names.items() if not torch.equal(p, before[n])]
    assert "layers.2.mamba.A_log" in moved and "layers.0.attention.q_proj.weight" in moved
    for st in opt.adamw.state.values():
        assert st["exp_avg"].dtype in (torch.bfloat16, torch.float32)


def _trainer(tmp_path, snap, name, **sets):
    recipe = megacpp.load_recipe("nam-tiny", tiny_sets(**sets))
    return Trainer(recipe, tmp_path / name, snap, device="cpu", quiet=True)


def test_trainer_records_bf16_params_and_nvfp4_gemms(tmp_path, precision_snapshot):
    t = _trainer(tmp_path, precision_snapshot, "nvfp4", **{
        "policy.precision.compute": "bf16", "policy.precision.params": "bf16",
        "policy.precision.low_precision": "nvfp4_emulated", "policy.steps": 3,
        # the chunked linear-CE op (the CPU backend) fails under CPU bf16 autocast
        # (bf16 logits meet its float32 gradient buffer); the plain loss path does not
        "policy.patches.linear_ce": "off"})
    res = t.run()
    assert res.end_reason == "completed"
    m = json.loads((res.run_dir / "run.json").read_text())
    pr = m["backend"]["precision"]
    assert pr["params"] == "bf16" and pr["low_precision"] == "nvfp4_emulated"
    assert pr["parameters"]["numel_by_dtype"]["bfloat16"] > pr["parameters"]["numel_by_dtype"]["float32"]
    g = pr["gemms"]
    assert g["emulated"] is True and g["converted"] > 0
    converted = {r["name"] for r in g["gemms"] if r["decision"] == "convert"}
    from megacpp.train.lowp.nvfp4 import NVFP4EmulatedLinear
    assert converted == {n for n, mod in t.model.named_modules() if isinstance(mod, NVFP4EmulatedLinear)}
    kinds = {r["kind"] for r in g["gemms"]}
    assert kinds == {"linear", "embedding", "grouped_experts"}
    assert all(r["reason"] for r in g["gemms"])
    train = [r for r in read_metrics(res.run_dir) if r["kind"] == "train"]
    assert len(train) == 3 and all(r["finite"] and r["stepped"] for r in train)


def test_trainer_refuses_fp8_on_cpu(tmp_path, precision_snapshot):
    t = _trainer(tmp_path, precision_snapshot, "fp8", **{
        "policy.precision.compute": "bf16", "policy.precision.low_precision": "fp8_rowwise"})
    with pytest.raises(MegacppError, match="policy.precision.low_precision=fp8_rowwise"):
        t.run()
    assert not (tmp_path / "fp8" / "run.json").exists()


def test_trainer_logs_an_overflow_step_as_not_stepped(tmp_path, precision_snapshot, monkeypatch):
    import megacpp.train.trainer as trainer_mod

    calls = {"n": 0}

    class CPUScaled(Precision):
        """fp32 compute with a CPU loss scaler; the 5th scaled loss (step 2) overflows."""

        def __init__(self, spec, device):
            super().__init__(spec, device)
            self.scaler = make_scaler(spec, device)

        def scale(self, loss):
            calls["n"] += 1
            return super().scale(loss * float("inf") if calls["n"] == 5 else loss)

    monkeypatch.setattr(trainer_mod, "Precision", CPUScaled)
    t = _trainer(tmp_path, precision_snapshot, "fp16", **{"policy.precision.loss_scale_init": 1024.0})
    res = t.run()
    assert t.accum == 2
    train = {r["step"]: r for r in read_metrics(res.run_dir) if r["kind"] == "train"}
    assert train[2]["stepped"] is False and train[2]["finite"] is False
    assert all(train[s]["stepped"] for s in train if s != 2)
    assert t.precision.scaler.get_scale() == 512.0
    assert all(int(st["step"]) == 5 for st in t.opt.adamw.state.values())  # 6 steps, one skipped
    m = json.loads((res.run_dir / "run.json").read_text())
    assert m["backend"]["precision"]["loss_scale"]["current"] == 512.0
    assert any("step 2" in w for w in m["outcome"]["warnings"])


def test_bf16_nvfp4_run_resumes_with_its_dtypes(tmp_path, precision_snapshot):
    sets = {"policy.precision.compute": "bf16", "policy.precision.params": "bf16",
            "policy.precision.low_precision": "nvfp4_emulated", "policy.steps": 4,
            "policy.checkpoint_interval": 2, "policy.patches.linear_ce": "off"}
    recipe = megacpp.load_recipe("nam-tiny", tiny_sets(**sets))
    first = Trainer(recipe, tmp_path / "r", precision_snapshot, device="cpu", quiet=True, max_steps=2).run()
    assert first.end_reason == "max_steps"
    t = Trainer(recipe, tmp_path / "r", precision_snapshot, resume=True, device="cpu", quiet=True)
    res = t.run()
    assert res.end_reason == "completed" and res.steps == 4
    for name, p in t.model.named_parameters():
        assert p.dtype == (torch.float32 if kept(name) else torch.bfloat16), name
    for st in t.opt.adamw.state.values():
        assert int(st["step"]) == 4


def test_fp32_matmul_is_recipe_policy_and_recorded():
    from megacpp.errors import RecipeError
    from megacpp.train.precision import Precision

    r = megacpp.load_recipe("nam-tiny", ["policy.precision.fp32_matmul=ieee"])
    assert r.policy.precision.fp32_matmul == "ieee"
    # on CPU the switch does nothing, and the manifest says so
    assert Precision(r.policy.precision, torch.device("cpu")).describe()["fp32_matmul"] == "ieee (cpu)"
    with pytest.raises(RecipeError, match="fp32_matmul"):
        megacpp.load_recipe("nam-tiny", ["policy.precision.fp32_matmul=fast"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp32_matmul_sets_the_tf32_switches_on_cuda():
    from megacpp.train.precision import Precision

    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        for mode, want in (("tf32", True), ("ieee", False), ("tf32", True)):
            spec = megacpp.load_recipe("nam-tiny", [f"policy.precision.fp32_matmul={mode}"]).policy.precision
            p = Precision(spec, torch.device("cuda"))
            assert torch.backends.cuda.matmul.allow_tf32 is want and torch.backends.cudnn.allow_tf32 is want
            assert p.describe()["fp32_matmul"] == mode
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
