"""Refresh the measured tables of README.md from benchmarks/results/<name>.md.

The README marks each table with ``<!-- results:NAME -->`` ... ``<!-- /results -->``; this script
replaces what lies between with the current ``benchmarks/results/NAME.md``. Run it after
``lorafx bench`` (or any single benchmark):  ``.venv/bin/python scripts/refresh_readme.py``.
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- results:([\w-]+) -->\n)(.*?)(<!-- /results -->)", re.S)


def refresh(text: str) -> str:
    def sub(m: re.Match) -> str:
        path = ROOT / "benchmarks" / "results" / f"{m.group(2)}.md"
        if not path.is_file():
            sys.exit(f"refresh_readme: {path} does not exist; run the benchmark first")
        return f"{m.group(1)}{path.read_text().strip()}\n{m.group(4)}"

    return BLOCK.sub(sub, text)


if __name__ == "__main__":
    readme = ROOT / "README.md"
    readme.write_text(refresh(readme.read_text()))
    print(f"refreshed {readme}")
