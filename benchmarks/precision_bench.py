"""Precision recipes on one GPU: step throughput, and loss curves side by side.

Throughput: for each recipe (default nam-125m and nam-1b), the training step
of `megacpp.train.bench.run_bench` (AdamW, the recipe's patches, compile
and activation checkpointing, synthetic packed rows) under
  bf16            policy.precision.compute=bf16, low_precision=none
  fp8_rowwise     compute=bf16, low_precision=fp8_rowwise   (torchao)
  fp8_tensorwise  compute=bf16, low_precision=fp8_tensorwise (torchao)
printing tokens/s (median step), MFU, peak memory and how many GEMMs the
conversion filter converted. A mode this device cannot run (FP8 without
compute capability 8.9, fp16 on CPU) prints its refusal instead of a number.

Loss curves: one recipe (default nam-125m) trained by `megacpp train`'s
Trainer for --steps steps (default 500) on the same data snapshot, seed and
data order, under bf16, fp16 (dynamic loss scaling), fp8 (rowwise) and
nvfp4_emulated; printed every tenth of the run, then the mean loss of the
last tenth, its difference to bf16, and the steps fp16 skipped on overflow.

Results merge into --json (default precision_bench.json) keyed by part,
recipe and mode, and the tables print everything that file holds, so the
parts can run as separate commands under a per-command time limit. On the
lent GPU machine (carry .whl, .gpudata and a torchao wheel: the machine has
none; torchao 0.18.0 ran with its torch 2.11), one command each:

    source benchmarks/gpu_session.sh   # then pip install --no-deps --target /tmp/site <torchao wheel>
    python3 benchmarks/precision_bench.py --part throughput --recipes nam-125m
    python3 benchmarks/precision_bench.py --part throughput --recipes nam-1b
    python3 benchmarks/precision_bench.py --part curves --data .gpudata/cpp-125m --modes bf16
    ... and likewise --modes fp16, --modes fp8, --modes nvfp4_emulated

Use a real snapshot (--data): /usr/include there holds ~2 MiB of C++, which
500 steps of nam-125m would repeat dozens of times. Without compile, nam-125m
ran ~52k tokens/s in bf16 and ~37k in nvfp4_emulated on an H200, so 500
steps of 64k tokens take 10-15 min: with the recipe's compile it is less,
else pass --time-limit (a run stops there; the table compares the common
prefix of the curves) or fewer --steps.
CPU proof that it runs (tiny model, a 1 MiB snapshot from /usr/include;
linear_ce off because its chunked CPU backend fails under CPU bf16 autocast):
    python benchmarks/precision_bench.py --recipe nam-tiny --steps 5 --set policy.patches.linear_ce=off
"""
from __future__ import annotations

import argparse
import gzip
import gc
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

THROUGHPUT_MODES = {
    "bf16": {"policy.precision.compute": "bf16", "policy.precision.low_precision": "none"},
    "fp8_rowwise": {"policy.precision.compute": "bf16", "policy.precision.low_precision": "fp8_rowwise"},
    "fp8_tensorwise": {"policy.precision.compute": "bf16", "policy.precision.low_precision": "fp8_tensorwise"},
}
CURVE_MODES = {
    "bf16": {"policy.precision.compute": "bf16", "policy.precision.low_precision": "none"},
    "fp16": {"policy.precision.compute": "fp16", "policy.precision.low_precision": "none"},
    "fp8": {"policy.precision.compute": "bf16", "policy.precision.low_precision": "fp8_rowwise"},
    "nvfp4_emulated": {"policy.precision.compute": "bf16", "policy.precision.low_precision": "nvfp4_emulated"},
}


def _sets(*dicts, extra=()) -> list[str]:
    merged: dict = {}
    for d in dicts:
        merged.update(d)
    return [f"{k}={v}" for k, v in merged.items()] + list(extra)


def _free(device: torch.device) -> None:
    gc.collect()
    torch._dynamo.reset()  # one model's compiled graphs must not count against the next's limits
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def converted_count(recipe) -> tuple[int, int]:
    """(converted, GEMM rows) of the conversion filter, from a meta-device model (no memory)."""
    import megacpp
    from megacpp.train.lowp import plan_conversion

    with torch.device("meta"):
        model = megacpp.build_model(recipe.model)
    p = recipe.policy.precision
    rows = plan_conversion(model, p.fp32_modules, p.min_gemm_size)
    return sum(r.convert for r in rows), len(rows)


# ----------------------------------------------------------------- throughput
def throughput(args, device, results: dict) -> None:
    from megacpp import load_recipe
    from megacpp.errors import MegacppError
    from megacpp.train.bench import run_bench

    for name in args.recipes:
        for mode, sets in THROUGHPUT_MODES.items():
            key = f"throughput/{name}/{mode}"
            recipe = load_recipe(name, _sets(sets, extra=args.set))
            conv, total = converted_count(recipe) if mode != "bf16" else (0, 0)
            row = {"recipe": name, "mode": mode, "converted": conv, "gemms": total}
            t0 = time.time()
            try:
                r = run_bench(recipe, steps=args.bench_steps, warmup=args.warmup, device=str(device),
                              family_times=False, micro_batch=args.micro_batch)
                row.update(tokens_per_s=r.tokens_per_s, mfu=r.mfu, peak_memory_gib=r.peak_memory_gib,
                           step_ms=r.step_ms_median, batch=r.batch, seq_len=r.seq_len, device=r.device)
            except MegacppError as e:
                row["error"] = str(e)
            except torch.OutOfMemoryError as e:
                row["error"] = f"out of memory: {str(e).splitlines()[0]}"
            row["wall_s"] = round(time.time() - t0, 1)
            results[key] = row
            print(f"[throughput] {name} {mode}: " + (row.get("error") or
                  f"{row['tokens_per_s']:,.0f} tokens/s, peak {row['peak_memory_gib']:.2f} GiB"), flush=True)
            _free(device)


def throughput_table(results: dict) -> str:
    rows = [v for k, v in results.items() if k.startswith("throughput/")]
    if not rows:
        return ""
    out = ["throughput (megacpp.train.bench.run_bench: median step after warm-up, synthetic packed rows)",
           f"{'recipe':10} {'mode':15} {'tokens/s':>11} {'vs bf16':>8} {'MFU':>6} {'peak GiB':>9} "
           f"{'converted':>10}  device"]
    base = {r["recipe"]: r.get("tokens_per_s") for r in rows if r["mode"] == "bf16"}
    for r in rows:
        if "error" in r:
            out.append(f"{r['recipe']:10} {r['mode']:15} n/a: {r['error']}")
            continue
        b = base.get(r["recipe"])
        rel = f"{r['tokens_per_s'] / b:.2f}x" if b else "-"
        mfu = f"{r['mfu'] * 100:.1f}%" if r.get("mfu") is not None else "n/a"
        conv = f"{r['converted']}/{r['gemms']}" if r["gemms"] else "-"
        out.append(f"{r['recipe']:10} {r['mode']:15} {r['tokens_per_s']:>11,.0f} {rel:>8} {mfu:>6} "
                   f"{r['peak_memory_gib']:>9.2f} {conv:>10}  {r['device']}")
    return "\n".join(out)


# ----------------------------------------------------------------- curves
def snapshot_for(recipe, args, work: Path) -> Path:
    """--data, or a snapshot packed for this recipe from the C/C++ headers under /usr/include."""
    if args.data:
        return Path(args.data)
    from megacpp.data.prepare import PrepareConfig, prepare_snapshot

    pol = recipe.policy
    # ~4 bytes per token, plus the val/test splits: repeat no data when the cap allows
    need = pol.global_batch * pol.seq_len * args.steps * 4 * 1.15
    max_bytes = int(min(args.data_bytes, max(need, 1 << 20)))
    out = work / f"snap-{recipe.model.name}-{pol.seq_len}-{max_bytes}"
    if not (out / "snapshot.json").exists():
        t0 = time.time()
        cfg = PrepareConfig(vocab_size=min(recipe.model.vocab_size, 32768), seq_len=pol.seq_len,
                            max_bytes=max_bytes, split=(0.9, 0.05, 0.05))
        prepare_snapshot(out, ["dir:/usr/include"], cfg)
        print(f"[data] snapshot of {max_bytes / 2**20:.1f} MiB from /usr/include in "
              f"{time.time() - t0:.0f} s: {out}", flush=True)
    return out


def curves(args, device, results: dict, work: Path) -> None:
    from megacpp import load_recipe
    from megacpp.errors import MegacppError
    from megacpp.train.metrics import read_metrics
    from megacpp.train.trainer import Trainer

    name = args.curve_recipe
    run_sets = {"policy.steps": args.steps, "policy.eval_batches": args.eval_batches,
                "policy.eval_interval": args.steps, "policy.checkpoint_interval": args.steps + 1,
                "policy.log_interval": max(1, args.steps // 10)}
    if args.micro_batch:
        run_sets["policy.micro_batch"] = args.micro_batch
    data = snapshot_for(load_recipe(name, _sets(run_sets, extra=args.set)), args, work)
    for mode in args.modes:
        recipe = load_recipe(name, _sets(run_sets, CURVE_MODES[mode], extra=args.set))
        key = f"curves/{name}/{mode}"
        row = {"recipe": name, "mode": mode, "steps": args.steps, "seed": recipe.policy.seed,
               "low_precision": recipe.policy.precision.low_precision}
        out = work / f"run-{name}-{mode}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.time()
        try:
            # max_steps: stop after the last step without writing a final checkpoint
            t = Trainer(recipe, out, data, device=str(device), quiet=True, max_steps=args.steps,
                        time_limit=args.time_limit)
            t.run()
            train = [r for r in read_metrics(out) if r["kind"] == "train"]
            m = json.loads((out / "run.json").read_text())
            g = m["backend"]["precision"].get("gemms", {})
            # grad_norm: before clipping; a mode whose norm runs far above bf16's
            # has its updates shrunk by the clip, which the loss alone hides
            row.update(loss=[r["loss"] for r in train], stepped=[r["stepped"] for r in train],
                       grad_norm=[r["grad_norm"] for r in train],
                       end_reason=m["outcome"]["end_reason"],
                       tokens_per_s=sorted(r["tokens_per_s"] for r in train)[len(train) // 2],
                       converted=g.get("converted", 0), emulated=g.get("emulated", False),
                       snapshot_id=m["backend"]["data"]["snapshot_id"],
                       device=m["backend"].get("name") or m["backend"]["device"])
            if "loss_scale" in m["backend"]["precision"]:
                row["final_loss_scale"] = m["backend"]["precision"]["loss_scale"]["current"]
        except MegacppError as e:
            row["error"] = str(e)
        except torch.OutOfMemoryError as e:
            row["error"] = f"out of memory: {str(e).splitlines()[0]}"
        row["wall_s"] = round(time.time() - t0, 1)
        results[key] = row
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
        msg = row.get("error") or f"final loss {row['loss'][-1]:.4f}, {row['wall_s']:.0f} s"
        print(f"[curves] {name} {mode}: {msg}", flush=True)
        _free(device)


def plot_curves(results: dict, png: Path) -> None:
    """Train loss per step of every curve in results, one panel per recipe,
    plus each mode's difference to bf16 (a 25-step running mean)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [v for k, v in results.items() if k.startswith("curves/") and "loss" in v]
    fig, (ax, dx) = plt.subplots(1, 2, figsize=(12, 4.5))
    base = next((r for r in rows if r["mode"] == "bf16"), None)
    for r in rows:
        steps = range(1, len(r["loss"]) + 1)
        ax.plot(steps, r["loss"], lw=0.8, label=f"{r['mode']} ({len(r['loss'])} steps)")
        if base is not None and r is not base:
            n = min(len(r["loss"]), len(base["loss"]))
            d = [a - b for a, b in zip(r["loss"][:n], base["loss"][:n])]
            k = 25
            smooth = [sum(d[max(0, i - k + 1): i + 1]) / len(d[max(0, i - k + 1): i + 1]) for i in range(n)]
            dx.plot(range(1, n + 1), smooth, lw=0.9, label=r["mode"])
    ax.set(xlabel="step", ylabel="train loss (nats/token)", ylim=(None, 8),
           title=f"{rows[0]['recipe'] if rows else ''}: same data and seed")
    dx.axhline(0, color="k", lw=0.5)
    dx.set(xlabel="step", ylabel="loss minus bf16 (25-step mean)", title="difference to bf16")
    ax.legend()
    dx.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def _tail_mean(xs: list[float]) -> float:
    k = max(1, len(xs) // 10)
    tail = [x for x in xs[-k:] if math.isfinite(x)]
    return sum(tail) / len(tail) if tail else float("nan")


def curves_table(results: dict) -> str:
    out = []
    by_recipe: dict[str, list[dict]] = {}
    for k, v in results.items():
        if k.startswith("curves/"):
            by_recipe.setdefault(v["recipe"], []).append(v)
    for name, rows in by_recipe.items():
        ok = [r for r in rows if "loss" in r]
        n = min((len(r["loss"]) for r in ok), default=0)
        out.append(f"loss curves: {name}, train loss (nats/token) per step, seed {rows[0]['seed']}, "
                   f"same data order" + (f", snapshot {ok[0]['snapshot_id'][:12]}" if ok else ""))
        out.append(f"{'step':>6} " + " ".join(f"{r['mode']:>15}" for r in ok))
        marks = sorted({0, n - 1, *range(max(1, n // 10) - 1, n, max(1, n // 10))}) if n else []
        for i in marks:
            out.append(f"{i + 1:>6} " + " ".join(f"{r['loss'][i]:>15.4f}" for r in ok))
        base = next((r for r in ok if r["mode"] == "bf16"), None)
        tail = {r["mode"]: _tail_mean(r["loss"][:n]) for r in ok}
        out.append(f"{'last 10% mean':>14}: " + ", ".join(f"{m} {v:.4f}" for m, v in tail.items()))
        if base:
            out.append(f"{'vs bf16':>14}: " + ", ".join(f"{m} {v - tail['bf16']:+.4f}" for m, v in tail.items()
                                                        if m != "bf16"))
        for r in ok:
            skipped = sum(not s for s in r["stepped"])
            extra = f", final loss scale {r['final_loss_scale']:g}" if "final_loss_scale" in r else ""
            conv = f", {r['converted']} GEMMs converted" + (" (emulated)" if r["emulated"] else "") \
                if r["converted"] else ""
            stop = "" if r.get("end_reason") in (None, "max_steps", "completed") else \
                f", stopped by {r['end_reason']} after {len(r['loss'])} steps"
            # steps the fp16 scaler skipped (overflow) have no gradient norm
            gn = sorted(g for g in r.get("grad_norm") or [] if g is not None) or [float("nan")]
            out.append(f"  {r['mode']}: {skipped} steps skipped{extra}{conv}; median grad norm "
                       f"{gn[len(gn) // 2]:.3g} (before clipping); median {r['tokens_per_s']:,.0f} "
                       f"tokens/s; {r['wall_s']:.0f} s on {r['device']}{stop}")
        for r in rows:
            if "error" in r:
                out.append(f"  {r['mode']}: n/a: {r['error']}")
    return "\n".join(out)


# ----------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", help="one recipe for both parts (e.g. nam-tiny for a CPU check)")
    ap.add_argument("--recipes", default="nam-125m,nam-1b", help="throughput recipes, comma-separated")
    ap.add_argument("--curve-recipe", default="nam-125m")
    ap.add_argument("--part", choices=("throughput", "curves", "all", "report"), default="all",
                    help="report: run nothing, print the tables of --json (plain or .gz)")
    ap.add_argument("--plot", help="write the loss curves of the results to this PNG")
    ap.add_argument("--modes", default=",".join(CURVE_MODES), help="curve modes, comma-separated")
    ap.add_argument("--steps", type=int, default=500, help="loss-curve steps")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="curves: seconds per run, after which it stops early (shorter curve)")
    ap.add_argument("--bench-steps", type=int, default=20, help="timed throughput steps")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--micro-batch", type=int, default=None)
    ap.add_argument("--eval-batches", type=int, default=0, help="curves: validation batches at the end (0: none)")
    ap.add_argument("--data", help="snapshot directory for the curves (default: prepare one from /usr/include)")
    ap.add_argument("--data-bytes", type=int, default=160 << 20, help="cap on the prepared snapshot's text")
    ap.add_argument("--work", help="directory for snapshots and runs (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the curve run directories")
    ap.add_argument("--device", default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="recipe override applied to every run, e.g. policy.compile.mode=none")
    ap.add_argument("--json", default="precision_bench.json", help="results file, merged across invocations")
    args = ap.parse_args(argv)
    if args.recipe:
        args.recipes = args.curve_recipe = args.recipe
    args.recipes = [r for r in args.recipes.split(",") if r]
    args.modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in args.modes if m not in CURVE_MODES]
    if bad:
        ap.error(f"--modes: unknown {bad}; choose from {', '.join(CURVE_MODES)}")
    if args.steps < 1:
        ap.error("--steps must be >= 1")

    from megacpp.train.device import pick_device
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    path = Path(args.json)
    results = {}
    if path.is_file():
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        results = json.loads(raw)
    tmp = None
    if args.work:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tmp := tempfile.mkdtemp(prefix="precision_bench-"))
    try:
        if args.part in ("throughput", "all"):
            throughput(args, device, results)
            path.write_text(json.dumps(results, indent=1))
        if args.part in ("curves", "all"):
            curves(args, device, results, work)
            path.write_text(json.dumps(results, indent=1))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    print()
    for text in (throughput_table(results), curves_table(results)):
        if text:
            print(text + "\n")
    if args.plot:
        plot_curves(results, Path(args.plot))
        print(f"plot: {args.plot}")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
