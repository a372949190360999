"""Autotune configs of the Triton kernels, and the rule that drops the ones that would spill.

One home for tile shapes: :func:`configs` lists the candidates, :func:`fits` says which of them a
launch may use (``prune_configs_by``), judged from the launch's dtype and rank. The limits below were
read off ``python -m benchmarks.kernels --static`` (``ptxas -v`` on sm_80 and sm_90a; the table is in
``benchmarks/results/kernels_static.md``), which compiles every config :func:`fits` keeps and asserts
zero spills and tensor-core dots; ``tests/test_kernels_static.py`` keeps a subset of that true.
"""

from __future__ import annotations

import os

import triton

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Shared memory a block may use, the smaller of the targets we verify: sm_80 (A100) allows 163 KiB
# per block (166,912 B), sm_90 (H100/H200) 227 KiB (232,448 B).
SMEM_BYTES = 166_912
# fp32 accumulator elements per thread that fit ptxas's 255 registers beside the operands, sm_90a:
# fp16 128×256×64 over 8 warps (128 per thread) uses 210 registers at R = 16, 220 at R = 64 and
# spills 108 B at R = 128 (the expand's h fragment doubles); with fp32 operands (3xTF32 keeps hi and
# lo halves) the same tile spills 3.6 to 4.7 KB at every R. 64 per thread fits both.
ACC_PER_THREAD = 128
ACC_PER_THREAD_FP32_OR_WIDE_RANK = 64
WIDE_RANK = 128  # BLOCK_R from which the expand's fragment no longer fits beside 128 accumulators
# GROUP_M: consecutive programs walk GROUP_M row blocks down one column block, so a wave of 132
# programs (H100 SMs) reads ~GROUP_M row panels of x and 132/GROUP_M column panels of W, not 1 and
# 132: the W panels stay in the 50 MB L2 at M·N = 8192×4096.
GROUP_M = 8


def configs(kind: str) -> list:
    """Candidate configs of kernel ``kind`` ("shrink" or "fused"). One small config under the
    interpreter (it times every config by running it, and interpreted runs cost seconds); its
    GROUP_M = 2 makes the 3×3-block test shapes use a full and a partial swizzle group."""
    if _INTERPRET:
        tile = (
            {"BLOCK_M": 16, "BLOCK_K": 16}
            if kind == "shrink"
            else {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}
        )
        return [triton.Config(tile, num_warps=1)]
    if kind == "shrink":
        return [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=4) for bm in (16, 64, 128) for bk in (64, 128)]
    shapes = [
        (16, 128, 64, 4, 4),
        (32, 128, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 128, 32, 8, 3),
        (128, 128, 64, 8, 3),
        (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3),
    ]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": GROUP_M}, num_warps=w, num_stages=s)
        for m, n, k, w, s in shapes
    ]


def fits(config, operand_bytes: int, block_r: int) -> bool:
    """Whether ``config`` compiles without spills or shared-memory overflow for operands of
    ``operand_bytes`` (2 for fp16/bf16, 4 when the dots run on fp32 operands) and rank block ``block_r``."""
    kw, warps = config.kwargs, config.num_warps
    bm, bn, bk = kw["BLOCK_M"], kw.get("BLOCK_N", block_r), kw["BLOCK_K"]  # shrink: a BLOCK_M × BLOCK_R tile
    tight = operand_bytes == 4 or block_r >= WIDE_RANK
    if bm * bn // (32 * warps) > (ACC_PER_THREAD_FP32_OR_WIDE_RANK if tight else ACC_PER_THREAD):
        return False
    # At most num_stages buffers of the x and w tiles; the expand's operands reuse them once the K loop
    # drains (measured: fp16 128×256×64, 3 stages: 147,456 B at both R = 16 and R = 64 on sm_90a).
    return config.num_stages * (bm * bk + bk * bn) * operand_bytes <= SMEM_BYTES


def _operand_bytes(named_args: dict, kwargs: dict) -> int:
    x = named_args.get("x_ptr")
    fp32 = kwargs.get("DOT_FP32", True) or (x is not None and x.dtype.itemsize == 4)
    return 4 if fp32 else 2


def prune(configs: list, named_args: dict, **kwargs) -> list:
    """``early_config_prune`` of both kernels: the configs that :func:`fits` this launch (at least one:
    the smallest tile, which fits every dtype and rank the launchers pass)."""
    nbytes, block_r = _operand_bytes(named_args, kwargs), kwargs.get("BLOCK_R", 16)
    kept = [c for c in configs if fits(c, nbytes, block_r)]
    return kept or configs[:1]
