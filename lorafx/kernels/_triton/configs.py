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
# fp32 accumulator elements per thread (BLOCK_M·BLOCK_N / threads) that fit ptxas's 255 registers
# beside the dot operands, by the rank block of the expand, measured with ``ptxas -v``. sm_80's mma.sync
# keeps both operands of a dot in registers (sm_90a's wgmma reads one from shared memory), so sm_80
# sets the limits: fp16 128×256×64 and 256×128×64 / 8 warps (128 per thread) spill 56-64 B at R = 16
# on sm_80 (clean on sm_90a up to R = 64), bf16 128×128×64 / 8 warps (64) spills 504 B at R = 128,
# 16×128×64 / 4 warps (16) is clean there.
ACC_PER_THREAD = {16: 64, 32: 64, 64: 64, 128: 32}
# 3xTF32 (fp32 operands) holds hi and lo halves of both operands: fp32 128×128×32 / 8 warps (64 per
# thread) spills 1,912 B on sm_80 at R = 16, and 32×128×64 / 4 warps (32 per thread, 80 operand
# words) 1,096 B on sm_80 and 1,208 B on sm_90a; the fp32 tiles below keep 48 words or fewer.
ACC_PER_THREAD_FP32 = 32
FP32_OPERAND_WORDS = 48
# Registers per thread of the expand's operands, h [BLOCK_M, BLOCK_R] and B [BLOCK_R, BLOCK_N] as
# loaded, 4-byte words, doubled for 3xTF32's hi/lo halves. Spilled: fp32 64×64 at R = 64 (128 words,
# 700 B on sm_80), fp32 32×64 at R = 128 (192 words, ~400 B on both), fp32 B on an fp16 model at
# 32×128, R = 128 (144 words, 352-376 B); clean: fp32 32×64 at R = 64 (96), fp16 32×128 at R = 128 (80).
EXPAND_WORDS = 96
# Operand words (4-byte registers) per thread of one K step of the shrink kernel, x's BLOCK_M × BLOCK_K
# plus c's BLOCK_K × BLOCK_R tile: fp32 128×64 / 4 warps (64 words of x) spills 12 B on sm_80 at
# R = 8, fp32 64×64 at R = 128 (64 words of c) 25 KB.
SHRINK_OPERAND_WORDS = 32
# Tiles the full sweep (882 specialisations, every config × R × dtype × flag set, sm_80 and sm_90a)
# found spilling although the word counts above admit them: the segmented and CE-LoRA kernels keep
# row/column index vectors live beside the tile, and an fp32 B on a half model doubles the expand's
# B words. (kernel mode, BLOCK_M, BLOCK_N, BLOCK_K, warps, fp32 operands) -> the smallest rank block
# that spills, with the measurement:
SPILLS_FROM_BLOCK_R = {
    ("mixed", 64, 128, 64, 4, False): 32,  # sm_80 fp16/bf16: 8 B at R = 32, 76 B at R = 64
    ("segmented", 64, 128, 64, 4, False): 64,  # sm_80 fp16/bf16: 104 B at R = 64
    ("gather", 32, 64, 32, 4, False): 64,  # CE-LoRA, sm_80 fp16/bf16: 24 B at R = 64
    ("segmented", 32, 64, 32, 4, True): 16,  # sm_90a fp32 (3xTF32): 8 B at R = 8
}
# Tiles that spill only when R is no multiple of 16: Triton then cannot assume 16-aligned rank-sized
# strides (``tt.divisibility``) and loads h and B in narrower pieces, which costs registers. Found by
# the sweep at R = 24, 48 and 96 (the rank blocks 32-128 without that alignment; R = 8 is block 16's):
# (the same key as above) -> the smallest rank block that spills when R % 16 != 0.
SPILLS_FROM_BLOCK_R_UNALIGNED = {
    ("gather", 64, 64, 32, 4, True): 32,  # CE-LoRA fp32, sm_80: 255 registers, 88 B at R = 24 (241, 0 B at R = 32)
}
# GROUP_M: consecutive programs walk GROUP_M row blocks down one column block. At M = 8192,
# K = N = 4096, fp16, 128×128 tiles (each x or W panel 1 MiB), a wave of 132 programs (H100 SMs) in
# the old row-block-fastest order touched all 64 x panels and 2-3 W panels (~66 MiB, over the 50 MB
# L2); grouped by 8 it touches 8 x panels and 17 W panels (25 MiB).
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
        tiles = [(16, 32), (16, 64), (16, 128), (64, 32), (64, 64), (64, 128), (128, 32), (128, 64), (128, 128)]
        return [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=4) for bm, bk in tiles]
    shapes = [
        (16, 32, 32, 4, 3),  # the fallback: fits every dtype and rank (fp32 at R = 128: 96 expand words)
        (32, 64, 32, 4, 3),  # fp32 operands (3xTF32) keep at most these three: see FP32_OPERAND_WORDS
        (64, 64, 32, 4, 3),
        (16, 128, 64, 4, 4),
        (32, 128, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 128, 32, 8, 3),
        (128, 128, 64, 8, 3),
    ]  # 128×256 and 256×128 over 8 warps spill on sm_80 at every rank (ACC_PER_THREAD): not listed
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": GROUP_M}, num_warps=w, num_stages=s)
        for m, n, k, w, s in shapes
    ]


def rank_aligned(named_args: dict, kwargs: dict) -> bool:
    """Whether a launch's rank ``R`` is a multiple of 16 (Triton's divisibility specialisation of the
    rank-sized strides), from an ``early_config_prune``'s arguments; True when ``R`` is not among them."""
    R = named_args.get("R", kwargs.get("R"))
    return not isinstance(R, int) or R % 16 == 0


def fits(
    config, operand_bytes: int, block_r: int, b_bytes: int | None = None, mode: str = "plain", aligned: bool = True
) -> bool:
    """Whether ``config`` compiles without spills or shared-memory overflow for operands of
    ``operand_bytes`` (2 for fp16/bf16, 4 when the dots run on fp32 operands), rank block ``block_r``
    and the expand's B loaded with ``b_bytes`` per element (default ``operand_bytes``). CE-LoRA's
    gathered K loop needs no rule of its own: its 256×128 tile spilled 600-776 B, and ACC_PER_THREAD
    drops that tile for every kernel. Shrink configs have no BLOCK_N: their tile is BLOCK_M × BLOCK_R.
    ``mode`` ("plain", "segmented", "gather") names the fused kernel's flag set for
    :data:`SPILLS_FROM_BLOCK_R`; an fp32 B on half operands counts as "mixed". ``aligned``: the rank is
    a multiple of 16 (:func:`rank_aligned`), else :data:`SPILLS_FROM_BLOCK_R_UNALIGNED` applies too."""
    kw, threads = config.kwargs, 32 * config.num_warps
    bm, bk = kw["BLOCK_M"], kw["BLOCK_K"]
    if "BLOCK_N" not in kw:  # shrink: one dot of x[BLOCK_M, BLOCK_K] and c[BLOCK_K, BLOCK_R]
        words = (bm * bk + bk * block_r) * operand_bytes // 4 // threads
        return words <= SHRINK_OPERAND_WORDS and bm * block_r // threads <= ACC_PER_THREAD[min(block_r, 128)]
    bn = kw["BLOCK_N"]
    if b_bytes is not None and b_bytes > operand_bytes and mode == "plain":
        mode = "mixed"
    key = (mode, bm, bn, bk, config.num_warps, operand_bytes == 4)
    for table in (SPILLS_FROM_BLOCK_R,) if aligned else (SPILLS_FROM_BLOCK_R, SPILLS_FROM_BLOCK_R_UNALIGNED):
        if key in table and block_r >= table[key]:
            return False
    limit = min(ACC_PER_THREAD[min(block_r, 128)], ACC_PER_THREAD_FP32 if operand_bytes == 4 else 10**9)
    if bm * bn // threads > limit:
        return False
    if operand_bytes == 4 and (bm * bk + bk * bn) // threads > FP32_OPERAND_WORDS:
        return False
    split = 2 if operand_bytes == 4 else 1
    if (
        bm * block_r * operand_bytes + block_r * bn * (b_bytes or operand_bytes)
    ) * split // 4 // threads > EXPAND_WORDS:
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
    the first, smallest tile, which fits every dtype and rank the launchers pass)."""
    nbytes, block_r = _operand_bytes(named_args, kwargs), kwargs.get("BLOCK_R", 16)
    bt = named_args.get("bt_ptr") if kwargs.get("HAS_ADAPTER") else None
    b_bytes = bt.dtype.itemsize if bt is not None and hasattr(bt, "dtype") else None
    mode = "segmented" if kwargs.get("SEGMENTED") else "gather" if kwargs.get("GATHER_K") else "plain"
    kept = [c for c in configs if fits(c, nbytes, block_r, b_bytes, mode, rank_aligned(named_args, kwargs))]
    return kept or configs[:1]
