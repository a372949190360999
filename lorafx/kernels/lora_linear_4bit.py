"""``lorafx::lora_linear_4bit``: one adapted site whose base weight is bitsandbytes 4-bit (NF4/FP4).

``lora_linear_4bit(x, Wq, absmax, code, absmax2, code2, offset, N, blocksize, blocksize2, b, A, B, s,
g, x_in)`` = ``x·dequant(Wq)ᵀ + b + s·((x_in Aᵀ) ⊙ g) Bᵀ``, with ``Wq`` in bitsandbytes' packed layout
(:mod:`lorafx.kernels._triton.lora_4bit` describes it; ``absmax2``/``code2``/``offset`` are the
double-quant state, all None without it; ``offset`` is bitsandbytes' 0-dim tensor, passed as a tensor
so that a compiled graph neither syncs on it nor guards on its value). The CPU (and default) kernel dequantizes with
:func:`dequantize_4bit` and runs the canonical composite; on CUDA with triton installed the kernel is
the fused Triton one (decode, GEMM and adapter expand in one accumulator, the dense weight never
written). The backward is ``lorafx::lora_linear_4bit_backward``: on CPU ``W`` dequantized once, then
``lorafx::lora_linear_backward``; on CUDA ``dx = dy·dequant(Wq) + (s·(dy B) ⊙ g) A`` through the same
kernel with W decoded transposed, so training never materialises the dense weight either (bitsandbytes'
own backward dequantizes it). The packed base gets no gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lorafx import canonical
from lorafx.kernels import lora_linear as _lora_linear
from lorafx.kernels._common import MAX_KERNEL_RANK, flat, needs, triton_on_cuda


def dequantize_4bit(
    qweight: Tensor,
    absmax: Tensor,
    code: Tensor,
    absmax2: Tensor | None,
    code2: Tensor | None,
    offset: Tensor | None,
    N: int,
    K: int,
    blocksize: int,
    blocksize2: int,
) -> Tensor:
    """``dequant(Wq)`` ``[N, K]`` in fp32 from bitsandbytes' packed 4-bit layout (see the module
    docstring): codes high nibble first, ``code[q] · absmax[i // blocksize]``, the absmax itself
    ``code2[absmax] · absmax2[j // blocksize2] + offset`` when double-quantized."""
    q = qweight.reshape(-1).view(torch.uint8)
    codes = torch.stack([q >> 4, q & 0xF], dim=-1).reshape(-1)[: N * K].long()
    scale = absmax.float()
    if absmax2 is not None:
        j = torch.arange(absmax.numel(), device=absmax.device)
        scale = code2.float()[absmax.reshape(-1).long()] * absmax2.float()[j // blocksize2] + offset.float()
    i = torch.arange(N * K, device=qweight.device)
    return (code.float()[codes] * scale.reshape(-1)[i // blocksize]).reshape(N, K)


@torch.library.custom_op("lorafx::lora_linear_4bit", mutates_args=())
def lora_linear_4bit(
    x: Tensor,
    qweight: Tensor,
    absmax: Tensor,
    code: Tensor,
    absmax2: Tensor | None,
    code2: Tensor | None,
    offset: Tensor | None,
    N: int,
    blocksize: int,
    blocksize2: int,
    b: Tensor | None,
    A: Tensor,
    B: Tensor,
    s: Tensor,
    g: Tensor | None = None,
    x_in: Tensor | None = None,
) -> Tensor:
    """``x·dequant(Wq)ᵀ + b + s·((x_in Aᵀ) ⊙ g) Bᵀ``; see the module docstring."""
    return _composite_forward(
        x, qweight, absmax, code, absmax2, code2, offset, N, blocksize, blocksize2, b, A, B, s, g, x_in
    )


def _composite_forward(x, qweight, absmax, code, absmax2, code2, offset, N, blocksize, blocksize2, b, A, B, s, g=None,
                       x_in=None) -> Tensor:  # fmt: skip
    """The CPU (and default) kernel of :func:`lora_linear_4bit`: W dequantized, then the canonical pair."""
    W = dequantize_4bit(qweight, absmax, code, absmax2, code2, offset, N, x.shape[-1], blocksize, blocksize2)
    h = canonical.shrink(x if x_in is None else x_in, A, g)
    return canonical.expand(F.linear(x, W.to(x.dtype), b), h, B, s)


@lora_linear_4bit.register_fake
def _(x, qweight, absmax, code, absmax2, code2, offset, N, blocksize, blocksize2, b, A, B, s, g=None, x_in=None):
    return x.new_empty((*x.shape[:-1], N))


@torch.library.custom_op("lorafx::lora_linear_4bit_backward", mutates_args=())
def lora_linear_4bit_backward(
    dy: Tensor,
    x: Tensor,
    qweight: Tensor,
    absmax: Tensor,
    code: Tensor,
    absmax2: Tensor | None,
    code2: Tensor | None,
    offset: Tensor | None,
    N: int,
    blocksize: int,
    blocksize2: int,
    A: Tensor,
    B: Tensor,
    s: Tensor,
    g: Tensor | None,
    x_in: Tensor | None,
    need_g: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dx, d_xin, dA, dB, dg)`` of :func:`lora_linear_4bit` (as ``lorafx::lora_linear_backward``).
    CPU: W dequantized, then that op. CUDA: ``dx = dy·dequant(Wq) + (s·(dy B) ⊙ g) A`` decoded tile by
    tile in one accumulator (:func:`triton_backward`), W never dense."""
    return _composite_backward(dy, x, qweight, absmax, code, absmax2, code2, offset, N, blocksize, blocksize2, A, B, s,
                               g, x_in, need_g)  # fmt: skip


def _composite_backward(dy, x, qweight, absmax, code, absmax2, code2, offset, N, blocksize, blocksize2, A, B, s, g,
                        x_in, need_g):  # fmt: skip
    """The CPU (and default) kernel of :func:`lora_linear_4bit_backward`: W dequantized, then that op."""
    W = dequantize_4bit(qweight, absmax, code, absmax2, code2, offset, N, x.shape[-1], blocksize, blocksize2)
    return _lora_linear.lora_linear_backward(dy, x, W.to(x.dtype), A, B, s, g, x_in, need_g)


@lora_linear_4bit_backward.register_fake
def _(dy, x, qweight, absmax, code, absmax2, code2, offset, N, blocksize, blocksize2, A, B, s, g, x_in, need_g):
    d_xin = x.new_empty(0) if x_in is None else torch.empty_like(x_in)
    dg = dy.new_empty(0) if not (need_g and g is not None) else torch.empty_like(g)
    return torch.empty_like(x), d_xin, torch.empty_like(A), torch.empty_like(B), dg


def _setup_context(ctx, inputs, output) -> None:
    x, qweight, absmax, code, absmax2, code2, offset, N, blocksize, blocksize2, b, A, B, s, g, x_in = inputs
    ctx.save_for_backward(x, qweight, absmax, code, absmax2, code2, offset, A, B, s, g, x_in)
    ctx.meta = (N, blocksize, blocksize2, b is not None)


def _backward(ctx, dy):
    x, qweight, absmax, code, absmax2, code2, offset, A, B, s, g, x_in = ctx.saved_tensors
    N, blocksize, blocksize2, has_b = ctx.meta
    n = needs(ctx)
    q = (qweight, absmax, code, absmax2, code2, offset, N, blocksize, blocksize2)
    dx, d_xin, dA, dB, dg = lora_linear_4bit_backward(dy, x, *q, A, B, s, g, x_in, n[14])
    db = flat(dy).sum(0) if n[10] and has_b else None
    ds = None
    if n[13]:  # a trainable scale: rare, plain PyTorch
        hg = canonical.shrink(flat(x if x_in is None else x_in), A, flat(g))
        ds = ((flat(dy).to(B.dtype) @ B) * hg).sum().reshape(s.shape).to(s.dtype)
    return (
        dx if n[0] else None,
        *(None,) * 9,
        db,
        dA if n[11] else None,
        dB if n[12] else None,
        ds,
        dg if n[14] and g is not None else None,
        d_xin if x_in is not None and n[15] else None,
    )


lora_linear_4bit.register_autograd(_backward, setup_context=_setup_context)


def triton_forward(x, qweight, absmax, code, absmax2, code2, offset, N, blocksize, blocksize2, b, A, B, s, g=None,
                   x_in=None) -> Tensor:  # fmt: skip
    """The forward through the fused Triton kernel (the op's CUDA kernel; the tests run it on CPU
    under the Triton interpreter): ``h = s·((x_in Aᵀ) ⊙ g)`` ``[T, R]`` in fp32 (small: R columns),
    then decode + GEMM + expand in one accumulator. Above ``MAX_KERNEL_RANK`` the composite."""
    if A.shape[0] > MAX_KERNEL_RANK:  # the kernel spills there (lorafx.kernels._common)
        return _composite_forward(x, qweight, absmax, code, absmax2, code2, offset, N, blocksize, blocksize2, b, A, B,
                                  s, g, x_in)  # fmt: skip
    from lorafx.kernels._triton.lora_4bit import lora_4bit

    x2 = flat(x)
    h = canonical.shrink(flat(x if x_in is None else x_in).float(), A.float(), None if g is None else flat(g).float())
    h = h * s.to(device=h.device, dtype=torch.float32)
    y = lora_4bit(
        x2,
        qweight.reshape(-1).view(torch.uint8),
        absmax.reshape(-1),
        code,
        None if absmax2 is None else absmax2.reshape(-1),
        code2,
        None if offset is None else offset.reshape(1).float(),
        N,
        blocksize,
        blocksize2,
        bias=None if b is None else b.contiguous(),
        h=h,
        bt=B.t(),
    )
    return y.reshape(*x.shape[:-1], N)


def triton_backward(dy, x, qweight, absmax, code, absmax2, code2, offset, N, blocksize, blocksize2, A, B, s, g,
                    x_in, need_g):  # fmt: skip
    """The backward through the fused kernel (the CUDA kernel of :func:`lora_linear_4bit_backward`):
    ``u = s·(dY B)`` and ``dh = u ⊙ g`` (``[T, R]``, fp32), then ``dX = dY·dequant(Wq) + dh A`` with W
    decoded tile by tile in one accumulator; ``dA``, ``dB``, ``dg`` are small GEMMs in fp32. Above
    ``MAX_KERNEL_RANK`` the composite."""
    if A.shape[0] > MAX_KERNEL_RANK:
        return _composite_backward(dy, x, qweight, absmax, code, absmax2, code2, offset, N, blocksize, blocksize2, A,
                                   B, s, g, x_in, need_g)  # fmt: skip
    from lorafx.kernels._triton.lora_4bit import lora_4bit

    dy2, x2 = flat(dy), flat(x)
    xin2 = (x2 if x_in is None else flat(x_in)).float()
    s32 = s.to(device=dy.device, dtype=torch.float32)
    u = (dy2.float() @ B.float()) * s32
    dh = u if g is None else u * flat(g).float()
    q = (qweight.reshape(-1).view(torch.uint8), absmax.reshape(-1), code)
    nested = (
        None if absmax2 is None else absmax2.reshape(-1),
        code2,
        None if offset is None else offset.reshape(1).float(),
    )
    K = x.shape[-1]
    if x_in is None:
        dx = lora_4bit(dy2, *q, *nested, N, blocksize, blocksize2, h=dh, bt=A, trans=True, kw=K)
        d_xin = x.new_empty(0)
    else:
        dx = lora_4bit(dy2, *q, *nested, N, blocksize, blocksize2, trans=True, kw=K)
        d_xin = (dh @ A.float()).to(x_in.dtype).reshape(x_in.shape)
    h = xin2 @ A.float().t()
    dA = (dh.t() @ xin2).to(A.dtype)
    dB = ((dy2.float().t() @ (h if g is None else h * flat(g).float())) * s32).to(B.dtype)
    dg = (u * h).to(g.dtype).reshape(g.shape) if need_g and g is not None else dy.new_empty(0)
    return dx.to(x.dtype).reshape(x.shape), d_xin, dA, dB, dg


_REGISTERED = []


def register_triton() -> None:
    """Register :func:`triton_forward` and :func:`triton_backward` as the CUDA kernels of the two ops.
    Runs at import when :func:`~lorafx.kernels._common.triton_on_cuda`; idempotent."""
    if not _REGISTERED:
        lora_linear_4bit.register_kernel("cuda")(triton_forward)
        lora_linear_4bit_backward.register_kernel("cuda")(triton_backward)
        _REGISTERED.append(True)


def has_fused_kernel(device: torch.device) -> bool:
    """True when this op runs the fused Triton kernel on ``device`` (CUDA with triton installed)."""
    return device.type == "cuda" and bool(_REGISTERED)


if triton_on_cuda():
    register_triton()
