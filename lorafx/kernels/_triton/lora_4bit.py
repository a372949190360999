"""Fused 4-bit dequant + GEMM + adapter expand: ``y = x·dequant(Wq)ᵀ + h Bᵀ + b`` in one accumulator.

The base weight stays in bitsandbytes' packed 4-bit layout (NF4 or FP4, optionally double-quantized)
and is decoded tile by tile in registers, right before the ``tl.dot`` that consumes it: the dense
``[N, K]`` weight never exists in memory. bitsandbytes' own CUDA path for more than one token
dequantizes the whole weight to the compute dtype first and then runs a cuBLAS GEMM (``matmul_4bit``):
for a 4096 x 4096 layer that is 32 MiB written and read back in fp16 beside the 8 MiB packed read.
The adapter expand (``h [M, R]``, which already carries ``s`` and the gate) is added into the same
fp32 accumulator, as in :mod:`~lorafx.kernels._triton.kernels`, and the output is written once.

The layout, from bitsandbytes 0.50's ``quantize_4bit`` and its default (CPU) ``dequantize_4bit``:

* ``Wq``: ``uint8 [N·K/2]``, the row-major ``[N, K]`` weight flattened, two codes per byte, element
  ``2i`` in the high nibble and ``2i + 1`` in the low one;
* ``code [16]``: the fp32 value of each 4-bit code (NF4 or FP4 table), times
* ``absmax``: one scale per ``BLOCKSIZE`` consecutive flat elements, fp32; or, double-quantized,
  ``uint8`` codes decoded as ``code2[absmax] · absmax2[j // BLOCKSIZE2] + offset``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from lorafx.kernels._triton.configs import rank_aligned
from lorafx.kernels._triton.kernels import tensor_core_dot

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _configs() -> list:
    """Autotune configs keyed on (M, N, K, R). One small config under the interpreter (it would time
    every config by running it, seconds each). On GPU the decode costs registers: the
    ``[BLOCK_K, BLOCK_N]`` tile is decoded before its dot, so tiles stay at 64 x 128 x 64 or below
    (``ptxas -v`` of the 64 x 128 x 64, 4-warp config: no spills on sm_80 and sm_90a, see the README)."""
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=1)]
    shapes = [(16, 64, 64, 4, 4), (32, 64, 64, 4, 4), (64, 64, 64, 4, 3), (64, 128, 64, 4, 3), (128, 64, 64, 8, 3)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for m, n, k, w, s in shapes
    ]


@triton.jit
def _decode_tile(
    q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, k0, n0, rk, rn, k_mask, n_mask, KW,
    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, ALIGNED: tl.constexpr,
    TRANS: tl.constexpr,
):  # fmt: skip
    # ---- the [BLOCK_K, BLOCK_N] tile (reduction rk, output rn) of dequant(Wq)ᵀ, or (TRANS) of
    # dequant(Wq) itself, in fp32. W is [rows, KW] row-major: element (i, j) is flat element i·KW + j.
    if TRANS:  # ∂x = ∂y W: the reduction runs over W's rows
        flat = rk[:, None] * KW + rn[None, :]  # int32: the launcher checks rows·KW < 2³¹
    else:  # y = x Wᵀ: the reduction runs over W's columns
        flat = rn[None, :] * KW + rk[:, None]
    mask = k_mask[:, None] & n_mask[None, :]
    byte = tl.load(q_ptr + flat // 2, mask=mask, other=0).to(tl.int32)
    nibble = tl.where(flat % 2 == 0, byte >> 4, byte & 0xF)
    w = tl.load(code_ptr + nibble)  # a 16-entry table: stays in L1
    # ALIGNED (KW % BLOCKSIZE == 0 and the tile's extent along W's rows' direction divides BLOCKSIZE):
    # one scale per W row of the tile, a vector load instead of a [BLOCK_K, BLOCK_N] gather.
    if ALIGNED:
        if TRANS:
            blk = (rk * KW + n0) // BLOCKSIZE
            bmask = k_mask
        else:
            blk = (rn * KW + k0) // BLOCKSIZE
            bmask = n_mask
    else:
        blk = flat // BLOCKSIZE
        bmask = mask
    if NESTED:
        scale = tl.load(code2_ptr + tl.load(absmax_ptr + blk, mask=bmask, other=0).to(tl.int32))
        scale = scale * tl.load(absmax2_ptr + blk // BLOCKSIZE2, mask=bmask, other=0.0) + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + blk, mask=bmask, other=0.0)
    if ALIGNED:
        if TRANS:
            return w * scale[:, None]
        return w * scale[None, :]
    return w * scale


# Tiles that spill at a rank block although the rules of _prune admit them, read off the static sweep
# (``python -m benchmarks.kernels --static``: ``ptxas -v`` on sm_80 and sm_90a, every config x dtype x
# R in 8..128; rank block 16 covers R = 8 and 16). (path, fp32 operands, BLOCK_M, BLOCK_N) -> rank
# blocks. Half operands: sm_80's mma.sync keeps both operands in registers, so 64 x 128 runs out at every
# rank (255 registers, 292-952 B), the others spill 8-12 B at one rank each. fp32 operands (3xTF32
# keeps hi and lo halves of both): 64 x 64 and up spill 32 B to 80 KB on sm_80.
_EVERY = frozenset({16, 32, 64, 128})
_SPILLS = {
    ("forward", False, 64, 128): _EVERY,
    ("forward", False, 32, 64): {16},
    ("forward", False, 16, 64): {64},
    ("forward", False, 128, 64): {64},
    ("forward", True, 16, 64): {16},  # 12 B on sm_90a at R = 8
    ("forward", True, 32, 64): {128},  # 280-296 B
    ("forward", True, 64, 64): _EVERY,
    ("forward", True, 64, 128): _EVERY,
    ("forward", True, 128, 64): _EVERY,
    ("elementwise", True, 32, 64): _EVERY,  # 76-644 B
    ("dx", True, 32, 64): {64, 128},  # 304-480 B
    ("dx", True, 64, 64): {16, 128},  # 32 B at R = 8, 2.7 KB at R = 128 (sm_80)
    ("dx", True, 128, 64): _EVERY,
}

# Spilling only when R is no multiple of 16 (configs.SPILLS_FROM_BLOCK_R_UNALIGNED says why), sm_80:
_SPILLS_UNALIGNED = {
    ("forward", False, 32, 64): {32},  # fp16/bf16 R = 24: 128 registers, 12 B (none at R = 32)
    ("dx", True, 64, 64): {32},  # fp32 R = 24: 255 registers, 32 B (none at R = 32)
}


def _prune(configs, named_args, **kwargs) -> list:
    """Without ALIGNED the scales are a [BLOCK_K, BLOCK_N] gather: 64 x 64 x 64 tiles spill on sm_80
    (ptxas: 255 registers, 88 bytes spill stores) and 64 x 128 x 64 on sm_90a (80 bytes), so only
    tiles up to 32 x 64 are kept (sm_80: 228-242 registers, no spills). The aligned TRANS tile spans
    BLOCK_N columns of a W row, which must stay inside one quant block (64 or more): BLOCK_N <= 64.
    Then the tiles :data:`_SPILLS` measured spilling at this rank block and operand type go (and those of
    :data:`_SPILLS_UNALIGNED` when R is no multiple of 16); the first config (16 x 64) stands in if none
    is left."""
    aligned, trans = kwargs.get("ALIGNED", True), kwargs.get("TRANS", False)
    if not aligned:
        path, kept = "elementwise", [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 32 * 64]
    elif trans:
        path, kept = "dx", [c for c in configs if c.kwargs["BLOCK_N"] <= 64]
    else:
        path, kept = "forward", list(configs)
    key = (path, bool(kwargs.get("DOT_FP32", False)))
    block_r = kwargs.get("BLOCK_R", 16)
    tables = (_SPILLS,) if rank_aligned(named_args, kwargs) else (_SPILLS, _SPILLS_UNALIGNED)
    clean = [
        c
        for c in kept
        if not any(block_r in t.get((*key, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]), ()) for t in tables)
    ]
    return clean or kept[:1] or configs[:1]


@triton.autotune(configs=_configs(), key=["M", "N", "K", "R"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def lora_4bit_kernel(
    # pointers
    x_ptr, q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, bias_ptr, h_ptr, bt_ptr, y_ptr,
    # dims (KW: the row length of the packed W, = K unless TRANS)
    M, N, K, R, KW,
    # strides
    stride_xm, stride_xk, stride_hm, stride_hr, stride_br, stride_bn, stride_ym, stride_yn,
    # meta-parameters
    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, ALIGNED: tl.constexpr,
    TRANS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ADAPTER: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # ---- tile of y[M, N] = x[M, K] @ dequant(Wq)ᵀ[K, N] + h[M, R] @ bt[R, N] + bias
    # (TRANS: x[M, K] @ dequant(Wq)[K, N], the ∂x of the forward, with W [K, N = KW])
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n0 = tl.program_id(1) * BLOCK_N
    rn = n0 + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # ---- base GEMM on the decoded tiles, fp32 accumulator
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_mask = rk < K
        a = tl.load(
            x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk, mask=m_mask[:, None] & k_mask[None, :], other=0.0
        )
        w = _decode_tile(
            q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, k0, n0, rk, rn, k_mask, n_mask, KW,
            BLOCKSIZE, BLOCKSIZE2, NESTED, ALIGNED, TRANS,
        )  # fmt: skip
        # fp32 x: 3xTF32 on tensor cores (an "ieee" dot runs on FFMA); half x: W rounded to x's dtype,
        # as bitsandbytes' dequantize-then-GEMM does
        acc = tensor_core_dot(a, w, acc, DOT_FP32)
    # ---- adapter expand into the same accumulator (h already carries s and the gate)
    if HAS_ADAPTER:
        rr = tl.arange(0, BLOCK_R)
        r_mask = rr < R
        h = tl.load(
            h_ptr + rm[:, None] * stride_hm + rr[None, :] * stride_hr, mask=m_mask[:, None] & r_mask[None, :], other=0.0
        )
        bt = tl.load(
            bt_ptr + rr[:, None] * stride_br + rn[None, :] * stride_bn,
            mask=r_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
        # h and Bᵀ in x's dtype (half x: h rounded, as the fused kernel's expand), or 3xTF32 for fp32 x
        acc = tensor_core_dot(h.to(x_ptr.dtype.element_ty), bt, acc, DOT_FP32)
    # ---- epilogue: bias, one write in the output dtype
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


def _block_r(R: int) -> int:
    return max(16, triton.next_power_of_2(R))  # tl.dot needs every block dim >= 16


def lora_4bit(x2, qweight, absmax, code, absmax2, code2, offset, N: int, blocksize: int, blocksize2: int,
              bias=None, h=None, bt=None, trans: bool = False, kw: int | None = None):  # fmt: skip
    """``x2 @ dequant(Wq)ᵀ + h @ bt + bias`` ``[M, N]`` in ``x2``'s dtype (layout: module docstring),
    W ``[N, K]``; with ``trans``, ``x2 @ dequant(Wq) + h @ bt`` ``[M, kw]`` for W ``[K, kw]`` (the ∂x of
    the forward: ``x2`` is ∂y, ``N`` there is W's rows = ``x2.shape[1]``).

    ``qweight`` uint8 (the packed ``[rows · cols / 2]``); ``absmax`` fp32, or uint8 with
    ``absmax2``/``code2``/``offset`` (double quant; ``offset`` a one-element fp32 tensor, read on the
    device: no host sync); ``h`` ``[M, R]`` (scaled and gated), ``bt`` ``[R, out]``; one device."""
    M, K = x2.shape
    out, row = (kw, kw) if trans else (N, K)
    if K * out >= 2**31:
        raise ValueError(f"lora_4bit: W has {K * out} elements, beyond the kernel's int32 indexing (max 2**31 - 1)")
    y = x2.new_empty((M, out))
    adapter = h is not None
    R = h.shape[1] if adapter else 0
    h_ = h if adapter else y
    bt_ = bt if adapter else y
    nested = absmax2 is not None
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(out, meta["BLOCK_N"]))  # noqa: E731
    # every config's BLOCK_K (16 or 64) divides the block sizes bitsandbytes allows (32 ... 4096);
    # TRANS tiles span BLOCK_N <= 64 columns of a row (_prune)
    aligned = row % blocksize == 0 and blocksize % 64 == 0
    lora_4bit_kernel[grid](
        x2, qweight, absmax, code, absmax2 if nested else absmax, code2 if nested else code,
        offset if nested else code, bias if bias is not None else y, h_, bt_, y,
        M, out, K, R, row,
        x2.stride(0), x2.stride(1), h_.stride(0), h_.stride(1), bt_.stride(-2), bt_.stride(-1), y.stride(0), y.stride(1),
        BLOCKSIZE=blocksize, BLOCKSIZE2=blocksize2, NESTED=nested, ALIGNED=aligned, TRANS=trans,
        HAS_BIAS=bias is not None, HAS_ADAPTER=adapter, DOT_FP32=x2.dtype == torch.float32, BLOCK_R=_block_r(R),
    )  # fmt: skip
    return y
