"""`megacpp <command>`: the only place that parses argv.

Exit codes: 0 success, 2 bad input (one clear message, no traceback),
1 any other failure.
"""
from __future__ import annotations

import argparse
import json
import sys

from .errors import MegacppError


def _recipe_args(p, required: bool = True) -> None:
    p.add_argument("--recipe", required=required, metavar="NAME|FILE",
                   help="a preset name (see `megacpp recipes`) or a recipe TOML file")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one field by dotted name, e.g. policy.steps=200 (repeatable)")


def _load(args):
    from .recipe import load_recipe
    from .recipe.recipe import resolve

    if args.recipe is None:
        return resolve({}, args.sets, "<defaults>")
    return load_recipe(args.recipe, args.sets)


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False))


# ---------------------------------------------------------------- recipes
def _cmd_recipes(args) -> int:
    from .recipe import load_recipe
    from .recipe.count import fmt_count, summarize
    from .recipe.presets import describe_presets

    rows = []
    for name, desc in describe_presets():
        r = load_recipe(name)
        s = summarize(r)
        rows.append({"name": name, "pattern": r.model.pattern, "depth": r.model.depth,
                     "total_params": s.total_params, "active_params": s.active_params,
                     "hash": r.hash, "description": desc})
    if args.json:
        _print_json(rows)
        return 0
    for row in rows:
        print(f"{row['name']:11} {row['pattern']:>13} x{row['depth']:<3} "
              f"{fmt_count(row['total_params']):>8} total {fmt_count(row['active_params']):>8} active  "
              f"{row['description']}")
    return 0


def _cmd_describe(args) -> int:
    from .recipe.count import describe, describe_text

    recipe = _load(args)
    if args.json:
        _print_json(describe(recipe))
    elif args.toml:
        sys.stdout.write(recipe.to_toml())
    else:
        print(describe_text(recipe))
    return 0


def _cmd_args(args) -> int:
    from .recipe.launch import native_args
    from .recipe.megatron import translate

    recipe = _load(args)
    if args.target == "native":
        out = native_args(recipe)
        issues: list[str] = []
    else:
        t = translate(recipe)
        out, issues = t.args, t.issues
    if args.json:
        _print_json({"target": args.target, "recipe_hash": recipe.hash, "args": out, "issues": issues})
    else:
        # one argument per line: shell-safe to read, byte-stable to diff
        for a in out:
            print(a)
        for issue in issues:
            print(f"# translation issue: {issue}", file=sys.stderr)
    if issues and args.strict:
        print(f"megacpp: {len(issues)} translation issue(s) and --strict is set", file=sys.stderr)
        return 2
    return 0


# ---------------------------------------------------------------- train & runs
def _cmd_train(args) -> int:
    from .train.distributed import from_env
    from .train.trainer import Trainer

    recipe = _load(args)
    dist = from_env(recipe.policy.parallel.sharding, args.device)
    if dist.world_size != recipe.policy.parallel.data:
        from .errors import MegacppError
        raise MegacppError(f"policy.parallel.data is {recipe.policy.parallel.data} but {dist.world_size} "
                           f"process(es) were started; pass --set policy.parallel.data={dist.world_size}")
    profile = None
    if args.profile:
        from .errors import MegacppError
        try:
            a, b = (int(x) for x in args.profile.split(":"))
        except ValueError:
            raise MegacppError(f"--profile: expected START:END steps, got {args.profile!r}") from None
        if not 0 <= a < b:
            raise MegacppError(f"--profile: need 0 <= START < END, got {args.profile!r}")
        profile = (a, b)
    if args.profile_kernels_only and profile is None:
        from .errors import MegacppError
        raise MegacppError("--profile-kernels-only: give the steps with --profile START:END")
    trainer = Trainer(recipe, args.out, args.data, args.resume, args.device, args.quiet, dist=dist,
                      max_steps=args.max_steps, time_limit=args.time_limit, profile=profile,
                      profile_host=not args.profile_kernels_only)
    result = trainer.run()
    if dist.is_main:
        o = result.manifest["outcome"]
        print(f"run {result.run_dir}: {o['status']} ({o['end_reason']}) after {o['steps']} steps, "
              f"{o['tokens']:,} tokens, {o['wall_seconds']} s")
        if o.get("first_val_bpb") is not None:
            print(val_line(o))
    return 0


def val_line(o: dict) -> str:
    """The run's val bits/byte as evaluated: at its first eval's step and its last
    one's, or the first alone where no eval ran after it in this process
    (--max-steps, policy.eval_interval, or a resume that ended before its next eval)."""
    first, last = o.get("first_val_step"), o.get("final_val_step")

    def at(step, default):
        return f"step {step}" if step is not None else default
    head = f"val bits/byte: {o['first_val_bpb']:.4f} at {at(first, 'start')}"
    if o.get("final_val_bpb") is None:   # resumed, and ended before its next eval
        return f"{head} (no eval since the resume; the run ended at step {o['steps']})"
    if first is not None and first == last:
        return f"{head} (no eval after it; the run ended at step {o['steps']})"
    return f"{head} -> {o['final_val_bpb']:.4f} at {at(last, 'the end')}"


def _cmd_eval(args) -> int:
    from .train.device import pick_device
    from .eval.load import load_run
    from .train.trainer import Trainer, bits_per_byte, lm_loss  # noqa: F401

    device = pick_device(args.device)
    run = load_run(args.run_dir, device, args.data)
    from .eval.bpb import evaluate_split
    res = evaluate_split(run, args.split, args.batches, device)
    if args.json:
        _print_json(res)
    else:
        print(f"{run.run_dir} step {run.step} on {args.split}: loss {res['loss']:.4f} nats/token, "
              f"{res['bpb']:.4f} bits/byte over {res['tokens']:,} tokens")
    return 0


def _cmd_generate(args) -> int:
    from .data.loader import open_snapshot
    from .data.tokenizer import load_tokenizer
    from .eval.generate import sample
    from .eval.load import load_run
    from .train.device import pick_device

    device = pick_device(args.device)
    run = load_run(args.run_dir, device, args.data)
    snap = open_snapshot(run.data_dir, verify=False)
    tok = load_tokenizer(snap.tokenizer_path)
    bos, eos = snap.special_ids["bos"], snap.special_ids["eos"]
    prompt = [bos] + tok.encode(args.prompt).ids
    ids = sample(run.model, prompt, args.max_tokens, args.temperature, args.top_k, eos, args.seed, device)
    text = tok.decode(ids)
    if args.json:
        _print_json({"prompt": args.prompt, "completion": text, "tokens": len(ids)})
    else:
        print(args.prompt + text)
    return 0


def _cmd_compare(args) -> int:
    from .run.compare import compare, compare_text

    res = compare(args.run_a, args.run_b)
    if args.json:
        _print_json(res)
    else:
        print(compare_text(res))
    return 0


def _cmd_report(args) -> int:
    from .run.report import make_report

    files = make_report(args.run_dir, args.out)
    if args.json:
        _print_json(files)
    else:
        for k, v in files.items():
            print(f"{k}: {v}")
    return 0


def _cmd_patches(args) -> int:
    import torch

    from .patches.registry import all_patches
    from .train.device import pick_device

    device = pick_device(args.device)
    rows = []
    for name, patch in all_patches().items():
        backs = patch.backends(device)
        if args.action == "list":
            rows.append({"name": name, "replaces": patch.replaces,
                         "backends": [{"name": b.name, "available": b.available, "reason": b.reason,
                                       "version": b.version} for b in backs]})
            continue
        for b in backs:
            if not b.available:
                rows.append({"name": name, "backend": b.name, "dtype": "-", "passed": None,
                             "detail": f"unavailable: {b.reason}"})
                continue
            for dt in (torch.float32, torch.bfloat16):
                r = patch.parity(device, dt, b.name, small=not args.full)
                rows.append({"name": name, "backend": b.name, "dtype": r.dtype, "passed": r.passed,
                             "tolerance": r.tolerance, "max_rel_err": r.max_rel_err})
    if args.json:
        _print_json(rows)
    elif args.action == "list":
        for r in rows:
            backs = ", ".join(f"{b['name']} ({'yes ' + b['version'] if b['available'] else 'no: ' + b['reason']})"
                              for b in r["backends"])
            print(f"{r['name']:18} replaces {r['replaces']}\n{'':18} backends: {backs}")
    else:
        print(f"{'patch':18} {'backend':8} {'dtype':9} {'result':6} worst rel. error (tolerance)")
        for r in rows:
            if r["passed"] is None:
                print(f"{r['name']:18} {r['backend']:8} {'-':9} {'skip':6} {r['detail']}")
                continue
            worst = max(r["max_rel_err"].items(), key=lambda kv: kv[1])
            print(f"{r['name']:18} {r['backend']:8} {r['dtype']:9} {'pass' if r['passed'] else 'FAIL':6} "
                  f"{worst[0]} {worst[1]:.2e} ({r['tolerance']:.0e})")
    failed = [r for r in rows if r.get("passed") is False]
    return 1 if failed else 0

def _cmd_bench(args) -> int:
    from .train.bench import bench_text, run_bench

    recipe = _load(args)
    res = run_bench(recipe, steps=args.steps, warmup=args.warmup, device=args.device,
                    family_times=not args.no_family_times, data=args.data, kernels=not args.no_kernels,
                    accum=args.accum, top_kernels=args.top_kernels)
    if args.json:
        _print_json(res.to_dict())
    else:
        print(bench_text(res))
    return 0

def _cmd_doctor(args) -> int:
    from .doctor import header, rows
    from .train.device import pick_device

    device = pick_device(args.device)
    table = rows(device)
    if args.json:
        _print_json({"header": header(device), "paths": table})
        return 0
    print(header(device))
    print(f"{'hot path':30} {'runs here':44} why not the faster one")
    for r in table:
        print(f"{r['path']:30} {r['runs']:44} {r['why_not']}")
    return 0


def _add_data_commands(sub) -> None:
    """`megacpp data sources|prepare|check`: owned by the data pipeline."""
    data = sub.add_parser("data", help="C++ sources, corpus snapshots, tokenizer, packed rows")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")

    p = dsub.add_parser("sources", help="list the available sources and how each input is pinned")
    p.add_argument("--sources", nargs="+", metavar="SPEC",
                   help="resolve these instead (system, debian:PKG[=VER], debian:FILE.deb, dir:PATH); "
                        "debian: ones are downloaded into the cache")
    p.add_argument("--cache-dir", help="where debian packages are kept (default $MEGACPP_CACHE or ~/.cache/megacpp)")
    p.add_argument("--json", action="store_true")

    p = dsub.add_parser("prepare", help="build a snapshot: corpus, tokenizer, packed parquet shards")
    p.add_argument("--sources", nargs="+", default=["system"], metavar="SPEC",
                   help="system (default), debian:PKG[=VER], debian:FILE.deb, dir:PATH")
    p.add_argument("--out", required=True, help="snapshot directory to create")
    p.add_argument("--recipe", metavar="NAME|FILE", help="take vocab size and seq_len from this recipe")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override, as for other commands (repeatable)")
    p.add_argument("--vocab-size", type=int, help="tokenizer size (default: recipe's, else 4096)")
    p.add_argument("--seq-len", type=int, help="tokens per row minus one (default: recipe's, else 256)")
    p.add_argument("--max-bytes", type=int, default=None,
                   help="cap on kept text in bytes, 0 = none (default 64 MiB)")
    p.add_argument("--max-file-bytes", type=int, default=None, help="drop larger files (default 1000000)")
    p.add_argument("--near-dup-threshold", type=float, default=None, help="MinHash Jaccard threshold (default 0.8)")
    p.add_argument("--near-dup-keep", type=int, default=None,
                   help="members kept per near-duplicate group, 0 = all (default 1)")
    p.add_argument("--split", default=None, metavar="TRAIN,VAL,TEST", help="split fractions (default 0.9,0.05,0.05)")
    p.add_argument("--cache-dir", help="where debian packages are kept")
    p.add_argument("--force", action="store_true", help="replace an existing snapshot at --out")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--json", action="store_true", help="print the snapshot summary as JSON")

    p = dsub.add_parser("check", help="validate a snapshot (schema, files, sha256, parquet) and summarise it")
    p.add_argument("snapshot", help="snapshot directory")
    p.add_argument("--no-verify", action="store_true", help="skip sha256 of every file (sizes still checked)")
    p.add_argument("--json", action="store_true")


def _run_data(args) -> int:
    from pathlib import Path

    from .data import report

    if args.data_command == "sources":
        listing = report.sources_listing(args.sources, Path(args.cache_dir) if args.cache_dir else None)
        if args.json:
            _print_json(listing)
        else:
            print(report.format_sources(listing))
        return 0
    if args.data_command == "prepare":
        import dataclasses

        from .data.prepare import PrepareConfig, prepare_snapshot, sizes_from_recipe
        from .errors import DataError

        vocab, seq_len, provenance = sizes_from_recipe(args.recipe, args.vocab_size, args.seq_len, args.sets)
        overrides = {"vocab_size": vocab, "seq_len": seq_len}
        for name in ("max_bytes", "max_file_bytes", "near_dup_threshold", "near_dup_keep"):
            if getattr(args, name) is not None:
                overrides[name] = getattr(args, name)
        if args.split is not None:
            try:
                overrides["split"] = tuple(float(x) for x in args.split.split(","))
            except ValueError:
                raise DataError(f"--split: '{args.split}' is not three comma-separated fractions") from None
        config = dataclasses.replace(PrepareConfig(), **overrides)
        log = None if args.quiet else (lambda msg: print(f"[data] {msg}", file=sys.stderr, flush=True))
        snap = prepare_snapshot(args.out, args.sources, config, provenance=provenance,
                                cache_dir=args.cache_dir, force=args.force, log=log)
        summary = report.snapshot_summary(snap)
        print(json.dumps(summary, indent=2) if args.json else report.format_summary(summary))
        return 0
    if args.data_command == "check":
        from .data.loader import open_snapshot

        summary = report.snapshot_summary(open_snapshot(args.snapshot, verify=not args.no_verify))
        print(json.dumps(summary, indent=2) if args.json else report.format_summary(summary))
        return 0
    return 1


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="megacpp", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"megacpp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("recipes", help="list the built-in recipes")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_recipes)

    p = sub.add_parser("describe", help="per-layer table, parameters, FLOPs and memory of a recipe")
    _recipe_args(p, required=False)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--json", action="store_true")
    g.add_argument("--toml", action="store_true", help="print the fully resolved recipe as TOML")
    p.set_defaults(func=_cmd_describe)

    p = sub.add_parser("args", help="deterministic launcher arguments (native or Megatron-LM)")
    _recipe_args(p, required=False)
    p.add_argument("--target", choices=["native", "megatron"], default="native")
    p.add_argument("--strict", action="store_true",
                   help="exit 2 if the translation has any issue (fail closed)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_args)

    p = sub.add_parser("train", help="train a recipe on a data snapshot; writes a run directory")
    _recipe_args(p, required=False)
    p.add_argument("--data", metavar="SNAPSHOT", help="data snapshot directory (default: policy.data, "
                   "else $MEGACPP_DATA, else data/system)")
    p.add_argument("--out", required=True, metavar="RUN_DIR")
    p.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from its last good checkpoint")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--max-steps", type=int, help="stop after this many steps without a final save (testing)")
    p.add_argument("--time-limit", type=float, metavar="SECONDS",
                   help="save and stop once this process has run this long (resume later with --resume)")
    p.add_argument("--profile", metavar="START:END",
                   help="profile steps START..END-1 (torch.profiler, CPU and CUDA); the top operators by "
                        "self time go to RUN_DIR/profile.txt (rank 0)")
    p.add_argument("--profile-kernels-only", action="store_true",
                   help="with --profile on CUDA: record the GPU kernels only, not the host-side operators, "
                        "which slow the host while recorded (GPU idle time then reads true)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="loss and bits per byte of a run's last checkpoint on a split")
    p.add_argument("run_dir")
    p.add_argument("--split", default="val", choices=["train", "val", "test"])
    p.add_argument("--batches", type=int, default=0, help="0: the whole split")
    p.add_argument("--data", metavar="SNAPSHOT")
    p.add_argument("--device")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("generate", help="sample a continuation with the incremental decoder")
    p.add_argument("run_dir")
    p.add_argument("--prompt", default="#include <")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", metavar="SNAPSHOT")
    p.add_argument("--device")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("compare", help="what differs between two runs (spec, pattern, patches, aux losses, backend), then metrics")
    p.add_argument("run_a")
    p.add_argument("run_b")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("report", help="PNG plots of a run's curves and a markdown summary")
    p.add_argument("run_dir")
    p.add_argument("--out", help="report directory (default RUN_DIR/report)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("patches", help="list memory patches or run their parity checks")
    p.add_argument("action", choices=["list", "check"], nargs="?", default="list")
    p.add_argument("--recipe", help="(check) accepted for symmetry; parity checks are recipe-independent")
    p.add_argument("--full", action="store_true", help="(check) production-size inputs")
    p.add_argument("--device")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_patches)

    p = sub.add_parser("bench", help="training-step tokens/s, MFU, peak memory and per-family time")
    _recipe_args(p, required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device")
    p.add_argument("--no-family-times", action="store_true")
    p.add_argument("--no-kernels", action="store_true",
                   help="skip the torch.profiler kernel breakdown of the step and the families (CUDA only)")
    p.add_argument("--top-kernels", type=int, default=25, metavar="N",
                   help="kernels listed in the step's breakdown, largest first (default 25)")
    p.add_argument("--data", metavar="SNAPSHOT",
                   help="feed each step a fresh batch from this snapshot's train split through the "
                        "trainer's loader (default: one synthetic batch reused)")
    p.add_argument("--accum", type=int, default=1, metavar="N",
                   help="micro-batches forward and backward per optimizer step (default 1; 0 = the "
                        "recipe's on one device, policy.global_batch / micro batch, as train runs it)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("doctor", help="which fast paths run on this machine, and why not")
    p.add_argument("--device")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_doctor)

    _add_data_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "data":
            return _run_data(args)
        return args.func(args)
    except MegacppError as e:
        print(f"megacpp: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into head & co.
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("megacpp: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
