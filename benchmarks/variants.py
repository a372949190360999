"""Teacher-student training sanity check for every variant (the demo's task, several seeds).

Run from the repository root: ``python -m benchmarks.variants [--quick]``. Writes
``benchmarks/results/variants.json`` and ``.md``.

Task (``lorafx.cli.demo.make_teacher_task``): the frozen base is a random tiny Llama (hidden 64, 2 layers);
the teacher adds a hidden rank-4 change to q/v/up/down_proj; each student is the base plus one
variant on all seven projections, trained with Adam (lr 5e-3, constant) for the same number of steps
on random token batches (8 x 16) to match the teacher's logits (MSE). Reported: trainable parameters,
eval loss before/after (a held-out random batch), the cut, and merged-vs-unmerged max difference.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

if not __package__:
    raise SystemExit("run as a module from the repository root: python -m benchmarks.variants [--quick]")

import torch  # noqa: E402

from lorafx.cli import demo  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def run(steps: int, seeds: list[int]) -> list[dict]:
    rows = {}
    for seed in seeds:
        torch.manual_seed(seed)
        task = demo.make_teacher_task(seed=seed, steps=steps)
        for name, spec in demo.demo_specs().items():
            r = demo.run_variant(name, spec, task)
            row = rows.setdefault(
                name, {"variant": name, "config": spec.config.to_dict(), "trainable": r.trainable, "runs": []}
            )
            row["mergeable"] = r.mergeable
            row["runs"].append(
                {
                    "seed": seed,
                    "loss_before": r.loss_before,
                    "loss_after": r.loss_after,
                    "merge_err": r.merge_err,
                    "seconds": r.seconds,
                }
            )
            print(f"  seed {seed} {name:10s} {r.loss_before:.4f} -> {r.loss_after:.4f}", flush=True)
    for row in rows.values():
        cuts = [1 - x["loss_after"] / x["loss_before"] for x in row["runs"]]
        row["cut_mean"] = statistics.mean(cuts)
        row["cut_min"] = min(cuts)
        row["loss_before_mean"] = statistics.mean(x["loss_before"] for x in row["runs"])
        row["loss_after_mean"] = statistics.mean(x["loss_after"] for x in row["runs"])
        errs = [x["merge_err"] for x in row["runs"] if x["merge_err"] is not None]
        row["merge_err_max"] = max(errs) if errs else None
    return list(rows.values())


def markdown(rows: list[dict], steps: int, seeds: list[int]) -> str:
    lines = [
        f"Teacher-student task, tiny Llama (hidden 64, 2 layers), all 7 projections adapted, {steps} Adam steps, "
        f"seeds {seeds} (mean; min cut in brackets). Loss = MSE to the teacher's logits on a held-out batch.",
        "",
        "| variant | config | trainable | loss before | loss after | cut | mergeable | max abs merged − unmerged |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        cfg = ", ".join(
            f"{k}={v}" for k, v in r["config"].items() if k not in ("variant", "version", "init", "dropout")
        )
        merr = f"{r['merge_err_max']:.1e}" if r["merge_err_max"] is not None else "refused (NotMergeableError)"
        lines.append(
            f"| {r['variant']} | {cfg} | {r['trainable']:,} | {r['loss_before_mean']:.4f} | {r['loss_after_mean']:.4f} | "
            f"{r['cut_mean']:.0%} ({r['cut_min']:.0%}) | {'yes' if r['mergeable'] else 'no'} | {merr} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one seed, 30 steps")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1 is fastest for these tiny matmuls)"
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    steps, seeds = (30, [0]) if args.quick else (args.steps, list(range(args.seeds)))
    rows = run(steps, seeds)
    RESULTS.mkdir(exist_ok=True)
    name = "variants_quick" if args.quick else "variants"  # a quick run never overwrites the README's numbers
    (RESULTS / f"{name}.json").write_text(json.dumps({"steps": steps, "seeds": seeds, "rows": rows}, indent=2))
    md = markdown(rows, steps, seeds)
    (RESULTS / f"{name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
