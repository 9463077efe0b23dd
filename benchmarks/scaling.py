"""Data-parallel scaling: tokens/s per device, MFU and peak memory at 1, 2, 4 ... processes.

For each recipe and world size, launches `torchrun --nproc_per_node N -m
megacpp train` on one snapshot with the global batch scaled by N (the
per-device batch stays the recipe's), runs --steps steps, and reads the
run's metrics.jsonl: median step tokens/s over the steps after --skip
(compile and warm-up), per device, MFU, peak memory. Scaling efficiency =
tokens/s per device at N / at 1. NVLink multicast stays off (NCCL_NVLS_ENABLE=0).

    python benchmarks/scaling.py --data SNAPSHOT --recipes nam-125m nam-1b --worlds 1 2 4 \
        [--sharding fsdp2] [--steps 30] [--skip 10] [--json OUT] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run_one(recipe: str, world: int, args, out_root: Path) -> dict:
    import megacpp

    r = megacpp.load_recipe(recipe)
    out = out_root / f"{recipe}-w{world}"
    shutil.rmtree(out, ignore_errors=True)
    mb = args.micro_batch or r.policy.micro_batch
    sets = {"policy.parallel.data": world, "policy.parallel.sharding": args.sharding if world > 1 else "none",
            "policy.micro_batch": mb, "policy.global_batch": mb * world, "policy.steps": args.steps,
            "policy.eval_batches": 0, "policy.checkpoint_interval": 10**9, "policy.log_interval": 10**9}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
           "--master_port", str(args.master_port + world), "-m", "megacpp", "train", "--recipe", recipe,
           "--data", args.data, "--out", str(out), "--quiet", "--max-steps", str(args.steps)]
    if args.device:
        cmd += ["--device", args.device]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    for item in args.set or []:  # a layout variant (only where world > 1 for fsdp2 keys)
        if world > 1 or not item.startswith("policy.parallel."):
            cmd += ["--set", item]
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1")
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        return {"recipe": recipe, "world": world, "error": f"timed out after {args.timeout} s\n{err[-600:]}"}
    if p.returncode != 0:
        return {"recipe": recipe, "world": world, "error": p.stderr[-800:]}
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    train = [x for x in recs if x.get("kind") == "train"][args.skip:]
    backend = json.loads((out / "run.json").read_text()).get("backend", {})
    comp = backend.get("compile", {})
    tps = statistics.median(x["tokens_per_s"] for x in train)
    mfu = [x["mfu"] for x in train if x.get("mfu") is not None]
    return {"recipe": recipe, "world": world, "micro_batch": mb, "sharding": sets["policy.parallel.sharding"],
            "tokens_per_s": tps, "tokens_per_s_per_device": tps / world,
            "mfu": statistics.median(mfu) if mfu else None,
            "peak_memory_gib_rank0": max(x.get("peak_memory_gib", 0) for x in train), "steps_measured": len(train),
            "device": backend.get("name") or backend.get("device"), "layout": backend.get("layout"),
            "ssd_backend": backend.get("ssd_backend"), "attention_backend": backend.get("attention_backend"),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "variant": args.tag or "", "sets": list(args.set or []),  # the FSDP2 policy: layout.fsdp2_mixed_precision
            # a sharded run must compile the graphs of one process (see
            # tests/distributed/test_dist_units.py::test_fsdp2_keeps_the_compiled_layer_graphs)
            "compile_graphs": comp.get("unique_graphs"), "graph_breaks": comp.get("graph_breaks"),
            "recompiles": comp.get("recompiles"),
            "data_seconds_median": statistics.median(x.get("data_seconds", 0.0) for x in train)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--recipes", nargs="+", default=["nam-125m", "nam-1b"])
    ap.add_argument("--worlds", nargs="+", type=int, default=[1, 2, 4])
    ap.add_argument("--sharding", default="fsdp2", choices=["ddp", "fsdp2"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--skip", type=int, default=10)
    ap.add_argument("--device")
    ap.add_argument("--micro-batch", type=int, default=0,
                    help="per-device batch (default: the recipe's micro batch); global = micro x world")
    ap.add_argument("--timeout", type=int, default=540)
    ap.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="extra recipe override for every run, e.g. policy.parallel.reshard_after_forward=false")
    ap.add_argument("--tag", default="", help="a name for this variant in the table")
    ap.add_argument("--json")
    ap.add_argument("--master-port", type=int, default=29500,
                    help="torchrun port = this + world size (distinct bases let runs share a machine)")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="print one table from the --json files of earlier runs (no training)")
    args = ap.parse_args()
    if args.merge:
        rows = [r for f in args.merge if Path(f).exists() for r in json.loads(Path(f).read_text())]
        print_table(rows)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        return 0
    out_root = Path(tempfile.mkdtemp(prefix="megacpp-scaling-"))
    rows = [run_one(r, w, args, out_root) for r in args.recipes for w in args.worlds]
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    shutil.rmtree(out_root, ignore_errors=True)
    return 0


def print_table(rows: list[dict]) -> None:
    """Efficiency: per-device tokens/s over the 1-GPU run of the same recipe and micro batch."""
    key = lambda r: (r["recipe"], r.get("micro_batch"))  # noqa: E731
    rows = sorted(rows, key=lambda r: (r["recipe"], r.get("micro_batch") or 0, r["world"], r.get("sharding") or "",
                                       r.get("variant") or ""))
    base = {key(r): r["tokens_per_s_per_device"] for r in rows if r.get("world") == 1 and "error" not in r}
    print(f"{'recipe':10} {'N':>2} {'mb':>3} {'sharding':>8} {'variant':>10} {'tokens/s':>11} {'per device':>11} "
          f"{'efficiency':>10} {'MFU':>6} {'peak GiB':>9} {'graphs':>6} {'breaks':>6}")
    for r in rows:
        head = (f"{r['recipe']:10} {r['world']:>2} {r.get('micro_batch') or '-':>3} {r.get('sharding') or '-':>8} "
                f"{r.get('variant') or '-':>10}")
        if "error" in r:
            print(f"{head} failed: {r['error'].splitlines()[-1] if r['error'] else ''}")
            continue
        eff = r["tokens_per_s_per_device"] / base[key(r)] if key(r) in base else float("nan")
        mfu = f"{r['mfu'] * 100:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"{head} {r['tokens_per_s']:>11,.0f} {r['tokens_per_s_per_device']:>11,.0f} "
              f"{eff:>10.2f} {mfu:>6} {r['peak_memory_gib_rank0']:>9.1f} {r.get('compile_graphs', '-')!s:>6} "
              f"{r.get('graph_breaks', '-')!s:>6}")


if __name__ == "__main__":
    sys.exit(main())
