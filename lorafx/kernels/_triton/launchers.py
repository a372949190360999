"""Launchers of the Triton kernels, and the op-level entry points registered for CUDA.

:func:`shrink` and :func:`fused` launch :mod:`~lorafx.kernels._triton.kernels`; the functions below
them have the same contracts as the composites of the op files (``lorafx.kernels.<op>``), which
register them as their CUDA kernels. The backward uses the same two kernels: ``u = s·(dY B)``
(shrink of dY against B), then ``dX = dY W + (u ⊙ g) A`` in one accumulator; ``dA = dhᵀ x_in`` and
``dB = dYᵀ h`` are plain GEMMs through the fused kernel without its adapter term.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
from torch.library import triton_op, wrap_triton

from lorafx.kernels._triton.kernels import fused_kernel, shrink_kernel


def _block_r(R: int) -> int:
    return max(16, triton.next_power_of_2(R))  # tl.dot needs every block dim >= 16


def _dot_fp32(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The kernels' DOT_FP32: 3xTF32 dots on upcast operands unless both are the same half type."""
    return a.dtype == torch.float32 or a.dtype != b.dtype


class Segments(NamedTuple):
    """Rows of a multi-adapter batch grouped by adapter, computed on the device (no host sync):
    ``order`` lists row ids adapter by adapter, segment ``a`` is ``order[starts[a] : starts[a] +
    counts[a]]``; segment ``n`` holds the base-only rows (``idx < 0`` or ``>= n``)."""

    order: torch.Tensor  # [M] int64
    starts: torch.Tensor  # [n + 1]
    counts: torch.Tensor  # [n + 1]
    n: int


def segments(idx: torch.Tensor, n: int) -> Segments:
    """Group the rows of ``idx`` (adapter per row) into :class:`Segments` of ``n`` adapters."""
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
    wrap_triton(shrink_kernel)[grid](
        x2, c, g, s, order, starts, counts, h,
        M, K, R,
        x2.stride(0), x2.stride(1), sa, sk, sr, g.stride(0), g.stride(1), h.stride(0), h.stride(1),
        HAS_GATE=gate is not None, SEGMENTED=seg is not None, DOT_FP32=_dot_fp32(x2, c), BLOCK_R=_block_r(R),
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
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), n_seg)  # noqa: E731
    order, starts, counts = seg[:3] if seg is not None else (y, y, y)
    wrap_triton(fused_kernel)[grid](
        x2, w, bias if bias is not None else y, h_, bt if adapter else y, order, starts, counts,
        kidx if kidx is not None else y, y,
        M, N, K, R, seg.n if seg is not None else 1,
        x2.stride(0), x2.stride(1), w.stride(0), w.stride(1), h_.stride(0), h_.stride(1),
        ba, br, bn, y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, HAS_ADAPTER=adapter, SEGMENTED=seg is not None,
        DOT_FP32=_dot_fp32(x2, w), GATHER_K=kidx is not None, BLOCK_R=_block_r(R),
    )  # fmt: skip
    return y


# ---- op-level entry points: same contracts as the composites in lorafx.kernels.<op> -------------


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
    and sees both kernels, instead of one opaque call. Called by the ``"ops"`` site implementation on
    CUDA; ``lorafx.kernels.lora_linear.register_triton`` gives it that op's autograd."""
    return lora_linear(x, W, b, A, B, s, g, x_in)
