"""`megacpp <command>`: the only place that parses argv (being written)."""
from __future__ import annotations

import argparse
import sys


def _add_data_commands(sub) -> None:
    """`megacpp data sources|prepare|check`: owned by the data pipeline."""


def _run_data(args) -> int:
    raise SystemExit("data commands not wired yet")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megacpp")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_data_commands(sub)
    args = parser.parse_args(argv)
    if args.command == "data":
        return _run_data(args)
    return 1


if __name__ == "__main__":
    sys.exit(main())
