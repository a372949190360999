"""Consoles and progress bars for the CLI (rich; plain fallbacks when rich is not installed).

Progress goes to stderr so that stdout stays clean for tables and ``--format json``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from contextlib import contextmanager

from lorafx.errors import LorafxError

# Tables are wide (12 columns); rich falls back to 80 columns when stdout is not a terminal, which
# wraps every row of `lorafx inspect > file`. 200 keeps a bench-llama row on one line.
_PIPE_WIDTH = 200


def console(stderr: bool = False):
    """A rich ``Console`` on stdout (or stderr); wide when writing to a pipe or a file."""
    try:
        from rich.console import Console
    except ImportError:
        raise LorafxError("this command needs rich: pip install 'lorafx[cli]' (or pip install rich)") from None
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or "COLUMNS" in os.environ else _PIPE_WIDTH
    return Console(file=stream, width=width, highlight=False)


def plain(doc: str | None) -> str:
    """A module docstring as ``--help`` text: reST roles and literal quotes removed."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", doc or "")
    return text.replace("``", "")


def add_command(
    sub: argparse._SubParsersAction, name: str, help: str, doc: str | None, examples: str
) -> argparse.ArgumentParser:
    """A subcommand's parser: ``--help`` shows its module docstring and examples with their line breaks."""
    return sub.add_parser(
        name,
        help=help,
        description=plain(doc),
        epilog=examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_repeatable(parser, flag: str, metavar: str, help: str) -> None:
    """A flag that may be given many times; its values collect in a list (empty when not given)."""
    parser.add_argument(flag, action="append", default=[], metavar=metavar, help=help)


def comma_list(text: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``: an argparse ``type`` for comma-separated names."""
    return [v.strip() for v in text.split(",") if v.strip()]


class _NoProgress:
    def add_task(self, description: str, total: float | None = None, **_):
        print(description, file=sys.stderr, flush=True)
        return 0

    def update(self, *_, **__):
        pass

    def advance(self, *_, **__):
        pass


@contextmanager
def status(message: str):
    """A spinner on stderr while ``message``'s work runs (nothing when stderr is not a terminal)."""
    if not sys.stderr.isatty():
        yield
        return
    with console(stderr=True).status(message):
        yield


@contextmanager
def progress():
    """A rich ``Progress`` (bar, count, elapsed) on stderr, or a no-op that prints task names."""
    try:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    except ImportError:
        yield _NoProgress()
        return
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console(stderr=True), transient=False) as bar:
        yield bar
