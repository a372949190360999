"""``lorafx::lora_linear`` and its backward op ``lorafx::lora_linear_backward``.

``lora_linear(x, W, b, A, B, s, g, x_in)`` = ``x Wᵀ + b + s·((x_in Aᵀ) ⊙ g) Bᵀ``: one adapted site in
canonical form (:mod:`lorafx.canonical`). ``x_in`` (the adapter-path input after LoRA dropout)
defaults to ``x``, ``g`` to no gate; ``s`` is a ``[]`` tensor so that torch.compile never guards on
its value. The CPU (and default) kernel is :func:`lorafx.canonical.shrink` then
:func:`~lorafx.canonical.expand`, the one evaluator, in the cheap order (never a dense ΔW). On CUDA
with triton installed the Triton kernels of ``lorafx.kernels._triton`` are registered for both ops,
and ``lorafx::lora_linear_triton`` (a ``triton_op``: inductor sees its two launches) gets this op's
autograd. ``W`` and ``b`` get gradients only when they require them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lorafx import canonical
from lorafx.kernels._common import (
    MAX_KERNEL_RANK,
    adapter_grads,
    base_grads,
    flat,
    needs,
    out_like,
    save_all_but_bias,
    triton_on_cuda,
)


@torch.library.custom_op("lorafx::lora_linear", mutates_args=())
def lora_linear(
    x: Tensor,
    W: Tensor,
    b: Tensor | None,
    A: Tensor,
    B: Tensor,
    s: Tensor,
    g: Tensor | None = None,
    x_in: Tensor | None = None,
) -> Tensor:
    """``x Wᵀ + b + s·((x_in Aᵀ) ⊙ g) Bᵀ`` (``x_in`` defaults to ``x``); see the module docstring."""
    return lora_linear_composite(x, W, b, A, B, s, g, x_in)


def lora_linear_composite(x, W, b, A, B, s, g=None, x_in=None) -> Tensor:
    """The CPU (and default) kernel of :func:`lora_linear`: the canonical shrink, then expand."""
    h = canonical.shrink(x if x_in is None else x_in, A, g)
    return canonical.expand(torch.nn.functional.linear(x, W, b), h, B, s)


@lora_linear.register_fake
def _(x, W, b, A, B, s, g=None, x_in=None):
    return out_like(x, W)


@torch.library.custom_op("lorafx::lora_linear_backward", mutates_args=())
def lora_linear_backward(
    dy: Tensor,
    x: Tensor,
    W: Tensor,
    A: Tensor,
    B: Tensor,
    s: Tensor,
    g: Tensor | None,
    x_in: Tensor | None,
    need_g: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dx, d_xin, dA, dB, dg)`` of :func:`lora_linear`; ``d_xin``/``dg`` are empty when unused.

    An op of its own so that its CUDA kernel (the fused Triton backward) survives AOT tracing.
    """
    return lora_linear_backward_composite(dy, x, W, A, B, s, g, x_in, need_g)


def lora_linear_backward_composite(dy, x, W, A, B, s, g, x_in, need_g: bool):
    """The CPU (and default) kernel of :func:`lora_linear_backward`, in plain PyTorch."""
    dy2, x2 = flat(dy), flat(x)
    xin2 = x2 if x_in is None else flat(x_in)
    want = {"B": True, "s": False, "g": need_g and g is not None}
    dh, dB, _, dg = adapter_grads(dy2, canonical.shrink(xin2, A), B, s, flat(g), want)
    d_xin = (dh @ A).to(xin2.dtype)
    dx = (dy2.to(W.dtype) @ W).to(x.dtype)
    if x_in is None:
        dx, d_xin = dx + d_xin.to(x.dtype), x.new_empty(0)
    else:
        d_xin = d_xin.reshape(x_in.shape)
    dA = (dh.t() @ xin2.to(A.dtype)).to(A.dtype)
    dg = dy.new_empty(0) if dg is None else dg.to(g.dtype).reshape(g.shape)
    return dx.reshape(x.shape), d_xin, dA, dB.to(B.dtype), dg


@lora_linear_backward.register_fake
def _(dy, x, W, A, B, s, g, x_in, need_g):
    d_xin = x.new_empty(0) if x_in is None else torch.empty_like(x_in)
    dg = dy.new_empty(0) if not (need_g and g is not None) else torch.empty_like(g)
    return torch.empty_like(x), d_xin, torch.empty_like(A), torch.empty_like(B), dg


def _backward(ctx, dy):
    x, W, A, B, s, g, x_in = ctx.saved_tensors
    n = needs(ctx)
    dx, d_xin, dA, dB, dg = lora_linear_backward(dy, x, W, A, B, s, g, x_in, n[6])
    dy2, x2 = flat(dy), flat(x)
    dW, db = base_grads(dy2, x2, W, n[1], n[2] and ctx.has_b)
    ds = None
    if n[5]:  # a trainable scale: rare, plain PyTorch
        hg = canonical.shrink(x2 if x_in is None else flat(x_in), A, flat(g))
        ds = ((dy2.to(B.dtype) @ B) * hg).sum().reshape(s.shape).to(s.dtype)
    return (
        dx if n[0] else None,
        dW,
        db,
        dA if n[3] else None,
        dB if n[4] else None,
        ds,
        dg if n[6] and g is not None else None,
        d_xin if x_in is not None and n[7] else None,
    )


lora_linear.register_autograd(_backward, setup_context=save_all_but_bias)

_TRITON_TWIN = []  # [lorafx::lora_linear_triton] once register_triton() has run


def register_triton():
    """Register the Triton kernels as the CUDA kernels of both ops and give the traceable twin
    ``lorafx::lora_linear_triton`` this op's autograd; returns the twin. Runs at import when
    :func:`~lorafx.kernels._common.triton_on_cuda`; idempotent (the tests call it on CPU, where the
    launchers run under the Triton interpreter)."""
    if not _TRITON_TWIN:
        from lorafx.kernels._triton import launchers

        lora_linear.register_kernel("cuda")(cuda_forward)
        lora_linear_backward.register_kernel("cuda")(cuda_backward)
        launchers.lora_linear_triton.register_autograd(_backward, setup_context=save_all_but_bias)
        _TRITON_TWIN.append(launchers.lora_linear_triton)
    return _TRITON_TWIN[0]


def cuda_forward(x, W, b, A, B, s, g=None, x_in=None) -> Tensor:
    """The CUDA kernel of :func:`lora_linear`: the Triton launcher up to ``MAX_KERNEL_RANK``, the
    composite above (the kernels spill there)."""
    if A.shape[0] > MAX_KERNEL_RANK:
        return lora_linear_composite(x, W, b, A, B, s, g, x_in)
    from lorafx.kernels._triton import launchers

    return launchers.lora_linear(x, W, b, A, B, s, g, x_in)


def cuda_backward(dy, x, W, A, B, s, g, x_in, need_g: bool):
    """The CUDA kernel of :func:`lora_linear_backward`, by rank as :func:`cuda_forward`."""
    if A.shape[0] > MAX_KERNEL_RANK:
        return lora_linear_backward_composite(dy, x, W, A, B, s, g, x_in, need_g)
    from lorafx.kernels._triton import launchers

    return launchers.lora_linear_backward(dy, x, W, A, B, s, g, x_in, need_g)


def cuda_op(rank: int = 1):
    """The op a CUDA site of adapter rank ``rank`` calls: the ``triton_op`` twin when registered and
    the rank is within ``MAX_KERNEL_RANK`` (the default, 1, asks which op the kernels' sites call),
    else :func:`lora_linear` (whose CUDA kernel is the composite above that rank)."""
    return _TRITON_TWIN[0] if _TRITON_TWIN and rank <= MAX_KERNEL_RANK else lora_linear


if triton_on_cuda():
    register_triton()
