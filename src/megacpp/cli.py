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


def _add_data_commands(sub) -> None:
    """`megacpp data sources|prepare|check`: owned by the data pipeline."""


def _run_data(args) -> int:
    raise SystemExit("data commands not wired yet")



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
