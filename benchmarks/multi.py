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

PEFT is not a contender: its mixed-adapter batches (``adapter_names=``) are inference only.
``python -m benchmarks.multi [--quick]``; writes ``benchmarks/results/multi.{json,md}``.
"""

from __future__ import annotations

import argparse

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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="d = 256, T = 128, few repeats")
    args = p.parse_args(argv)
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
