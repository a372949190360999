"""Helpers shared by the ``lorafx::`` op files: flattening, the backward formulas of the expand, and
the test for registering the Triton kernels. Private: the op files are the interface."""

from __future__ import annotations

import functools
import importlib

import torch
from torch import Tensor


@functools.cache
def triton_on_cuda() -> bool:
    """True when a CUDA device is visible and the Triton launchers (``lorafx.kernels._triton``) import.

    Each op file calls this at import and, when True, registers its Triton kernels for CUDA. Checking
    costs no CUDA context (``is_available`` does not create one); it imports triton only on a machine
    that can use it, so ``import lorafx.kernels`` stays triton-free on CPU.
    """
    if not torch.cuda.is_available():
        return False
    try:
        importlib.import_module("lorafx.kernels._triton.launchers")
    except ImportError:  # no triton: the composites serve every device
        return False
    return True


# The widest rank the Triton kernels take. Above it (rank block 256) they spill even at their smallest
# tile: ``benchmarks/kernels_static.py`` at R = 200 and 256 found 154 of 216 specializations spilling,
# 48 B to 17 KB (the fused kernel's 16×32×32 fp32 tile 56-60 B, the shrink's 16×32 at R = 200 588-868 B).
# There each op's CUDA kernel runs its composite (cuBLAS GEMMs) instead.
MAX_KERNEL_RANK = 128


def out_like(x: Tensor, W: Tensor) -> Tensor:
    """Fake output of a linear site: ``x``'s leading dims, ``W``'s rows."""
    return x.new_empty((*x.shape[:-1], W.shape[0]))


def save_all_but_bias(ctx, inputs, output) -> None:
    """``setup_context`` of the linear ops, whose inputs start ``(x, W, b, ...)``: save every input but
    the bias, of which the backward only needs to know that it exists (``ctx.has_b``)."""
    ctx.save_for_backward(*inputs[:2], *inputs[3:])
    ctx.has_b = inputs[2] is not None


def needs(ctx) -> tuple[bool, ...]:
    """``ctx.needs_input_grad`` padded with False: defaults left out of a call are not listed (up to 8)."""
    return tuple(ctx.needs_input_grad) + (False,) * 8


def flat(t: Tensor | None) -> Tensor | None:
    """``[..., n]`` -> ``[T, n]`` (None stays None)."""
    return None if t is None else t.reshape(-1, t.shape[-1])


def base_grads(dy2: Tensor, x2: Tensor, W: Tensor, need_w: bool, need_b: bool):
    """``(dW, db)`` of the frozen ``x Wᵀ + b`` (each None unless asked for: frozen weights cost nothing)."""
    dW = dy2.t().to(W.dtype) @ x2.to(W.dtype) if need_w else None
    db = dy2.sum(0).to(W.dtype) if need_b else None
    return dW, db


def adapter_grads(dy2: Tensor, h: Tensor, B: Tensor, s: Tensor, g: Tensor | None, want: dict):
    """Grads of ``s·(h ⊙ g) Bᵀ`` w.r.t. h, B, s, g for 2-D ``[T, ·]`` operands; ``want`` names which of
    B, s, g to compute (``dh`` is always returned: every caller needs it)."""
    u = dy2.to(B.dtype) @ B  # [T, R]
    hg = h if g is None else h * g
    v = u * s.to(u.dtype)
    dh = v if g is None else v * g
    dB = (dy2.t().to(hg.dtype) @ hg) * s.to(hg.dtype) if want["B"] else None
    ds = (u * hg).sum().reshape(s.shape).to(s.dtype) if want["s"] else None
    dg = v * h if want["g"] else None
    return dh, dB, ds, dg
