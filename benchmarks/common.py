"""Timing helpers shared by the benchmark scripts: interleaved repeats, medians, result files.

Contenders run in one process, interleaved round-robin (A B C A B C ...) so that drift in machine
load hits all of them alike; each reports the median of its repeats.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function, timed round-robin."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def machine() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }


def write_results(name: str, data: dict, markdown: str) -> Path:
    """Write ``results/<name>.json`` and ``results/<name>.md`` (the README includes the .md)."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({**data, "machine": machine()}, indent=2))
    (RESULTS / f"{name}.md").write_text(markdown)
    return RESULTS / f"{name}.md"


def speed_rows(fwd_t: dict[str, float], train_t: dict[str, float]) -> list[str]:
    """The markdown rows of a base / lorafx / PEFT speed table: forward (no grad) and train step."""
    return [
        "| | base | lorafx | PEFT |",
        "|---|---:|---:|---:|",
        f"| forward, no grad (ms) | {fwd_t['base'] * 1e3:.1f} | {fwd_t['lorafx'] * 1e3:.1f} | {fwd_t['peft'] * 1e3:.1f} |",
        f"| forward / base | 1.000x | {fwd_t['lorafx'] / fwd_t['base']:.3f}x | {fwd_t['peft'] / fwd_t['base']:.3f}x |",
        f"| train step (ms) | – | {train_t['lorafx'] * 1e3:.1f} | {train_t['peft'] * 1e3:.1f} |",
        f"| train step / PEFT | – | {train_t['lorafx'] / train_t['peft']:.3f}x | 1.000x |",
    ]
