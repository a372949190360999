"""GPU benchmark of the fused 4-bit kernel (``lorafx::lora_linear_4bit``) against the QLoRA forward
people run today, one Llama-7B projection, LoRA r=16, NF4 with double quant, tokens M from 1 to 8192:

* ``dense``   — fp16 ``x Wᵀ`` + adapter on the dense weight (the floor: no decode at all);
* ``bnb``     — bitsandbytes ``Linear4bit.forward`` + ``s·(x Aᵀ) Bᵀ`` (what PEFT's bnb LoRA layer
  computes: bitsandbytes dequantizes W to fp16 then cuBLAS for M > 1, its gemv kernel for M = 1);
* ``fused``   — decode + GEMM + expand in one Triton kernel, one output write.

Not run yet: this machine has no GPU. The case builders run on any device, so the script is checked on
CPU under the Triton interpreter at tiny sizes (``TRITON_INTERPRET=1 python -m benchmarks.qlora_kernel
--check``). Run on a GPU: ``python -m benchmarks.qlora_kernel [--quick]``; prints a markdown table of
median ms (``triton.testing.do_bench``) and bnb/fused, fused/dense ratios.
"""

from __future__ import annotations

import argparse
import sys

import torch


def cases(M: int, K: int, N: int, r: int, dtype: torch.dtype, device: str = "cuda") -> dict:
    """Callables computing the same ``[M, N]`` output three ways (see the module docstring)."""
    import bitsandbytes as bnb

    from lorafx.kernels import lora_linear_4bit as op
    from lorafx.kernels.quantized_site import fused_operands

    g = torch.Generator(device="cpu").manual_seed(0)
    W = torch.randn(N, K, generator=g) / K**0.5
    lin = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=dtype, compress_statistics=True, quant_type="nf4")
    lin.load_state_dict({"weight": W})
    lin = lin.to(device)
    x = torch.randn(M, K, generator=g).to(device=device, dtype=dtype)
    A = (torch.randn(r, K, generator=g) / K**0.5).to(device)
    B = (torch.randn(N, r, generator=g) / r**0.5).to(device)
    s = torch.tensor(2.0, device=device)
    W16 = W.to(device=device, dtype=dtype)
    operands = fused_operands(lin)

    def adapter(y):
        return y + (s * (x.float() @ A.t()) @ B.t()).to(dtype)

    return {
        "dense": lambda: adapter(torch.nn.functional.linear(x, W16)),
        "bnb": lambda: adapter(lin(x)),
        "fused": lambda: op.triton_forward(x, *operands, None, A, B, s),
    }


def check() -> int:
    """Every case at tiny sizes on CPU (interpreted Triton): the three agree up to NF4 rounding of W."""
    out = {k: fn() for k, fn in cases(5, 128, 64, 4, torch.float32, device="cpu").items()}
    err = (out["fused"] - out["bnb"]).abs().max().item()
    print({k: tuple(v.shape) for k, v in out.items()}, "max |fused - bnb|", err)
    return 0 if err < 1e-4 else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two token counts only")
    parser.add_argument("--check", action="store_true", help="run the cases once on CPU (interpreted)")
    args = parser.parse_args(argv)
    if args.check:
        return check()
    if not torch.cuda.is_available():
        print("benchmarks.qlora_kernel needs CUDA; nothing to do here (use --check on CPU)")
        return 0
    from triton.testing import do_bench

    print("| K x N | M | dtype | dense ms | bnb ms | fused ms | bnb / fused | fused / dense |")
    print("|---|---|---|---|---|---|---|---|")
    for K, N in ((4096, 4096), (4096, 11008)):
        for M in (16, 2048) if args.quick else (1, 16, 256, 2048, 8192):
            for dtype in (torch.float16, torch.bfloat16):
                ms = {k: do_bench(fn) for k, fn in cases(M, K, N, 16, dtype).items()}
                print(
                    f"| {K} x {N} | {M} | {str(dtype)[6:]} | {ms['dense']:.3f} | {ms['bnb']:.3f} | {ms['fused']:.3f} "
                    f"| {ms['bnb'] / ms['fused']:.2f} | {ms['fused'] / ms['dense']:.2f} |"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
