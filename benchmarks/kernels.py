"""GPU kernel benchmark: fused ``lorafx::lora_linear`` vs the unfused path vs PEFT, Llama-7B shapes.

One projection of Llama-7B (K = N = 4096), adapter rank 16, tokens M from 16 to 8192, fp16:

* ``base``    — cuBLAS ``x Wᵀ`` alone (the floor);
* ``unfused`` — cuBLAS base + separate adapter matmuls ``y + s·(x Aᵀ) Bᵀ`` (what eager PyTorch does);
* ``peft``    — a PEFT ``LoraLayer`` forward (same math, PEFT's module);
* ``fused``   — the Triton shrink + fused GEMM/expand (one output write).

Timed with ``triton.testing.do_bench`` (median ms); ratios are unfused/fused and fused/base. Run:
``python -m benchmarks.kernels [--quick]``. Without CUDA it prints a message and exits 0.
Goal (issue 4): ≥ 1.25× over unfused at large M, within 3% of base at small M.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


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


def bench_one(M: int, K: int, N: int, r: int, dtype: torch.dtype) -> dict:
    from triton.testing import do_bench

    from lorafx.kernels import triton_lora

    dev = "cuda"
    x = torch.randn(M, K, device=dev, dtype=dtype)
    W = torch.randn(N, K, device=dev, dtype=dtype) / K**0.5
    A = torch.randn(r, K, device=dev, dtype=dtype) / K**0.5
    B = torch.randn(N, r, device=dev, dtype=dtype) / r**0.5
    s = torch.tensor(2.0, device=dev)
    with torch.no_grad():
        row = {
            "M": M,
            "base_ms": do_bench(lambda: x @ W.t()),
            "unfused_ms": do_bench(lambda: x @ W.t() + ((x @ A.t()) @ B.t()) * 2.0),
            "fused_ms": do_bench(lambda: triton_lora.lora_linear(x, W, None, A, B, s)),
        }
        peft = _peft_layer(W, A, B, alpha=2.0 * r)
        row["peft_ms"] = do_bench(lambda: peft(x)) if peft is not None else None
    row["speedup_vs_unfused"] = row["unfused_ms"] / row["fused_ms"]
    row["fused_over_base"] = row["fused_ms"] / row["base_ms"]
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="three sizes of M only")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    args = parser.parse_args(argv)
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
    rows = [bench_one(M, 4096, 4096, 16, dtype) for M in sizes]
    lines = [
        "| M | base (ms) | unfused (ms) | PEFT (ms) | fused (ms) | unfused / fused | fused / base |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        peft = f"{r['peft_ms']:.3f}" if r["peft_ms"] is not None else "n/a"
        lines.append(
            f"| {r['M']} | {r['base_ms']:.3f} | {r['unfused_ms']:.3f} | {peft} | {r['fused_ms']:.3f} "
            f"| {r['speedup_vs_unfused']:.2f}× | {r['fused_over_base']:.3f} |"
        )
    table = "\n".join(lines)
    print(f"{torch.cuda.get_device_name()}  K = N = 4096, r = 16, {args.dtype}\n{table}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "kernels.json").write_text(
        json.dumps({"device": torch.cuda.get_device_name(), "dtype": args.dtype, "rows": rows}, indent=2)
    )
    (RESULTS / "kernels.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
