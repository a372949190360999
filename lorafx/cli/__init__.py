"""The ``lorafx`` command line. Each subcommand lives in its own module with a ``register`` function."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from lorafx.cli import bench_cmd, demo_cmd, export_cmd, inspect_cmd

_COMMANDS = [inspect_cmd, export_cmd, demo_cmd, bench_cmd]


def build_parser() -> argparse.ArgumentParser:
    from lorafx import __version__

    parser = argparse.ArgumentParser(prog="lorafx", description="LoRA-family adapters as torch.fx graph rewrites.")
    parser.add_argument("--version", action="version", version=f"lorafx {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _COMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lorafx`` console script and ``python -m lorafx``."""
    from lorafx.cli.extras import missing_extra_message
    from lorafx.errors import LorafxError

    args = build_parser().parse_args(argv)
    # Traced transformers modules emit FutureWarnings about their own deprecated properties; they are
    # not the user's to fix and would bury the table.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return int(args.func(args) or 0)
    except LorafxError as e:
        print(f"lorafx {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:  # an optional dependency is missing: name the extra that installs it
        message = missing_extra_message(e)
        if message is None:
            raise
        print(f"lorafx {args.command}: error: {message}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `lorafx inspect ... | head`: the reader left; say nothing more
        sys.stdout = open(os.devnull, "w")  # so the flush at exit does not raise again
        return 0
    except OSError as e:  # a path the checks above did not foresee (unreadable, vanished): still one line
        where = f"{e.filename}: " if e.filename else ""
        print(f"lorafx {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lorafx {args.command}: interrupted", file=sys.stderr)
        return 130
