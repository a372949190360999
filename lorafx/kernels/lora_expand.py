"""``lorafx::lora_expand``: the second half of the LoRAFusion split, on an already computed shrink.

``lora_expand(x, W, b, h, B, s, g)`` = ``x Wᵀ + b + s·(h ⊙ g) Bᵀ`` with ``h = x_in Aᵀ`` given
(``[..., R]``). The sibling fusion pass (:mod:`lorafx.passes.fuse_shrinks`) computes the shrinks of
q/k/v in one matmul and calls this op once per site. The CPU (and default) kernel is
:func:`lorafx.canonical.expand`; on CUDA with triton the fused GEMM + expand kernel is registered.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lorafx import canonical
from lorafx.kernels import _common
from lorafx.kernels._common import adapter_grads, base_grads, flat, needs, out_like, save_all_but_bias, triton_on_cuda


@torch.library.custom_op("lorafx::lora_expand", mutates_args=())
def lora_expand(
    x: Tensor, W: Tensor, b: Tensor | None, h: Tensor, B: Tensor, s: Tensor, g: Tensor | None = None
) -> Tensor:
    """``x Wᵀ + b + s·(h ⊙ g) Bᵀ`` with a precomputed shrink ``h [..., R]``."""
    return lora_expand_composite(x, W, b, h, B, s, g)


def lora_expand_composite(x, W, b, h, B, s, g=None) -> Tensor:
    """The CPU (and default) kernel of :func:`lora_expand`: the canonical expand."""
    return canonical.expand(F.linear(x, W, b), h if g is None else h * g, B, s)


@lora_expand.register_fake
def _(x, W, b, h, B, s, g=None):
    return out_like(x, W)


def _backward(ctx, dy):
    x, W, h, B, s, g = ctx.saved_tensors
    n = needs(ctx)
    dy2, x2 = flat(dy), flat(x)
    dh, dB, ds, dg = adapter_grads(dy2, flat(h), B, s, flat(g), {"B": n[4], "s": n[5], "g": n[6]})
    dx = (dy2.to(W.dtype) @ W).to(x.dtype).reshape(x.shape) if n[0] else None
    dW, db = base_grads(dy2, x2, W, n[1], n[2] and ctx.has_b)
    dh = dh.to(h.dtype).reshape(h.shape) if n[3] else None
    dg = None if dg is None else dg.reshape(g.shape)
    return dx, dW, db, dh, dB, ds, dg


lora_expand.register_autograd(_backward, setup_context=save_all_but_bias)


def register_triton() -> None:
    """Register the fused GEMM + expand launcher as the CUDA kernel (runs at import on CUDA + triton)."""
    lora_expand.register_kernel("cuda")(cuda_kernel)


def cuda_kernel(x, W, b, h, B, s, g=None) -> Tensor:
    """The CUDA kernel of :func:`lora_expand`: the fused launcher up to ``MAX_KERNEL_RANK``, the
    composite above (the kernels spill there)."""
    if h.shape[-1] > _common.MAX_KERNEL_RANK:
        return lora_expand_composite(x, W, b, h, B, s, g)
    from lorafx.kernels._triton import launchers

    return launchers.lora_expand(x, W, b, h, B, s, g)


if triton_on_cuda():
    register_triton()
