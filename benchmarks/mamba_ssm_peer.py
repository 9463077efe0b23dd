"""Peer: mamba_ssm's Mamba-2 LM vs `megacpp bench` at the same shape (issue 8).

Builds mamba_ssm's MambaLMHeadModel at an all-M recipe's shape (default
`mamba2-130m`: 24 x d768, state 128, head dim 64, expand 2, tied
embeddings, vocab 32768) and times the same training step as FACTS §3 and
`megacpp bench`: bf16 autocast over float32 parameters (how mamba_ssm is
normally trained: AMP), fused AdamW, random tokens, batch 8 x seq 2048,
median step after warm-up (CUDA events). Then runs `megacpp bench` for the
recipe at the same batch and sequence in a subprocess (so neither run's
memory, Triton allocator or compile caches touch the other) and prints one
table last.

mamba_ssm without its CUDA build: the package's `__init__` imports the
Mamba-1 extension `selective_scan_cuda` unconditionally, so a stub module
stands in for it (its functions raise if called; Mamba-2 never calls them).
`causal_conv1d` is blocked (not stubbed) by default, so mamba_ssm's own
ImportError fallbacks run: what runs per layer is
  Triton fused residual-add + RMSNorm (ops/triton/layer_norm.py)
  -> in_proj (nn.Linear)
  -> depthwise causal conv as torch nn.Conv1d + SiLU (the causal_conv1d_fn-is-None branch)
  -> SSD scan mamba_chunk_scan_combined (Triton, ops/triton/ssd_*.py)
  -> gated RMSNorm (Triton, ops/triton/layernorm_gated.py) -> out_proj.
The fused `use_mem_eff_path` (mamba_split_conv1d_scan_combined) needs
causal_conv1d's CUDA functions, so it is off unless --causal-conv1d auto
finds a real build and --mem-eff-path is given. The script prints which
branch each of these took. Rows are unpacked (no seq_idx): mamba_ssm's
varlen conv needs causal_conv1d; megacpp bench runs its document-masked
packed rows, so megacpp does a little more work per token.

    python benchmarks/mamba_ssm_peer.py [--recipe mamba2-130m] [--batch 8] [--steps 20]
        [--warmup 5] [--compile] [--json OUT]
    python benchmarks/mamba_ssm_peer.py --check     # CPU: stubs + import + construction only

Wheels: .whl/ carries mamba_ssm-2.3.2.post1-py3-none-any (built from the
source archive with MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE) and
einops; install with `pip install --no-deps --target /tmp/site .whl/*.whl`.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import types

PEAK_FALLBACK = 989e12      # FACTS §3's denominator (H100/H200 dense bf16)
STUB_ATTR = "__megacpp_stub__"


# ------------------------------------------------------------------ stubs
def _stub_module(name: str) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__file__ = f"<megacpp stub for {name}>"
    setattr(mod, STUB_ATTR, True)

    def _missing(attr):
        def fn(*args, **kwargs):
            raise RuntimeError(f"{name}.{attr} called, but {name} is a stub installed by "
                               f"benchmarks/mamba_ssm_peer.py (no CUDA build of it here)")
        return fn

    def __getattr__(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _missing(attr)

    mod.__getattr__ = __getattr__
    return mod


def install_stubs(causal_conv1d: str = "off") -> dict:
    """Make `import mamba_ssm` work without its CUDA extensions; report what was done.

    selective_scan_cuda (Mamba-1's CUDA scan, imported unconditionally by
    mamba_ssm/__init__ via ops/selective_scan_interface.py): a stub unless a
    real build is importable. causal_conv1d: "off" puts None in sys.modules
    so every `import causal_conv1d...` raises ImportError and mamba_ssm takes
    its torch fallback; "auto" leaves a real install (if any) alone.
    """
    report = {}
    if "mamba_ssm" in sys.modules:
        raise RuntimeError("install_stubs() must run before mamba_ssm is imported")
    if importlib.util.find_spec("selective_scan_cuda") is None:
        sys.modules["selective_scan_cuda"] = _stub_module("selective_scan_cuda")
        report["selective_scan_cuda"] = "stub (Mamba-1 scan; raises if called)"
    else:
        report["selective_scan_cuda"] = "real build"
    for name in ("causal_conv1d", "causal_conv1d_cuda"):
        if causal_conv1d == "off":
            sys.modules[name] = None  # import raises ImportError -> mamba_ssm's fallbacks
            report[name] = "blocked (ImportError -> fallback)"
        else:
            report[name] = "real build" if importlib.util.find_spec(name) else "absent (fallback)"
    return report


# ------------------------------------------------------------------ peer model
def peer_config(recipe, chunk_size: int, mem_eff_path: bool) -> dict:
    m = recipe.model
    if set(recipe.layers.letters) != {"M"} or m.mamba.version != 2:
        raise SystemExit(f"mamba_ssm_peer: recipe {m.name!r} must be all-M Mamba-2 "
                         f"(got pattern {m.pattern!r}, Mamba version {m.mamba.version})")
    mb = m.mamba
    return dict(
        d_model=m.hidden_size, d_intermediate=0, n_layer=m.depth, vocab_size=m.vocab_size,
        ssm_cfg={"layer": "Mamba2", "d_state": mb.state_dim, "headdim": mb.head_dim,
                 "expand": mb.expand, "ngroups": mb.num_groups, "d_conv": mb.conv_width,
                 "chunk_size": chunk_size or mb.chunk_size, "dt_min": mb.dt_min, "dt_max": mb.dt_max,
                 "use_mem_eff_path": mem_eff_path},
        rms_norm=True, residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=8,
        tie_embeddings=m.tie_embeddings)


def build_peer(cfg: dict, device):
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    return MambaLMHeadModel(MambaConfig(**cfg), device=device)


def code_paths(model, stubs: dict) -> dict:
    """Which branch mamba_ssm takes at each point, read off its modules and the built model."""
    import mamba_ssm.models.mixer_seq_simple as mss
    import mamba_ssm.modules.mamba2 as m2
    from mamba_ssm.ops.triton import ssd_combined

    mixer = model.backbone.layers[0].mixer
    fused_norm = bool(model.backbone.fused_add_norm and mss.layer_norm_fn is not None)
    if mixer.use_mem_eff_path:
        conv = ("causal_conv1d fwd/bwd inside mamba_split_conv1d_scan_combined"
                if ssd_combined.causal_conv1d_fwd_function is not None else "MISSING causal_conv1d (will fail)")
        ssd = "mamba_split_conv1d_scan_combined (Triton SSD + conv + gated norm + out_proj fused)"
        gate = "fused in mamba_split_conv1d_scan_combined"
    else:
        conv = ("causal_conv1d_fn (CUDA)" if m2.causal_conv1d_fn is not None
                else "torch nn.Conv1d + SiLU (causal_conv1d_fn is None)")
        ssd = "mamba_chunk_scan_combined (Triton)"
        gate = ("RMSNormGated, Triton layernorm_gated" if mixer.rmsnorm else "z gate inside the Triton scan")
    return {
        "stubs": stubs,
        "causal_conv1d_fn_is_none": m2.causal_conv1d_fn is None,
        "use_mem_eff_path": bool(mixer.use_mem_eff_path),
        "conv1d": conv,
        "ssd_scan": ssd,
        "gated_norm": gate,
        "block_add_norm": ("Triton layer_norm_fn (fused residual add + RMSNorm)" if fused_norm
                           else "torch RMSNorm (unfused)"),
        "residual_in_fp32": bool(model.backbone.residual_in_fp32),
        "chunk_size": int(mixer.chunk_size),
        "tied_embeddings": model.lm_head.weight is model.backbone.embedding.weight,
        "loss": "logits -> F.cross_entropy (float32 under autocast)",
    }


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights counted once


# ------------------------------------------------------------------ GPU runs
def time_peer(model, args, B: int, T: int, vocab: int) -> dict:
    import torch
    import torch.nn.functional as F

    dev = torch.device("cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    fwd = torch.compile(model) if args.compile else model
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, vocab, (B, T + 1), generator=g).to(dev)
    inp, labels = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    torch.cuda.reset_peak_memory_stats(dev)
    times, first_loss = [], None

    def one_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = fwd(inp).logits
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for i in range(args.warmup + args.steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(dev)
        start.record()
        loss = one_step()
        end.record()
        torch.cuda.synchronize(dev)
        if i == 0:
            first_loss = float(loss.detach())
        if i >= args.warmup:
            times.append(start.elapsed_time(end))
    med = statistics.median(times)
    from megacpp.train.kernel_profile import profile_kernels, profile_text
    prof = profile_kernels(one_step, 2, dev, top=25)
    print("\n".join(profile_text("mamba_ssm profiled step", prof)), flush=True)
    return {"step_profile": prof.to_dict(), "step_ms_median": med, "step_ms_all": times, "tokens_per_s": B * T / (med / 1e3),
            "peak_memory_gib": torch.cuda.max_memory_allocated(dev) / 2**30,
            "first_loss": first_loss, "compiled": bool(args.compile)}


def run_megacpp(args, B: int, T: int) -> dict:
    cmd = [sys.executable, "-m", "megacpp", "bench", "--recipe", args.recipe,
           "--set", f"policy.micro_batch={B}", "--set", f"policy.global_batch={B}",
           "--set", f"policy.seq_len={T}", "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--json"]
    for s in args.megacpp_set:
        cmd += ["--set", s]
    if not args.family_times:
        cmd.append("--no-family-times")
    print("+ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # stderr streams through
    out = proc.stdout
    if proc.returncode != 0:
        raise RuntimeError(f"megacpp bench exited {proc.returncode}; stdout tail:\n{out[-2000:]}")
    at = 0 if out.startswith("{") else out.find("\n{") + 1
    if at == 0 and not out.startswith("{"):
        raise RuntimeError(f"megacpp bench printed no JSON; stdout tail:\n{out[-2000:]}")
    res = json.loads(out[at:])
    res["command"] = cmd
    return res


def _versions() -> dict:
    v = {}
    for name in ("torch", "triton", "mamba_ssm", "einops", "transformers"):
        try:
            v[name] = sys.modules[name].__version__ if name in sys.modules else \
                __import__(name).__version__
        except Exception as e:  # noqa: BLE001 - a version is informational
            v[name] = f"unavailable ({type(e).__name__})"
    return v


def _table(peer: dict | None, mc: dict | None) -> str:
    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    rows = [("", "mamba_ssm", "megacpp")]
    p, m = peer or {}, mc or {}
    rows.append(("tokens/s", f(p.get("tokens_per_s"), ",.0f"), f(m.get("tokens_per_s"), ",.0f")))
    ratio = (m["tokens_per_s"] / p["tokens_per_s"]) if peer and mc else None
    rows.append(("megacpp / peer", "1.00" if peer else "-", f(ratio, ".2f")))
    rows.append(("step ms (median)", f(p.get("step_ms_median"), ".1f"), f(m.get("step_ms_median"), ".1f")))
    rows.append(("MFU(6N)", f(p.get("mfu_6n"), ".3f"), f(m.get("mfu_6n"), ".3f")))
    rows.append(("MFU(counter)", f(p.get("mfu_counter"), ".3f"), f(m.get("mfu"), ".3f")))
    rows.append(("peak GiB", f(p.get("peak_memory_gib"), ".1f"), f(m.get("peak_memory_gib"), ".1f")))
    rows.append(("params", f(p.get("params"), ",d"), f(m.get("total_params"), ",d")))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]:>{w[2]}}" for r in rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default="mamba2-130m")
    ap.add_argument("--batch", type=int, default=0, help="0: the recipe's micro_batch (8 for mamba2-130m)")
    ap.add_argument("--seq", type=int, default=0, help="0: the recipe's seq_len (2048)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the peer (default eager, as FACTS §3 measured it)")
    ap.add_argument("--chunk-size", type=int, default=0,
                    help="peer SSD chunk size; 0: the recipe's (128; mamba_ssm's own default is 256)")
    ap.add_argument("--causal-conv1d", choices=("off", "auto"), default="off",
                    help="off: block causal_conv1d so the torch conv fallback runs (FACTS §3); "
                         "auto: use a real build if one is installed")
    ap.add_argument("--mem-eff-path", action="store_true",
                    help="mamba_ssm's fused mamba_split_conv1d_scan_combined (needs real causal_conv1d)")
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--skip-megacpp", action="store_true")
    ap.add_argument("--megacpp-set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra --set for megacpp bench, e.g. policy.compile.mode=none")
    ap.add_argument("--family-times", action="store_true", help="let megacpp bench time each family too")
    ap.add_argument("--json", help="write everything here")
    ap.add_argument("--check", action="store_true",
                    help="CPU only: stubs, import mamba_ssm, build the peer model, compare its size")
    args = ap.parse_args(argv)

    import megacpp
    from megacpp.recipe.count import summarize

    if args.mem_eff_path and args.causal_conv1d == "off":
        ap.error("--mem-eff-path needs --causal-conv1d auto and a real causal_conv1d build")
    base = megacpp.load_recipe(args.recipe)
    B, T = args.batch or base.policy.micro_batch, args.seq or base.policy.seq_len
    recipe = megacpp.load_recipe(args.recipe, [f"policy.micro_batch={B}", f"policy.global_batch={B}",
                                               f"policy.seq_len={T}"])
    summ = summarize(recipe)
    cfg = peer_config(recipe, args.chunk_size, args.mem_eff_path)
    out = {"recipe": args.recipe, "recipe_hash": recipe.hash, "batch": B, "seq_len": T,
           "steps": args.steps, "warmup": args.warmup, "peer_config": cfg,
           "step": "bf16 autocast fwd, float32 params, backward, fused AdamW; random tokens",
           "megacpp_counter": {"flops_per_token": summ.flops_per_token, "total_params": summ.total_params}}

    import torch

    if not args.check and not torch.cuda.is_available():
        print("mamba_ssm_peer: CUDA is not available; this benchmark needs one CUDA GPU "
              "(use --check for the CPU-only import/construction check)", file=sys.stderr)
        return 2

    need_peer = args.check or not args.skip_peer
    peer, paths = None, None
    if need_peer:
        stubs = install_stubs(args.causal_conv1d)
        try:
            import mamba_ssm  # noqa: F401
            from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel  # noqa: F401
        except ImportError as e:
            print(f"mamba_ssm_peer: cannot import mamba_ssm ({e}); install .whl/ "
                  "(mamba_ssm, einops) with pip --no-deps --target and put it on PYTHONPATH",
                  file=sys.stderr)
            return 2
        torch.manual_seed(0)
        device = torch.device("cpu" if args.check else "cuda")
        model = build_peer(cfg, device)
        paths = code_paths(model, stubs)
        params = n_params(model)
        out["code_paths"] = paths
        print(f"mamba_ssm {mamba_ssm.__version__} from {os.path.dirname(mamba_ssm.__file__)}")
        for k, v in paths.items():
            print(f"  {k}: {v}")
        print(f"  params: mamba_ssm {params:,}, megacpp counter {summ.total_params:,}")
        if args.check:
            ok = (params == summ.total_params and not paths["use_mem_eff_path"]
                  and paths["causal_conv1d_fn_is_none"]
                  and paths["block_add_norm"].startswith("Triton"))
            out["check"] = {"params": params, "ok": ok, "versions": _versions()}
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(out, f, indent=1)
            print("check:", "ok" if ok else "FAILED (see above)")
            return 0 if ok else 1
        from megacpp.train.device import peak_flops

        peak = peak_flops(device) or PEAK_FALLBACK
        t = time_peer(model, args, B, T, recipe.model.vocab_size)
        nonemb = params - recipe.model.vocab_size * recipe.model.hidden_size
        peer = {"peer": "mamba_ssm", "params": params, **t,
                "mfu_6n": t["tokens_per_s"] * 6 * params / peak,
                "mfu_6n_nonemb": t["tokens_per_s"] * 6 * nonemb / peak,
                "mfu_counter": t["tokens_per_s"] * summ.flops_per_token / peak, "peak_flops": peak,
                "device": torch.cuda.get_device_name()}
        out["peer"] = peer
        print(f"mamba_ssm peer: {params / 1e6:.1f}M params, batch {B}x{T}, "
              f"{'compiled' if args.compile else 'eager'}: {t['step_ms_median']:.1f} ms/step, "
              f"{t['tokens_per_s']:,.0f} tokens/s, MFU(6N) {peer['mfu_6n'] * 100:.1f}%, "
              f"peak {t['peak_memory_gib']:.1f} GiB, first loss {t['first_loss']:.3f}", flush=True)
        del model
        torch.cuda.empty_cache()

    mc, status = None, 0
    if not args.skip_megacpp:
        try:
            mc = run_megacpp(args, B, T)
            from megacpp.train.device import PEAK_FLOPS
            peak = next((v for k, v in PEAK_FLOPS.items() if k in mc.get("device", "")), PEAK_FALLBACK)
            mc["mfu_6n"] = mc["tokens_per_s"] * 6 * mc["total_params"] / peak
            out["megacpp"] = mc
        except Exception as e:  # noqa: BLE001 - report, keep the peer's numbers
            print(f"mamba_ssm_peer: megacpp bench failed: {e}", file=sys.stderr)
            out["megacpp_error"] = str(e)
            status = 1
    out["versions"] = _versions()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    where = (peer or {}).get("device") or (mc or {}).get("device", "?")
    print(f"\n{args.recipe}, batch {B} x seq {T}, {where} "
          f"(peer {'compiled' if args.compile else 'eager'}, megacpp compile "
          f"{(mc or {}).get('compile', {}).get('mode', '?')}):")
    print(_table(peer, mc))
    return status


if __name__ == "__main__":
    sys.exit(main())
