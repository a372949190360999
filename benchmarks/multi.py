"""Multi-adapter training on CPU: one batch whose rows belong to n different LoRA adapters.

One Llama-sized projection (d_in = d_out = 1024, r = 16), T = 512 tokens split evenly over n adapters
(n = 1, 4, 16), forward + backward (∂x, ∂A, ∂B) of ``lorafx::lora_linear_multi``. Contenders, same
operands, interleaved in one process:

* ``base``   — ``x Wᵀ`` forward + ∂x only (the floor);
* ``single`` — one LoRA adapter for every row (``lorafx::lora_linear``): what the adapter part costs
  when nothing is mixed;
* ``masked`` — the multi-adapter backward as autograd would trace a fixed-shape formula: every
  adapter over every row under a 0/1 mask (n× the adapter FLOPs; lorafx's backward before it became
  the ``lorafx::lora_linear_multi_backward`` op);
* ``lorafx`` — the op: each adapter's products over its own rows (index_select / index_add).

PEFT is not a contender there: its mixed-adapter batches (``adapter_names=``) are inference only.
``python -m benchmarks.multi [--quick]``; writes ``benchmarks/results/multi.{json,md}``.

``--model``: per-row adapters on the whole benchmark Llama (``lorafx.cli.models.bench_llama``: hidden
1024, 4 layers, vocab 32000), inference, one 16 × 128-token forward whose rows cycle through n = 4 or 16
LoRA adapters (r = 16, alpha = 32, all linear layers, random weights; PEFT loads the very same
weights through ``lorafx.to_peft``). Contenders, interleaved in one process: the plain base model;
lorafx with one adapter active; lorafx's mixed batch (``lorafx.using_adapter(model, names)``); PEFT with
one adapter; PEFT's mixed batch (``adapter_names=names``). Before timing, the mixed outputs of lorafx
and PEFT are compared. Writes ``benchmarks/results/multi_model.{json,md}``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.common import interleaved_medians, write_results
from lorafx.kernels.lora_linear import lora_linear
from lorafx.kernels.lora_linear_multi import lora_linear_multi


def _masked_multi(x, W, b, A, B, s, idx):
    """Forward by the op, backward by the fixed-shape masked formula (the pre-op implementation)."""

    class Masked(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, A, B):
            ctx.save_for_backward(x, A, B)
            return lora_linear_multi(x, W, b, A, B, s, idx)

        @staticmethod
        def backward(ctx, dy):
            x, A, B = ctx.saved_tensors
            dx = dy @ W
            dA, dB = [], []
            for i in range(A.shape[0]):
                m = (idx == i).unsqueeze(1).to(A.dtype)
                xs, dys = x * m, dy * m
                h = xs @ A[i].t()
                dh = (dys @ B[i]) * s[i]
                dA.append(dh.t() @ xs)
                dB.append((dys.t() @ h) * s[i])
                dx = dx + dh @ A[i]
            return dx, torch.stack(dA), torch.stack(dB)

    return Masked.apply(x, A, B)


def bench(n: int, T: int, d: int, r: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(n)
    x = torch.randn(T, d, generator=g).requires_grad_()
    W, b = torch.randn(d, d, generator=g) / d**0.5, torch.zeros(d)
    A = (torch.randn(n, r, d, generator=g) / d**0.5).requires_grad_()
    B = (torch.randn(n, d, r, generator=g) / r**0.5).requires_grad_()
    s = torch.full((n,), 2.0)
    idx = torch.arange(T) % n
    dy = torch.randn(T, d, generator=g)
    A1, B1 = A[0].detach().clone().requires_grad_(), B[0].detach().clone().requires_grad_()

    def run(fn, inputs):
        def step():
            torch.autograd.grad(fn(), inputs, dy)

        return step

    fns = {
        "base": run(lambda: torch.nn.functional.linear(x, W, b), (x,)),
        "single": run(lambda: lora_linear(x, W, b, A1, B1, s[0]), (x, A1, B1)),
        "masked": run(lambda: _masked_multi(x, W, b, A, B, s, idx), (x, A, B)),
        "lorafx": run(lambda: lora_linear_multi(x, W, b, A, B, s, idx), (x, A, B)),
    }
    t = interleaved_medians(fns, repeats)
    return {"n": n, "ms": {k: v * 1e3 for k, v in t.items()}, "vs_single": {k: v / t["single"] for k, v in t.items()}}


def _model_contenders(n: int, rows: int, seq: int, tmp: Path) -> tuple[dict, float]:
    """The five forwards of ``--model`` for n adapters, and max |lorafx − PEFT| of the mixed logits."""
    import copy

    import peft

    import lorafx
    from lorafx.cli.models import bench_llama

    base = bench_llama().eval()
    model = copy.deepcopy(base)
    names = [f"a{i}" for i in range(n)]
    for name in names:
        cfg = lorafx.LoRA(r=16, alpha=32, init="random")
        model = lorafx.apply(model, lorafx.Spec(cfg, targets="all-linear"), name=name)
        lorafx.to_peft(model, tmp / name, name=name)
    model.eval()
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp / names[0], adapter_name=names[0])
    for name in names[1:]:
        pm.load_adapter(tmp / name, adapter_name=name)
    pm.eval()
    lorafx.set_adapter(model, names[0])
    pm.set_adapter(names[0])
    per_row = [names[i % n] for i in range(rows)]
    ids = torch.randint(0, base.config.vocab_size, (rows, seq), generator=torch.Generator().manual_seed(n))

    def mixed():
        with lorafx.using_adapter(model, per_row):
            return model(ids).logits

    fns = {
        "base": lambda: base(ids).logits,
        "lorafx_single": lambda: model(ids).logits,
        "lorafx_mixed": mixed,
        "peft_single": lambda: pm(input_ids=ids).logits,
        "peft_mixed": lambda: pm(input_ids=ids, adapter_names=per_row).logits,
    }
    with torch.no_grad():
        diff = float((fns["lorafx_mixed"]() - fns["peft_mixed"]()).abs().max())
    return fns, diff


def bench_model(n: int, rows: int, seq: int, repeats: int) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        fns, diff = _model_contenders(n, rows, seq, Path(tmp))
        t = interleaved_medians(fns, repeats, warmup=1)
    return {
        "n": n,
        "max_abs_diff_vs_peft": diff,
        "ms": {k: v * 1e3 for k, v in t.items()},
        "vs_base": {k: v / t["base"] for k, v in t.items()},
        "lorafx_mixed_vs_single": t["lorafx_mixed"] / t["lorafx_single"],
        "peft_mixed_vs_single": t["peft_mixed"] / t["peft_single"],
    }


def main_model(repeats: int, rows: int = 16, seq: int = 128) -> int:
    results = [bench_model(n, rows, seq, repeats) for n in (4, 16)]
    lines = [
        f"Benchmark Llama (hidden 1024, 4 layers, vocab 32000), one {rows} × {seq}-token forward, inference, rows "
        f"cycling through n LoRA adapters (r = 16, all linear layers); CPU ({torch.get_num_threads()} threads, "
        f"machine shared with other jobs), median of {repeats} interleaved runs, ratios to the base model.",
        "",
        "| adapters n | base (ms) | lorafx one adapter | lorafx mixed | PEFT one adapter | PEFT `adapter_names=` | "
        "lorafx mixed / one | PEFT mixed / one | max abs diff lorafx vs PEFT |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        v = r["vs_base"]
        lines.append(
            f"| {r['n']} | {r['ms']['base']:.0f} | {v['lorafx_single']:.3f}× | {v['lorafx_mixed']:.3f}× | "
            f"{v['peft_single']:.3f}× | {v['peft_mixed']:.3f}× | {r['lorafx_mixed_vs_single']:.3f} | "
            f"{r['peft_mixed_vs_single']:.3f} | {r['max_abs_diff_vs_peft']:.1e} |"
        )
    md = "\n".join(lines) + "\n"
    print(md)
    write_results("multi_model", {"rows": rows, "seq": seq, "repeats": repeats, "results": results}, md)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="d = 256, T = 128, few repeats")
    p.add_argument("--model", action="store_true", help="per-row adapters on the benchmark Llama (see the docstring)")
    p.add_argument("--repeats", type=int, default=7, help="--model: timed runs per contender")
    args = p.parse_args(argv)
    if args.model:
        return main_model(args.repeats)
    d, T, repeats = (256, 128, 5) if args.quick else (1024, 512, 25)
    rows = [bench(n, T, d, 16, repeats) for n in (1, 4, 16)]
    lines = [
        f"One projection d_in = d_out = {d}, r = 16, T = {T} rows split evenly over n adapters, forward + backward "
        f"(∂x, ∂A, ∂B), CPU ({torch.get_num_threads()} threads), median ms of {repeats} interleaved runs.",
        "",
        "| adapters n | base (∂x only) | single adapter | masked backward | lorafx | lorafx / single | masked / lorafx |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        ms = row["ms"]
        lines.append(
            f"| {row['n']} | {ms['base']:.2f} | {ms['single']:.2f} | {ms['masked']:.2f} | {ms['lorafx']:.2f} | "
            f"{row['vs_single']['lorafx']:.3f} | {ms['masked'] / ms['lorafx']:.2f} |"
        )
    md = "\n".join(lines) + "\n"
    print(md)
    write_results("multi_quick" if args.quick else "multi", {"d": d, "T": T, "rows": rows}, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
