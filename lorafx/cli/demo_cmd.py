"""``lorafx demo``: apply every variant to a built-in tiny Llama, train, merge, and print a table."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run every variant end to end on a built-in tiny Llama",
        description=__doc__,
        epilog="example: lorafx demo --steps 30 --variants lora",
    )
    p.add_argument("--steps", type=int, default=60, help="training steps per variant (default 60)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--variants", type=lambda s: s.split(","), default=None, help="comma-separated subset, e.g. lora,mor"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lorafx import demo

    demo.main(steps=args.steps, seed=args.seed, variants=args.variants)
    return 0
