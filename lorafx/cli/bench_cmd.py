"""``lorafx bench``: run the benchmark scripts and collect their tables into one summary.

Each ``benchmarks/<name>.py`` runs as its own process (a crash or an out-of-memory in one does not
stop the others) and writes ``benchmarks/results/<name>.json`` and ``<name>.md``. When they are done,
``benchmarks/results/SUMMARY.md`` gathers every ``.md`` table there, the page the README includes.
Each script's output is kept in ``benchmarks/results/<name>.log``.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

from lorafx.cli.ui import add_command
from lorafx.errors import LorafxError

EXAMPLES = """examples:
  lorafx bench --list
  lorafx bench --quick
  lorafx bench --quick --summary-only
"""
SUMMARY = "SUMMARY.md"


class BenchError(LorafxError, RuntimeError):
    """A benchmark script is missing or failed."""


def register(sub: argparse._SubParsersAction) -> None:
    help = "run the benchmark scripts (benchmarks/*.py) and write benchmarks/results/SUMMARY.md"
    p = add_command(sub, "bench", help, __doc__, EXAMPLES)
    p.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to run (default: all), e.g. kernels")
    p.add_argument(
        "--quick", action="store_true", help="small sizes: checks the scripts work, numbers are not for the README"
    )
    p.add_argument(
        "--dir", type=Path, default=None, help="benchmarks folder (default: ./benchmarks, else the one beside lorafx)"
    )
    p.add_argument("--list", action="store_true", help="list the benchmark scripts and exit")
    p.add_argument("--summary-only", action="store_true", help="run nothing; rebuild SUMMARY.md from the results there")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per script before it is stopped (default 3600)")
    p.set_defaults(func=run)


def bench_dir(given: Path | None) -> Path:
    """The benchmarks folder: ``--dir``, ``./benchmarks``, or the one beside the lorafx package."""
    candidates = (
        [given]
        if given is not None
        else [Path.cwd() / "benchmarks", Path(__file__).resolve().parents[2] / "benchmarks"]
    )
    for c in candidates:
        if c.is_dir():
            if not c.name.isidentifier():
                raise BenchError(
                    f"{c}: the folder name must be a Python identifier (scripts run as `python -m {c.name}.NAME`)"
                )
            return c
    where = " or ".join(str(c) for c in candidates)
    raise BenchError(f"no benchmarks folder at {where}; run from a lorafx checkout or pass --dir")


def scripts(folder: Path) -> dict[str, Path]:
    """Benchmark name -> script (``benchmarks/*.py`` except private ``_*.py`` helpers)."""
    return {p.stem: p for p in sorted(folder.glob("*.py")) if not p.name.startswith("_")}


def _command(folder: Path, script: Path, quick: bool) -> list[str]:
    # As a module from the folder's parent (`python -m benchmarks.onnx`), never by path: a script named
    # onnx.py run by path would put benchmarks/ first on sys.path and shadow the onnx package.
    return [sys.executable, "-m", f"{folder.name}.{script.stem}", *(["--quick"] if quick else [])]


def _run_one(folder: Path, script: Path, quick: bool, timeout: float, bar, task) -> tuple[int, float, Path]:
    results = folder / "results"
    results.mkdir(exist_ok=True)
    log = results / f"{script.stem}.log"
    env = dict(os.environ)
    root = str(folder.parent)
    env["PYTHONPATH"] = root + os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else root
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            _command(folder, script, quick),
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        watchdog = threading.Timer(timeout, proc.kill)
        watchdog.start()
        try:
            for line in proc.stdout:  # keep the last line visible beside the bar
                out.write(line)
                if line.strip():
                    bar.update(task, description=f"{script.stem}: {line.strip()[:60]}")
            code = proc.wait()
        finally:
            watchdog.cancel()
    return code, time.perf_counter() - start, log


def write_summary(folder: Path, quick: bool) -> Path:
    """Gather ``results/*.md`` (except the summary itself) into ``results/SUMMARY.md``."""
    import torch

    results = folder / "results"
    results.mkdir(exist_ok=True)
    tables = [p for p in sorted(results.glob("*.md")) if p.name != SUMMARY]
    parts = [
        "# Benchmark results",
        "",
        f"Collected by `lorafx bench{' --quick' if quick else ''}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}.",
    ]
    if quick:
        parts.append("**Quick run (small sizes): these numbers check that the scripts work; do not quote them.**")
    for p in tables:
        parts += ["", f"## {p.stem}", "", p.read_text().strip()]
    out = results / SUMMARY
    out.write_text("\n".join(parts) + "\n")
    return out


def run(args: argparse.Namespace) -> int:
    folder = bench_dir(args.dir)
    available = scripts(folder)
    if args.list:
        for name, path in available.items():
            print(f"{name:<20} {path}")
        return 0
    unknown = [n for n in args.names if n not in available]
    if unknown:
        raise BenchError(
            f"no benchmark script {', '.join(repr(n) for n in unknown)} in {folder}; available: {', '.join(available) or 'none'}"
        )
    chosen = {n: available[n] for n in (args.names or available)}
    if not chosen and not args.summary_only:
        raise BenchError(f"{folder} holds no benchmark scripts (*.py)")
    failed = []
    if not args.summary_only:
        failed = _run_all(folder, chosen, args)
    summary = write_summary(folder, args.quick)
    print(f"wrote {summary}")
    if failed:
        raise BenchError("; ".join(failed))
    return 0


def _fresh(path: Path, since: float) -> bool:
    """``path`` exists and was written by this run (a stale result from an earlier run does not count)."""
    return path.is_file() and path.stat().st_mtime >= since - 1


def _last_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def _run_all(folder: Path, chosen: dict[str, Path], args: argparse.Namespace) -> list[str]:
    """Run each script; returns the failures. A script that exits 0 without writing results (e.g. a
    GPU benchmark on a CPU machine) is skipped, not failed: its earlier tables stay in the summary."""
    from lorafx.cli.ui import progress

    failed, skipped = [], []
    with progress() as bar:
        overall = bar.add_task("benchmarks", total=len(chosen))
        for name, script in chosen.items():
            task = bar.add_task(f"{name}: starting", total=None)
            started = time.time()
            code, seconds, log = _run_one(folder, script, args.quick, args.timeout, bar, task)
            missing = [s for s in (".json", ".md") if not _fresh(folder / "results" / f"{name}{s}", started)]
            state = "FAILED" if code != 0 else "skipped" if missing else "done"
            bar.update(task, description=f"{name}: {state} in {seconds:.0f} s", total=1, completed=1)
            bar.advance(overall)
            if code != 0:
                failed.append(f"{name} exited with {code}: {_last_line(log)} (log: {log})")
            elif missing:
                skipped.append(
                    f"{name}: wrote no {' or '.join(f'results/{name}{x}' for x in missing)}: {_last_line(log)}"
                )
    for line in skipped:
        print(f"skipped {line}", file=sys.stderr)
    return failed
