"""GPU kernel benchmark: fused ``lorafx::lora_linear`` vs the unfused path vs PEFT, Llama-7B shapes.

One projection of Llama-7B (K = N = 4096), adapter rank 16, tokens M from 16 to 8192, fp16:

* ``base``    — cuBLAS ``x Wᵀ`` alone (the floor);
* ``unfused`` — cuBLAS base + separate adapter matmuls ``y + s·(x Aᵀ) Bᵀ`` (what eager PyTorch does);
* ``peft``    — a PEFT ``LoraLayer`` forward (same math, PEFT's module);
* ``fused``   — the Triton shrink + fused GEMM/expand (one output write).

Then a mixed-adapter batch (segmented kernels vs a per-adapter loop vs one adapter) and CE-LoRA's
approximate ∂x (gathered Triton kernel vs dense cuBLAS ``G W``). The case builders run on any device;
``tests/test_triton_kernels.py`` runs each once on CPU under the Triton interpreter.

Timed with ``triton.testing.do_bench`` (median ms); ratios are unfused/fused and fused/base. On an
H100 or H200 each row also prints the :func:`roofline` prediction of the same shape. Run:
``python -m benchmarks.kernels [--quick]``. Without CUDA it prints a message and exits 0.
``--roofline`` prints the predictions alone, ``--static`` compiles every kernel specialization for
sm_80/sm_90a and checks spills, shared memory and tensor-core dots (:mod:`benchmarks.kernels_static`);
both run on a CPU.
Goal (issue 4): ≥ 1.25× over unfused at large M, within 3% of base at small M.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"

# Peak dense fp16/bf16 tensor-core FLOP/s (without sparsity) and HBM bandwidth, SXM parts.
# H100 SXM5: 989.4 TFLOP/s, HBM3 3.35 TB/s (NVIDIA H100 Tensor Core GPU datasheet; its 1,979 TFLOP/s
# is with 2:4 sparsity). H200 SXM: the same Hopper die and clocks, 989 TFLOP/s dense, HBM3e 4.8 TB/s
# (NVIDIA H200 Tensor Core GPU datasheet).
GPUS = {"H100": {"flops": 989.4e12, "bandwidth": 3.35e12}, "H200": {"flops": 989.4e12, "bandwidth": 4.8e12}}


def _kernel_s(gpu: dict, flops: float, nbytes: float) -> float:
    """Roofline time of one kernel: bound by tensor FLOP/s or by HBM traffic, whichever is slower."""
    return max(flops / gpu["flops"], nbytes / gpu["bandwidth"])


def roofline(M: int, K: int, N: int, r: int, gpu: str, nbytes: int = 2) -> dict:
    """Predicted seconds of the three forward cases of :func:`forward_cases` on ``gpu`` (a key of
    :data:`GPUS`), each kernel at its roofline (compulsory HBM traffic, no launch latency), summed:

    * ``base``: one GEMM ``x Wᵀ`` (reads x and W, writes y);
    * ``unfused``: the eager expression ``x Wᵀ + ((x Aᵀ) Bᵀ)·s`` as it runs, five kernels: base GEMM,
      shrink GEMM (x read again), expand GEMM (writes an [M, N] temporary), scale and add (each
      reads and writes [M, N]s);
    * ``fused``: the shrink kernel (fp32 h) then one GEMM + expand writing y once.
    """
    g, b = GPUS[gpu], nbytes
    mn = M * N * b
    base = _kernel_s(g, 2 * M * N * K, b * (M * K + K * N) + mn)
    shrink = _kernel_s(g, 2 * M * K * r, b * (M * K + r * K) + M * r * b)
    expand = _kernel_s(g, 2 * M * N * r, b * (M * r + r * N) + mn)
    elementwise = _kernel_s(g, M * N, 2 * mn) + _kernel_s(g, M * N, 3 * mn)
    fused_shrink = _kernel_s(g, 2 * M * K * r, b * (M * K + r * K) + M * r * 4)
    fused = _kernel_s(g, 2 * M * N * (K + r), b * (M * K + K * N + r * N) + M * r * 4 + mn)
    return {"base": base, "unfused": base + shrink + expand + elementwise, "fused": fused_shrink + fused}


def roofline_table(K: int = 4096, N: int = 4096, r: int = 16, sizes=(16, 64, 256, 1024, 2048, 4096, 8192)) -> str:
    """Markdown: predicted base / unfused / fused (µs) and fused / base on H100 and H200, fp16."""
    lines = [
        "| GPU | M | base (µs) | unfused (µs) | fused (µs) | unfused / fused | fused / base |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for gpu in GPUS:
        for M in sizes:
            t = {k: v * 1e6 for k, v in roofline(M, K, N, r, gpu).items()}
            lines.append(
                f"| {gpu} | {M} | {t['base']:.1f} | {t['unfused']:.1f} | {t['fused']:.1f} "
                f"| {t['unfused'] / t['fused']:.2f}× | {t['fused'] / t['base']:.3f} |"
            )
    return "\n".join(lines)


def _peft_layer(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, alpha: float):
    try:
        from peft import LoraConfig
        from peft.tuners.lora.layer import Linear
    except ImportError:
        return None
    base = torch.nn.Linear(W.shape[1], W.shape[0], bias=False, device=W.device, dtype=W.dtype)
    base.weight.data.copy_(W)
    layer = Linear(base, "default", r=A.shape[0], lora_alpha=alpha, config=LoraConfig(r=A.shape[0]))
    layer.to(W.device, W.dtype)
    layer.lora_A["default"].weight.data.copy_(A)
    layer.lora_B["default"].weight.data.copy_(B)
    return layer


def forward_cases(M: int, K: int, N: int, r: int, dtype: torch.dtype, device: str = "cuda") -> dict:
    """name -> zero-argument callable for one LoRA projection forward (``peft`` when peft is installed)."""
    from lorafx.kernels._triton import launchers

    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(M, K, device=device, generator=g).to(dtype)
    W = (torch.randn(N, K, device=device, generator=g) / K**0.5).to(dtype)
    A = (torch.randn(r, K, device=device, generator=g) / K**0.5).to(dtype)
    B = (torch.randn(N, r, device=device, generator=g) / r**0.5).to(dtype)
    s = torch.tensor(2.0, device=device)
    cases = {
        "base": lambda: x @ W.t(),
        "unfused": lambda: x @ W.t() + ((x @ A.t()) @ B.t()) * 2.0,
        "fused": lambda: launchers.lora_linear(x, W, None, A, B, s),
    }
    peft = _peft_layer(W, A, B, alpha=2.0 * r)
    if peft is not None:
        cases["peft"] = lambda: peft(x)
    return cases


def multi_cases(M: int, K: int, N: int, r: int, n: int, dtype: torch.dtype, device: str = "cuda") -> dict:
    """Mixed-adapter batch (rows spread evenly over n adapters): the segmented kernels vs a loop of
    per-adapter index_select/index_copy (the composite) vs one adapter for every row (the floor)."""
    from lorafx.kernels._triton import launchers
    from lorafx.kernels.lora_linear_multi import multi_forward_composite

    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(M, K, device=device, generator=g).to(dtype)
    W = (torch.randn(N, K, device=device, generator=g) / K**0.5).to(dtype)
    A = (torch.randn(n, r, K, device=device, generator=g) / K**0.5).to(dtype)
    B = (torch.randn(n, N, r, device=device, generator=g) / r**0.5).to(dtype)
    s = torch.full((n,), 2.0, device=device)
    idx = torch.randperm(M, device=device, generator=g) % n
    return {
        "single": lambda: launchers.lora_linear(x, W, None, A[0], B[0], s[0]),
        "segmented": lambda: launchers.lora_linear_multi(x, W, None, A, B, s, idx),
        "loop": lambda: multi_forward_composite(x, W, None, A, B, s, idx),
    }


def celora_cases(T: int, K: int, N: int, r0: int, rho: float, dtype: torch.dtype, device: str = "cuda") -> dict:
    """CE-LoRA's ∂x of the frozen matmul: dense ``G W`` (cuBLAS, exact) vs the gathered Triton kernel
    vs the composite (index_select + cuBLAS)."""
    from lorafx.kernels._triton import launchers
    from lorafx.kernels.celora_input_grad import celora_input_grad_composite

    g = torch.Generator(device=device).manual_seed(2)
    G = torch.randn(T, N, device=device, generator=g).to(dtype)
    W = (torch.randn(N, K, device=device, generator=g) / K**0.5).to(dtype)
    B0 = (torch.randn(N, r0, device=device, generator=g) / r0**0.5).to(dtype)
    A0 = (torch.randn(r0, K, device=device, generator=g) / K**0.5).to(dtype)
    index = torch.randperm(N, device=device, generator=g)[: int(rho * N)].sort().values
    return {
        "dense": lambda: G @ W,
        "triton": lambda: launchers.celora_input_grad(G, W, B0, A0, index),
        "composite": lambda: celora_input_grad_composite(G, W, B0, A0, index),
    }


def timed(cases: dict) -> dict:
    from triton.testing import do_bench

    with torch.no_grad():
        return {k: do_bench(fn) for k, fn in cases.items()}


def bench_one(M: int, K: int, N: int, r: int, dtype: torch.dtype, gpu: str | None = None) -> dict:
    t = timed(forward_cases(M, K, N, r, dtype))
    row = {"M": M, "base_ms": t["base"], "unfused_ms": t["unfused"], "fused_ms": t["fused"], "peft_ms": t.get("peft")}
    if gpu is not None:  # the roofline prediction of the same shape, beside the measurement
        nbytes = torch.empty((), dtype=dtype).element_size()
        row.update({f"{k}_pred_ms": v * 1e3 for k, v in roofline(M, K, N, r, gpu, nbytes).items()})
    row["speedup_vs_unfused"] = row["unfused_ms"] / row["fused_ms"]
    row["fused_over_base"] = row["fused_ms"] / row["base_ms"]
    return row


def _table(header: str, rows: dict, ratio: str) -> list[str]:
    """Markdown lines: ``header`` names a label column and three timing columns; each row's ratio is
    its second timing over its first."""
    out = ["", f"| {header} | {ratio} |", "|---" * (header.count("|") + 2) + "|"]
    for label, (first, second, third) in rows.items():
        out.append(f"|{label} | {first:.3f} | {second:.3f} | {third:.3f} | {second / first:.3f} |")
    return out


def static(arches: list[str], workers: int | None, quick: bool) -> int:
    """``--static``: :mod:`benchmarks.kernels_static` over every specialization (``quick``: the fused
    forward in full, the other kernels at their extremes); exit 1 on a problem."""
    import time

    from benchmarks import kernels_static as ks

    start = time.perf_counter()
    jobs = ks.quick_jobs(tuple(arches)) if quick else ks.jobs(arches=tuple(arches))
    rows = ks.sweep(jobs, workers, progress=True)
    bad = ks.write_results(rows, RESULTS)
    print(f"{len(rows)} specializations in {time.perf_counter() - start:.0f} s; {len(bad)} problems")
    print("\n".join(bad) or "no spills, shared memory within every limit, every dot on tensor cores")
    return 1 if bad else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="three sizes of M only (--static: a subset)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--static", action="store_true", help="compile every specialization for sm_80/sm_90a, no GPU")
    parser.add_argument("--arch", nargs="+", default=["sm_80", "sm_90a"], help="with --static: targets")
    parser.add_argument("--workers", type=int, default=None, help="with --static: compile processes")
    parser.add_argument("--roofline", action="store_true", help="print the H100/H200 roofline prediction, no GPU")
    args = parser.parse_args(argv)
    if args.static:
        return static(args.arch, args.workers, args.quick)
    if args.roofline:
        table = roofline_table()
        print(f"roofline, one Llama-7B projection (K = N = 4096), r = 16, fp16\n{table}")
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "kernels_roofline.md").write_text(table + "\n")
        return 0
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py: no CUDA device here; the Triton kernel benchmark needs a GPU. Nothing to do.")
        return 0
    try:
        import triton  # noqa: F401
    except ImportError:
        print("benchmarks/kernels.py: triton is not installed (pip install 'lorafx[triton]').")
        return 0
    dtype = getattr(torch, args.dtype)
    sizes = [16, 512, 8192] if args.quick else [16, 64, 256, 1024, 2048, 4096, 8192]
    gpu = next((g for g in GPUS if g in torch.cuda.get_device_name()), None)
    rows = [bench_one(M, 4096, 4096, 16, dtype, gpu) for M in sizes]
    lines = [
        "| M | base (ms) | unfused (ms) | PEFT (ms) | fused (ms) | unfused / fused | fused / base "
        f"| {gpu or 'no'} roofline base / unfused / fused (ms) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        peft = f"{r['peft_ms']:.3f}" if r["peft_ms"] is not None else "n/a"
        pred = " / ".join(f"{r[k + '_pred_ms']:.3f}" for k in ("base", "unfused", "fused")) if gpu else "n/a"
        lines.append(
            f"| {r['M']} | {r['base_ms']:.3f} | {r['unfused_ms']:.3f} | {peft} | {r['fused_ms']:.3f} "
            f"| {r['speedup_vs_unfused']:.2f}× | {r['fused_over_base']:.3f} | {pred} |"
        )
    multi = {n: timed(multi_cases(4096, 4096, 4096, 16, n, dtype)) for n in (4, 32)}
    lines += _table(
        "mixed batch, M = 4096 | n adapters | one adapter (ms) | segmented kernels (ms) | per-adapter loop (ms)",
        {f"| {n}": (t["single"], t["segmented"], t["loop"]) for n, t in multi.items()},
        ratio="segmented / one",
    )
    ce = {rho: timed(celora_cases(4096, 4096, 4096, 14, rho, dtype)) for rho in (0.55, 0.65)}
    lines += _table(
        "CE-LoRA ∂x, T = 4096, [4096, 4096], r0 = 14 | ρ | dense G W (ms) | Triton (ms) | composite (ms)",
        {f"| {rho}": (t["dense"], t["triton"], t["composite"]) for rho, t in ce.items()},
        ratio="Triton / dense",
    )
    table = "\n".join(lines)
    print(f"{torch.cuda.get_device_name()}  K = N = 4096, r = 16, {args.dtype}\n{table}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "kernels.json").write_text(
        json.dumps(
            {"device": torch.cuda.get_device_name(), "dtype": args.dtype, "rows": rows, "multi": multi, "celora": ce},
            indent=2,
        )
    )
    (RESULTS / "kernels.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
