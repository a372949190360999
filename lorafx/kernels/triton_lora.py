"""Triton kernels for ``lorafx::lora_linear``: a shrink kernel, then one fused GEMM + expand.

The LoRAFusion split: ``h = s·((x_in Aᵀ) ⊙ g)`` is small (``[M, R]``, fp32), so it is computed first
by :func:`_shrink_kernel`; :func:`_fused_kernel` then keeps ``x Wᵀ`` and ``h Bᵀ`` in one fp32
accumulator and writes the output once (bias in the epilogue). Unfused, the adapter costs a second
read-modify-write of the ``[M, N]`` output: 2·M·N·2 bytes, 128 MiB at M = 8192, N = 4096 in fp16.

The backward uses the same two kernels: ``u = s·(dY B)`` (shrink of dY against B), then
``dX = dY W + (u ⊙ g) A`` in one accumulator; ``dA = dhᵀ x_in`` and ``dB = dYᵀ h`` are plain GEMMs
through the fused kernel without its adapter term. Multi-adapter batches (``idx`` per row) run the
same kernels over rows grouped by adapter (Punica's SGMV): a device-side argsort/bincount gives each
adapter's segment, each program takes one adapter's rows, so the adapter products stay ``tl.dot``s.

This module is never imported by ``import lorafx``; :mod:`lorafx.kernels.ops` registers it for CUDA.
On CPU the kernels run under the Triton interpreter (``TRITON_INTERPRET=1`` before ``import triton``),
which is how the tests check them.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _configs(kind: str) -> list:
    """Autotune configs, keyed on (M, N, K, R). One small config under the interpreter (it times
    every config by running it, and interpreted runs cost seconds)."""
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=1)]
    if kind == "shrink":
        return [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": 16, "BLOCK_K": bk}, num_warps=4)
            for bm in (16, 64, 128)
            for bk in (64, 128)
        ]
    shapes = [
        (16, 128, 64, 4, 4),
        (32, 128, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 128, 32, 8, 3),
        (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3),
    ]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for m, n, k, w, s in shapes
    ]


@triton.autotune(configs=_configs("shrink"), key=["M", "K", "R"])
@triton.jit
def _shrink_kernel(
    # pointers
    x_ptr, c_ptr, g_ptr, s_ptr, order_ptr, start_ptr, count_ptr, h_ptr,
    # dims
    M, K, R,
    # strides
    stride_xm, stride_xk, stride_ca, stride_ck, stride_cr, stride_gm, stride_gr, stride_hm, stride_hr,
    # meta-parameters
    HAS_GATE: tl.constexpr, SEGMENTED: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # ---- h[M, R] = s · (x[M, K] @ c[K, R]) ⊙ g, fp32
    # SEGMENTED (multi-adapter): program (m-block, a) takes rows order[start[a] + ...] of adapter a only,
    # so every tile is one adapter's and the product is a tl.dot (Punica's SGMV, not a per-row gather).
    pid_m = tl.program_id(0)
    if SEGMENTED:
        a = tl.program_id(1)
        count = tl.load(count_ptr + a)
        if pid_m * BLOCK_M >= count:  # most programs of a short segment: nothing to do
            return
        local = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = local < count
        rm = tl.load(order_ptr + tl.load(start_ptr + a) + local, mask=m_mask, other=0)
        scale = tl.load(s_ptr + a).to(tl.float32)
        c_ptr += a * stride_ca
    else:
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = rm < M
        scale = tl.load(s_ptr).to(tl.float32)
    rr = tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    r_mask = rr < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_mask = kk < K
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + kk[None, :] * stride_xk, mask=m_mask[:, None] & k_mask[None, :], other=0.0
        ).to(tl.float32)
        c = tl.load(
            c_ptr + kk[:, None] * stride_ck + rr[None, :] * stride_cr, mask=k_mask[:, None] & r_mask[None, :], other=0.0
        )
        acc += tl.dot(x, c.to(tl.float32), input_precision="ieee")
    # ---- epilogue: scale, gate, store fp32
    acc = acc * scale
    out_mask = m_mask[:, None] & r_mask[None, :]
    if HAS_GATE:
        acc *= tl.load(g_ptr + rm[:, None] * stride_gm + rr[None, :] * stride_gr, mask=out_mask, other=0.0).to(
            tl.float32
        )
    tl.store(h_ptr + rm[:, None] * stride_hm + rr[None, :] * stride_hr, acc, mask=out_mask)


@triton.autotune(configs=_configs("fused"), key=["M", "N", "K", "R"])
@triton.jit
def _fused_kernel(
    # pointers
    x_ptr, w_ptr, bias_ptr, h_ptr, bt_ptr, order_ptr, start_ptr, count_ptr, kidx_ptr, y_ptr,
    # dims (NA: number of adapters; segment NA holds the base-only rows)
    M, N, K, R, NA,
    # strides
    stride_xm, stride_xk, stride_wk, stride_wn, stride_hm, stride_hr,
    stride_ba, stride_br, stride_bn, stride_ym, stride_yn,
    # meta-parameters
    HAS_BIAS: tl.constexpr, HAS_ADAPTER: tl.constexpr, SEGMENTED: tl.constexpr, DOT_FP32: tl.constexpr,
    GATHER_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # ---- tile of y[M, N] = x[M, K] @ w[K, N] + h[M, R] @ bt[R, N] + bias
    # GATHER_K: the K axis runs over kidx[0:K], columns of x and rows of w picked in place (CE-LoRA's
    # G[:, I] W[I, :] without materialising either)
    # SEGMENTED: program (m-block, n-block, a) as in _shrink_kernel; rows of segment NA get no adapter.
    pid_m = tl.program_id(0)
    if SEGMENTED:
        a = tl.program_id(2)
        count = tl.load(count_ptr + a)
        if pid_m * BLOCK_M >= count:
            return
        local = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = local < count
        rm = tl.load(order_ptr + tl.load(start_ptr + a) + local, mask=m_mask, other=0)
    else:
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = rm < M
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_mask = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # ---- base GEMM, fp32 accumulator (ieee for fp32 operands: tf32 would lose 13 mantissa bits)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_mask = kk < K
        if GATHER_K:
            kk = tl.load(kidx_ptr + kk, mask=k_mask, other=0)
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + kk[None, :] * stride_xk, mask=m_mask[:, None] & k_mask[None, :], other=0.0
        )
        w = tl.load(
            w_ptr + kk[:, None] * stride_wk + rn[None, :] * stride_wn, mask=k_mask[:, None] & n_mask[None, :], other=0.0
        )
        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    # ---- adapter expand into the same accumulator (h already carries s and the gate)
    if HAS_ADAPTER:
        rr = tl.arange(0, BLOCK_R)
        r_mask = rr < R
        h = tl.load(
            h_ptr + rm[:, None] * stride_hm + rr[None, :] * stride_hr, mask=m_mask[:, None] & r_mask[None, :], other=0.0
        )
        bt_mask = r_mask[:, None] & n_mask[None, :]
        if SEGMENTED:
            if a < NA:
                bt = tl.load(
                    bt_ptr + a * stride_ba + rr[:, None] * stride_br + rn[None, :] * stride_bn, mask=bt_mask, other=0.0
                )
                acc += tl.dot(h, bt.to(tl.float32), input_precision="ieee")
        else:
            bt = tl.load(bt_ptr + rr[:, None] * stride_br + rn[None, :] * stride_bn, mask=bt_mask, other=0.0)
            acc += tl.dot(h, bt.to(tl.float32), input_precision="ieee")
    # ---- epilogue: bias, one write in the output dtype
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


def _block_r(R: int) -> int:
    return max(16, triton.next_power_of_2(R))  # tl.dot needs every block dim >= 16


class Segments(NamedTuple):
    """Rows of a multi-adapter batch grouped by adapter, computed on the device (no host sync):
    ``order`` lists row ids adapter by adapter, segment ``a`` is ``order[starts[a] : starts[a] +
    counts[a]]``; segment ``n`` holds the base-only rows (``idx < 0`` or ``>= n``)."""

    order: torch.Tensor  # [M] int64
    starts: torch.Tensor  # [n + 1]
    counts: torch.Tensor  # [n + 1]
    n: int


def segments(idx: torch.Tensor, n: int) -> Segments:
    rows = idx.reshape(-1)
    key = torch.where((rows < 0) | (rows >= n), n, rows)
    counts = torch.bincount(key, minlength=n + 1)
    return Segments(torch.argsort(key, stable=True), torch.cumsum(counts, 0) - counts, counts, n)


def shrink(x2: torch.Tensor, c: torch.Tensor, s: torch.Tensor, gate=None, seg: Segments | None = None) -> torch.Tensor:
    """``s·(x2 @ c) ⊙ gate`` in fp32. ``c``: ``[K, R]`` (any strides), or ``[n, K, R]`` and ``s [n]``
    with ``seg`` (rows of segment ``n``, base-only, are left unwritten)."""
    M, K = x2.shape
    R = c.shape[-1]
    h = torch.empty((M, R), device=x2.device, dtype=torch.float32)
    sa, sk, sr = c.stride() if seg is not None else (0, *c.stride())
    g = gate if gate is not None else h
    n = seg.n if seg is not None else 1
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), n)  # noqa: E731
    order, starts, counts = seg[:3] if seg is not None else (h, h, h)
    wrap_triton(_shrink_kernel)[grid](
        x2, c, g, s, order, starts, counts, h,
        M, K, R,
        x2.stride(0), x2.stride(1), sa, sk, sr, g.stride(0), g.stride(1), h.stride(0), h.stride(1),
        HAS_GATE=gate is not None, SEGMENTED=seg is not None, BLOCK_R=_block_r(R),
    )  # fmt: skip
    return h


def fused(
    x2: torch.Tensor,
    w: torch.Tensor,
    bias=None,
    h=None,
    bt=None,
    seg: Segments | None = None,
    out_dtype=None,
    kidx=None,
) -> torch.Tensor:
    """``x2 @ w + h @ bt + bias`` with one accumulator. ``w``: ``[K, N]`` (any strides); ``bt``:
    ``[R, N]``, or ``[n, R, N]`` with ``seg`` (row t gets its adapter's ``bt``); ``h`` fp32 ``[M, R]``.
    With ``kidx [k]`` the product is ``x2[:, kidx] @ w[kidx, :]``."""
    M, K = x2.shape if kidx is None else (x2.shape[0], kidx.numel())
    N = w.shape[1]
    y = torch.empty((M, N), device=x2.device, dtype=out_dtype or x2.dtype)
    adapter = h is not None
    R = h.shape[1] if adapter else 0
    h_ = h if adapter else y
    ba, br, bn = (bt.stride() if seg is not None else (0, *bt.stride())) if adapter else (0, 0, 0)
    n_seg = seg.n + 1 if seg is not None else 1
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]), n_seg)  # noqa: E731
    order, starts, counts = seg[:3] if seg is not None else (y, y, y)
    wrap_triton(_fused_kernel)[grid](
        x2, w, bias if bias is not None else y, h_, bt if adapter else y, order, starts, counts,
        kidx if kidx is not None else y, y,
        M, N, K, R, seg.n if seg is not None else 0,
        x2.stride(0), x2.stride(1), w.stride(0), w.stride(1), h_.stride(0), h_.stride(1),
        ba, br, bn, y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, HAS_ADAPTER=adapter, SEGMENTED=seg is not None,
        DOT_FP32=x2.dtype == torch.float32 or x2.dtype != w.dtype, GATHER_K=kidx is not None, BLOCK_R=_block_r(R),
    )  # fmt: skip
    return y


# ---- op-level entry points: same contracts as the composites in lorafx.kernels.ops --------------


def _flat(t):
    return None if t is None else t.reshape(-1, t.shape[-1])


def _scale(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return s.to(device=like.device, dtype=torch.float32).contiguous()


def lora_linear(x, W, b, A, B, s, g=None, x_in=None) -> torch.Tensor:
    """Forward of ``lorafx::lora_linear``: shrink, then fused GEMM + expand (one output write)."""
    x2 = _flat(x)
    xin2 = x2 if x_in is None else _flat(x_in)
    h = shrink(xin2, A.t(), _scale(s, x), _flat(g))
    return fused(x2, W.t(), b, h, B.t(), out_dtype=x.dtype).reshape(*x.shape[:-1], W.shape[0])


def lora_expand(x, W, b, h, B, s, g=None) -> torch.Tensor:
    """Forward of ``lorafx::lora_expand``; the gate and scale are applied to ``h`` ([T, R], cheap)."""
    hs = _flat(h).float() * _scale(s, h)
    if g is not None:
        hs = hs * _flat(g).float()
    return fused(_flat(x), W.t(), b, hs, B.t(), out_dtype=x.dtype).reshape(*x.shape[:-1], W.shape[0])


def lora_linear_backward(dy, x, W, A, B, s, g, x_in, need_g: bool):
    """``(dx, d_xin, dA, dB, dg)``: ``u = s·(dY B)`` by the shrink kernel, then
    ``dX = dY W + (u ⊙ g) A`` in one accumulator; dA, dB through the same GEMM kernel."""
    dy2, x2 = _flat(dy), _flat(x)
    xin2 = x2 if x_in is None else _flat(x_in)
    s32 = _scale(s, dy)
    g2 = _flat(g)
    u = shrink(dy2, B, s32)
    dh = u if g2 is None else u * g2.float()
    if x_in is None:
        dx, d_xin = fused(dy2, W, None, dh, A, out_dtype=x.dtype), x.new_empty(0)
    else:
        dx, d_xin = fused(dy2, W, out_dtype=x.dtype), fused(dh, A, out_dtype=x_in.dtype).reshape(x_in.shape)
    dA = fused(dh.t(), xin2, out_dtype=A.dtype)
    dB = fused(dy2.t(), shrink(xin2, A.t(), s32, g2), out_dtype=B.dtype)
    dg = (
        (u * shrink(xin2, A.t(), torch.ones_like(s32))).to(g.dtype).reshape(g.shape)
        if need_g and g is not None
        else dy.new_empty(0)
    )
    return dx.reshape(x.shape), d_xin, dA, dB, dg


def lora_linear_multi(x, W, b, A, B, s, idx) -> torch.Tensor:
    """Forward of ``lorafx::lora_linear_multi``: rows grouped by adapter (:func:`segments`), one
    adapter per tile in both kernels."""
    x2, seg = _flat(x), segments(idx, A.shape[0])
    h = shrink(x2, A.transpose(1, 2), _scale(s, x), seg=seg)
    return fused(x2, W.t(), b, h, B.transpose(1, 2), seg=seg, out_dtype=x.dtype).reshape(*x.shape[:-1], W.shape[0])


def lora_linear_multi_dx(dy, W, A, B, s, idx) -> torch.Tensor:
    """``dX = dY W + (s[i]·dY B[i]) A[i]`` per row, one accumulator (``[T, d_in]``, dY's dtype)."""
    dy2, seg = _flat(dy), segments(idx, A.shape[0])
    u = shrink(dy2, B, _scale(s, dy), seg=seg)
    return fused(dy2, W, None, u, A, seg=seg)


def lora_linear_multi_backward(dy, x, W, A, B, s, idx, need_dx: bool):
    """``(dx, dA, dB)``: dx by the segmented kernels in one accumulator; dA, dB per adapter over its own
    rows (``[R, d_in]``/``[d_out, R]`` GEMMs, small) as in the composite."""
    from lorafx.kernels.ops import _multi_backward_ref

    _, dA, dB = _multi_backward_ref(dy, x, W, A, B, s, idx, False)
    dx = lora_linear_multi_dx(dy, W, A, B, s, idx).to(x.dtype).reshape(x.shape) if need_dx else x.new_empty(0)
    return dx, dA, dB


def celora_input_grad(G, W, B0, A0, index) -> torch.Tensor:
    """CE-LoRA's ∂x, ``G[:, I] W[I, :] + (G B0ᶜ) A0``: the shrink kernel for ``u = G B0ᶜ`` (fp32
    ``[T, r0]``), then one accumulator for the gathered GEMM over the k kept channels and ``u A0``."""
    u = shrink(G, B0.index_fill(0, index, 0), torch.ones((), device=G.device))
    return fused(G, W, None, u, A0, kidx=index.contiguous(), out_dtype=G.dtype)


@triton_op("lorafx::lora_linear_triton", mutates_args=())
def lora_linear_triton(
    x: torch.Tensor,
    W: torch.Tensor,
    b: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    s: torch.Tensor,
    g: torch.Tensor | None = None,
    x_in: torch.Tensor | None = None,
) -> torch.Tensor:
    """``lorafx::lora_linear`` as a ``triton_op``: inductor traces into the launches (``wrap_triton``)
    and sees both kernels, instead of one opaque call. Used on CUDA by ``kernels="triton"``."""
    return lora_linear(x, W, b, A, B, s, g, x_in)


def register_cuda_kernels(ops_module) -> None:
    """Register these launchers as the CUDA kernels of the ``lorafx::`` ops and give the traceable
    ``lorafx::lora_linear_triton`` the autograd of ``lorafx::lora_linear`` (called by ``ops``)."""
    ops_module.lora_linear.register_kernel("cuda")(lora_linear)
    ops_module.lora_expand.register_kernel("cuda")(lora_expand)
    ops_module.lora_linear_multi.register_kernel("cuda")(lora_linear_multi)
    ops_module.lora_linear_backward.register_kernel("cuda")(lora_linear_backward)
    ops_module.lora_linear_multi_backward.register_kernel("cuda")(lora_linear_multi_backward)
    ops_module.celora_input_grad.register_kernel("cuda")(celora_input_grad)
    lora_linear_triton.register_autograd(ops_module._backward_linear, setup_context=ops_module._setup_linear)
    ops_module.TRITON_OP = lora_linear_triton
