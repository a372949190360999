"""``lorafx::lora_linear_multi`` (a batch that mixes adapters) and ``lorafx::lora_linear_multi_backward``.

``lora_linear_multi(x, W, b, A, B, s, idx)``: row ``t`` gets adapter ``idx[t]``, as in Punica/S-LoRA:
``A [n, R, d_in]``, ``B [n, d_out, R]`` and ``s [n]`` stacked, ``idx [T]`` (< 0: base only). The CPU
(and default) kernel is segmented: for each adapter, :func:`lorafx.canonical.shrink` and
:func:`~lorafx.canonical.expand` over its own rows only. On CUDA with triton both ops get the
segmented Triton kernels (rows grouped by adapter on the device, one adapter per tile).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lorafx import canonical
from lorafx.kernels._common import base_grads, flat, needs, out_like, save_all_but_bias, triton_on_cuda


@torch.library.custom_op("lorafx::lora_linear_multi", mutates_args=())
def lora_linear_multi(x: Tensor, W: Tensor, b: Tensor | None, A: Tensor, B: Tensor, s: Tensor, idx: Tensor) -> Tensor:
    """Row ``t`` gets adapter ``idx[t]``: ``x Wᵀ + b + s[i]·(x A[i]ᵀ) B[i]ᵀ``; ``idx`` < 0 means base only."""
    return multi_forward_composite(x, W, b, A, B, s, idx)


def multi_forward_composite(x: Tensor, W: Tensor, b: Tensor | None, A: Tensor, B: Tensor, s: Tensor, idx: Tensor):
    """The CPU kernel of :func:`lora_linear_multi`: one shrink/expand pair per adapter, over its rows.

    Each segment's rows are gathered, expanded by the canonical evaluator and written back
    (``index_copy_``; rows of one segment are distinct): per adapter that is one extra
    ``[rows, d_out]`` gather next to the ``[rows, d_out]`` delta the expand makes anyway.
    """
    y = F.linear(x, W, b)
    x2, y2, rows = flat(x), y.view(-1, y.shape[-1]), idx.reshape(-1)
    for i in range(A.shape[0]):
        sel = (rows == i).nonzero().squeeze(1)
        if sel.numel():
            h = canonical.shrink(x2.index_select(0, sel), A[i])
            y2.index_copy_(0, sel, canonical.expand(y2.index_select(0, sel), h, B[i], s[i]))
    return y


@lora_linear_multi.register_fake
def _(x, W, b, A, B, s, idx):
    return out_like(x, W)


@torch.library.custom_op("lorafx::lora_linear_multi_backward", mutates_args=())
def lora_linear_multi_backward(
    dy: Tensor, x: Tensor, W: Tensor, A: Tensor, B: Tensor, s: Tensor, idx: Tensor, need_dx: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dA, dB)`` of :func:`lora_linear_multi`; ``dx`` is empty unless ``need_dx``.

    An op of its own so that the per-adapter row counts (data-dependent shapes) stay inside it, where
    AOT autograd never traces them: each adapter's grads cost its own rows only, as in the forward."""
    return multi_backward_composite(dy, x, W, A, B, s, idx, need_dx)


def multi_backward_composite(dy, x, W, A, B, s, idx, need_dx: bool):
    """The CPU kernel of :func:`lora_linear_multi_backward` (and dA, dB on CUDA too: per adapter they
    are ``[R, d_in]``/``[d_out, R]`` GEMMs over its own rows, small next to dx)."""
    dy2, x2, rows = flat(dy), flat(x), idx.reshape(-1)
    dx2 = (dy2.to(W.dtype) @ W).to(x.dtype) if need_dx else None
    dA, dB = torch.zeros_like(A), torch.zeros_like(B)
    for i in range(A.shape[0]):
        sel = (rows == i).nonzero().squeeze(1)
        if not sel.numel():
            continue
        xs, dys = x2.index_select(0, sel).to(A.dtype), dy2.index_select(0, sel).to(B.dtype)
        h = canonical.shrink(xs, A[i])
        dh = (dys @ B[i]) * s[i].to(A.dtype)
        dA[i] = dh.t() @ xs
        dB[i] = (dys.t() @ h) * s[i].to(B.dtype)
        if dx2 is not None:
            dx2.index_add_(0, sel, (dh @ A[i]).to(x.dtype))
    dx = x.new_empty(0) if dx2 is None else dx2.reshape(x.shape)
    return dx, dA, dB


@lora_linear_multi_backward.register_fake
def _(dy, x, W, A, B, s, idx, need_dx):
    return (torch.empty_like(x) if need_dx else x.new_empty(0)), torch.empty_like(A), torch.empty_like(B)


def _backward(ctx, dy):
    x, W, A, B, s, idx = ctx.saved_tensors
    n = needs(ctx)
    dx = dA = dB = None
    if n[0] or n[3] or n[4]:  # frozen adapters and an input without grad (serving): base grads only
        dx, dA, dB = lora_linear_multi_backward(dy, x, W, A, B, s, idx, n[0])
    dW, db = base_grads(flat(dy), flat(x), W, n[1], n[2] and ctx.has_b)
    return dx if n[0] else None, dW, db, dA if n[3] else None, dB if n[4] else None, None, None


lora_linear_multi.register_autograd(_backward, setup_context=save_all_but_bias)


def _backward_on_cuda(dy, x, W, A, B, s, idx, need_dx: bool):
    """CUDA kernel of the backward op: dx by the segmented Triton kernels (one accumulator for
    ``dY W + (s[i]·dY B[i]) A[i]``), dA and dB per adapter as in the composite."""
    from lorafx.kernels._triton import launchers

    _, dA, dB = multi_backward_composite(dy, x, W, A, B, s, idx, False)
    if not need_dx:
        return x.new_empty(0), dA, dB
    return launchers.lora_linear_multi_dx(dy, W, A, B, s, idx).to(x.dtype).reshape(x.shape), dA, dB


def register_triton() -> None:
    """Register the segmented Triton kernels for CUDA (runs at import on CUDA + triton)."""
    from lorafx.kernels._triton import launchers

    lora_linear_multi.register_kernel("cuda")(launchers.lora_linear_multi)
    lora_linear_multi_backward.register_kernel("cuda")(_backward_on_cuda)


if triton_on_cuda():
    register_triton()
