"""The ``lorafx::`` op family, registered with ``torch.library``: fake kernels, autograd, CPU composite.

* ``lorafx::lora_linear(x, W, b, A, B, s, g, x_in)`` = ``x Wᵀ + b + s·((x_in Aᵀ) ⊙ g) Bᵀ``; ``x_in``
  (the adapter-path input after LoRA dropout) defaults to ``x``, ``g`` to no gate.
* ``lorafx::lora_expand(x, W, b, h, B, s, g)`` = ``x Wᵀ + b + s·(h ⊙ g) Bᵀ``: the second half of the
  LoRAFusion split, taking an already computed shrink ``h = x_in Aᵀ``. The sibling fusion pass
  (``lorafx.passes.fuse_shrinks``) computes the shrinks of q/k/v in one matmul and calls this.
* ``lorafx::lora_linear_multi(x, W, b, A, B, s, idx)``: a batch that mixes adapters (Punica/S-LoRA):
  ``A [n, R, d_in]``, ``B [n, d_out, R]``, ``s [n]`` stacked, ``idx [T]`` the adapter of each row.
* ``lorafx::celora_input_grad(G, W, B0, A0, index)``: CE-LoRA's approximate ∂x of the frozen
  ``x Wᵀ``, ``(G B0) A0 + G[:, I]·Res[I, :]`` (Double-LoRA + top-k AMM). It is stateless: choosing
  ``I`` (a step-scheduled side effect) stays in the CE-LoRA adapter, outside the op.

``s`` is a tensor (``[]`` or ``[n]``) so that torch.compile never guards on its value. The CPU (and
default) implementation is the plain-PyTorch composite in the cheap order (``x_in Aᵀ`` first, never a
dense ΔW); on CUDA with triton installed the Triton kernels of :mod:`lorafx.kernels.triton_lora`
are registered for the same ops. Backward formulas are written out once, below; ``W`` and ``b``
get gradients only when they require them (frozen base weights cost nothing).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import Tensor

# ---- forward composites (the CPU kernels and the test oracles) -------------------------------


def _expand_ref(x: Tensor, W: Tensor, b: Tensor | None, h: Tensor, B: Tensor, s: Tensor, g: Tensor | None) -> Tensor:
    hs = (h if g is None else h * g) * s.to(h.dtype)
    return F.linear(x, W, b) + F.linear(hs, B.to(hs.dtype)).to(x.dtype)


def _shrink(x_in: Tensor, A: Tensor) -> Tensor:
    return F.linear(x_in.to(A.dtype), A)


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
    return _expand_ref(x, W, b, _shrink(x if x_in is None else x_in, A), B, s, g)


@torch.library.custom_op("lorafx::lora_expand", mutates_args=())
def lora_expand(
    x: Tensor, W: Tensor, b: Tensor | None, h: Tensor, B: Tensor, s: Tensor, g: Tensor | None = None
) -> Tensor:
    """``x Wᵀ + b + s·(h ⊙ g) Bᵀ`` with a precomputed shrink ``h [..., R]``."""
    return _expand_ref(x, W, b, h, B, s, g)


@torch.library.custom_op("lorafx::lora_linear_multi", mutates_args=())
def lora_linear_multi(x: Tensor, W: Tensor, b: Tensor | None, A: Tensor, B: Tensor, s: Tensor, idx: Tensor) -> Tensor:
    """Row ``t`` gets adapter ``idx[t]``: ``x Wᵀ + b + s[i]·(x A[i]ᵀ) B[i]ᵀ``; ``idx`` < 0 means base only."""
    return _multi_forward_ref(x, W, b, A, B, s, idx)


def _multi_forward_ref(x, W, b, A, B, s, idx):
    y = F.linear(x, W, b)
    x2, y2, rows = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1]), idx.reshape(-1)
    for i in range(A.shape[0]):  # segmented: one pair of small matmuls per adapter, over its rows only
        sel = (rows == i).nonzero().squeeze(1)
        if sel.numel():
            h = _shrink(x2.index_select(0, sel), A[i]) * s[i].to(A.dtype)
            y2.index_add_(0, sel, F.linear(h, B[i]).to(y.dtype))
    return y


# ---- fake (meta) kernels: shapes only, for torch.compile and torch.export ---------------------


def _out_like(x: Tensor, W: Tensor) -> Tensor:
    return x.new_empty((*x.shape[:-1], W.shape[0]))


@lora_linear.register_fake
def _(x, W, b, A, B, s, g=None, x_in=None):
    return _out_like(x, W)


@lora_expand.register_fake
def _(x, W, b, h, B, s, g=None):
    return _out_like(x, W)


@lora_linear_multi.register_fake
def _(x, W, b, A, B, s, idx):
    return _out_like(x, W)


# ---- autograd ----------------------------------------------------------------------------------


def _needs(ctx) -> tuple[bool, ...]:
    return tuple(ctx.needs_input_grad) + (False,) * 8  # defaults left out of the call are not listed


def _flat(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.reshape(-1, t.shape[-1])


def _base_grads(dy2: Tensor, x2: Tensor, W: Tensor, need_w: bool, need_b: bool):
    dW = dy2.t().to(W.dtype) @ x2.to(W.dtype) if need_w else None
    db = dy2.sum(0).to(W.dtype) if need_b else None
    return dW, db


def _adapter_grads(dy2, h, B, s, g, needs):
    """Grads of ``s·(h ⊙ g) Bᵀ`` w.r.t. h, B, s, g (2-D ``[T, ·]`` operands)."""
    u = dy2.to(B.dtype) @ B  # [T, R]
    hg = h if g is None else h * g
    v = u * s.to(u.dtype)
    dh = v if g is None else v * g
    dB = (dy2.t().to(hg.dtype) @ hg) * s.to(hg.dtype) if needs["B"] else None
    ds = (u * hg).sum().reshape(s.shape).to(s.dtype) if needs["s"] else None
    dg = v * h if needs["g"] else None
    return dh, dB, ds, dg


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
    """``(dx, d_xin, dA, dB, dg)`` of ``lora_linear``; ``d_xin``/``dg`` are empty when unused.

    An op of its own so that its CUDA kernel (the fused Triton backward) survives AOT tracing.
    """
    dy2, x2 = _flat(dy), _flat(x)
    xin2 = x2 if x_in is None else _flat(x_in)
    dh, dB, _, dg = _adapter_grads(
        dy2, _shrink(xin2, A), B, s, _flat(g), {"B": True, "s": False, "g": need_g and g is not None}
    )
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


def _setup_linear(ctx, inputs, output):
    x, W, b, A, B, s, g, x_in = inputs
    ctx.save_for_backward(x, W, A, B, s, g, x_in)
    ctx.has_b, ctx.x_shape = b is not None, x.shape


def _backward_linear(ctx, dy):
    x, W, A, B, s, g, x_in = ctx.saved_tensors
    n = _needs(ctx)
    dx, d_xin, dA, dB, dg = lora_linear_backward(dy, x, W, A, B, s, g, x_in, n[6])
    dy2, x2 = _flat(dy), _flat(x)
    dW, db = _base_grads(dy2, x2, W, n[1], n[2] and ctx.has_b)
    ds = None
    if n[5]:  # a trainable scale: rare, plain PyTorch
        hg = _shrink(x2 if x_in is None else _flat(x_in), A)
        hg = hg if g is None else hg * _flat(g)
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


def _setup_expand(ctx, inputs, output):
    x, W, b, h, B, s, g = inputs
    ctx.save_for_backward(x, W, h, B, s, g)
    ctx.has_b = b is not None


def _backward_expand(ctx, dy):
    x, W, h, B, s, g = ctx.saved_tensors
    n = _needs(ctx)
    dy2, x2 = _flat(dy), _flat(x)
    dh, dB, ds, dg = _adapter_grads(dy2, _flat(h), B, s, _flat(g), {"B": n[4], "s": n[5], "g": n[6]})
    dx = (dy2.to(W.dtype) @ W).to(x.dtype).reshape(x.shape) if n[0] else None
    dW, db = _base_grads(dy2, x2, W, n[1], n[2] and ctx.has_b)
    dh = dh.to(h.dtype).reshape(h.shape) if n[3] else None
    dg = None if dg is None else dg.reshape(g.shape)
    return dx, dW, db, dh, dB, ds, dg


def _setup_multi(ctx, inputs, output):
    x, W, b, A, B, s, idx = inputs
    ctx.save_for_backward(x, W, A, B, s, idx)
    ctx.has_b = b is not None


@torch.library.custom_op("lorafx::lora_linear_multi_backward", mutates_args=())
def lora_linear_multi_backward(
    dy: Tensor, x: Tensor, W: Tensor, A: Tensor, B: Tensor, s: Tensor, idx: Tensor, need_dx: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dA, dB)`` of ``lora_linear_multi``; ``dx`` is empty unless ``need_dx``.

    An op of its own so that the per-adapter row counts (data-dependent shapes) stay inside it, where
    AOT autograd never traces them: each adapter's grads cost its own rows only, as in the forward."""
    return _multi_backward_ref(dy, x, W, A, B, s, idx, need_dx)


def _multi_backward_ref(dy, x, W, A, B, s, idx, need_dx: bool):
    dy2, x2, rows = _flat(dy), _flat(x), idx.reshape(-1)
    dx2 = (dy2.to(W.dtype) @ W).to(x.dtype) if need_dx else None
    dA, dB = torch.zeros_like(A), torch.zeros_like(B)
    for i in range(A.shape[0]):
        sel = (rows == i).nonzero().squeeze(1)
        if not sel.numel():
            continue
        xs, dys = x2.index_select(0, sel).to(A.dtype), dy2.index_select(0, sel).to(B.dtype)
        h = xs @ A[i].t()
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


def _backward_multi(ctx, dy):
    x, W, A, B, s, idx = ctx.saved_tensors
    n = _needs(ctx)
    dx = dA = dB = None
    if n[0] or n[3] or n[4]:  # frozen adapters and an input without grad (serving): base grads only
        dx, dA, dB = lora_linear_multi_backward(dy, x, W, A, B, s, idx, n[0])
    dW, db = _base_grads(_flat(dy), _flat(x), W, n[1], n[2] and ctx.has_b)
    return dx if n[0] else None, dW, db, dA if n[3] else None, dB if n[4] else None, None, None


lora_linear.register_autograd(_backward_linear, setup_context=_setup_linear)
lora_expand.register_autograd(_backward_expand, setup_context=_setup_expand)
lora_linear_multi.register_autograd(_backward_multi, setup_context=_setup_multi)


@torch.library.custom_op("lorafx::celora_input_grad", mutates_args=())
def celora_input_grad(G: Tensor, W: Tensor, B0: Tensor, A0: Tensor, index: Tensor) -> Tensor:
    """CE-LoRA's ∂x of the frozen ``x Wᵀ``: ``G[:, I] W[I, :] + (G B0ᶜ) A0``, ``B0ᶜ`` = ``B0`` with rows
    ``I`` zeroed, for ``G [T, d_out]``, ``W [d_out, d_in]``, ``B0 [d_out, r0]``, ``A0 [r0, d_in]``,
    ``index [k]``. Equal to the paper's ``(G B0) A0 + G[:, I]·(W − B0 A0)[I, :]`` without forming the
    residual rows: 2T·r0·(d_out+d_in) + 2T·k·d_in FLOPs instead of 2T·d_out·d_in."""
    return _celora_input_grad_ref(G, W, B0, A0, index)


def _celora_input_grad_ref(G, W, B0, A0, index):
    u = G @ B0.index_fill(0, index, 0)  # [T, r0]: the dropped channels through the rank-r0 part
    # index_select, not G[:, I]: 0.12 ms vs 0.55 ms for T=512, k=563 (1 CPU thread).
    return torch.addmm(u @ A0, torch.index_select(G, 1, index), torch.index_select(W, 0, index))


@celora_input_grad.register_fake
def _(G, W, B0, A0, index):
    return G.new_empty(G.shape[0], W.shape[1])


TRITON_OP = None  # lorafx::lora_linear_triton once registered (CUDA + triton); see _register_cuda


def _register_cuda() -> None:
    """Route the ops to the Triton kernels on CUDA when triton is installed (no CUDA context is made)."""
    if not torch.cuda.is_available():
        return
    try:
        from lorafx.kernels import triton_lora
    except ImportError:  # no triton: the composite above serves every device
        return
    triton_lora.register_cuda_kernels(sys.modules[__name__])


_register_cuda()
