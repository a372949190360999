"""``lorafx demo``: apply every variant to a built-in tiny Llama, train, merge, and print a table.

Each variant's adapter is trained for the same number of steps to imitate a teacher (the base model
plus a hidden low-rank change); the table shows the loss cut, trainable parameters and whether the
merged model gives the unmerged outputs. See :mod:`lorafx.cli.demo`.
"""

from __future__ import annotations

import argparse

from lorafx.cli.ui import add_command, comma_list
from lorafx.errors import SpecError

EXAMPLES = """examples:
  lorafx demo --steps 10 --variants lora --skip compile,onnx
  lorafx demo
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "demo", "run every variant end to end on a built-in tiny Llama", __doc__, EXAMPLES)
    p.add_argument("--steps", type=int, default=60, help="training steps per variant (default 60)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--variants",
        type=comma_list,
        default=None,
        help="comma-separated subset, e.g. lora,mor",
    )
    p.add_argument(
        "--skip",
        type=comma_list,
        default=[],
        help="comma-separated checks to leave out: compile (inductor vs eager), onnx (onnxruntime vs eager)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from lorafx.cli import demo
    from lorafx.cli.extras import ONNX, require
    from lorafx.cli.ui import progress

    if args.steps < 1:
        raise SpecError(f"--steps must be at least 1, got {args.steps}")
    specs = demo.demo_specs()
    unknown = sorted(set(args.variants or ()) - set(specs))
    if unknown:
        raise SpecError(f"--variants {','.join(unknown)}: not in the demo; demo variants: {', '.join(specs)}")
    chosen = {n: s for n, s in specs.items() if not args.variants or n in args.variants}
    bad = sorted(set(args.skip) - set(demo.CHECKS))
    if bad:
        raise SpecError(f"--skip {','.join(bad)}: unknown check; checks: {', '.join(demo.CHECKS)}")
    checks = tuple(c for c in demo.CHECKS if c not in args.skip)
    require("transformers", *(ONNX if "onnx" in checks else ()))
    torch.manual_seed(args.seed)
    task = demo.make_teacher_task(seed=args.seed, steps=args.steps)
    rows = []
    with progress() as bar:
        for name, spec in chosen.items():
            t = bar.add_task(f"training {name}", total=args.steps)
            rows.append(demo.run_variant(name, spec, task, on_step=lambda t=t: bar.advance(t), checks=checks))
            bar.update(t, description=f"{name}: loss {rows[-1].loss_before:.4f} -> {rows[-1].loss_after:.4f}")
    print(demo.format_table(rows))
    return 0
