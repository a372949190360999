"""The ``lorafx`` command line. Each subcommand lives in its own module with a ``register`` function."""

from __future__ import annotations

import argparse
import sys

from lorafx.cli import demo_cmd, export_cmd

_COMMANDS = [demo_cmd, export_cmd]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorafx", description="LoRA-family adapters as torch.fx graph rewrites.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _COMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lorafx`` console script and ``python -m lorafx``."""
    from lorafx.errors import LorafxError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LorafxError as e:
        print(f"lorafx {args.command}: error: {e}", file=sys.stderr)
        return 2
