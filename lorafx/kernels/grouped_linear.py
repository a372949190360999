"""``lorafx::grouped_linear``: one linear per group of rows, the GEMM of mixture-of-experts layers.

``grouped_linear(x, W, counts)``: ``x [N, d_in]`` holds the rows of group 0, then group 1, ...
(``counts [G]`` rows each, ``sum(counts) == N``), ``W [G, d_out, d_in]``; row ``t`` of group ``g``
gets ``x[t] W[g]ᵀ``. Expert sites call it three times per projection: the base term with the expert
tensor, the shrink with the stacked ``A [E, r, d_in]`` and the expand with ``B [E, d_out, r]`` (an
expert index is an adapter index, as in :mod:`lorafx.kernels.lora_linear_multi`).

The group sizes are data (the router's choice), so they stay inside the op: torch.compile sees one
node with a static ``[N, d_out]`` output (``fullgraph=True`` holds), and AOT autograd never traces
a data-dependent shape. ``torch._grouped_mm`` would be the native kernel, but on CPU (torch 2.13) it
raises "strides should be multiple of 16 bytes" for ``d_out = 6`` fp32 and inductor supports it for
bf16 only (transformers falls back to its own op for the same reasons). So the op hides it: on CPU,
when every row stride is a multiple of 16 bytes, the op calls ``F.grouped_mm`` (2.0x faster than a
loop of per-group GEMMs: 340 vs 690 ms for 8 groups, 512 rows, 256 -> 1024 fp32 on this shared
2-core machine, bit-identical results); otherwise (odd widths, CUDA) a loop over the groups.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _bounds(counts: Tensor) -> list[tuple[int, int, int]]:
    """``(group, start, end)`` for every non-empty group."""
    out, start = [], 0
    for g, n in enumerate(counts.tolist()):
        if n:
            out.append((g, start, start + n))
        start += n
    return out


def _native(a: Tensor, b: Tensor) -> bool:
    """True when ``F.grouped_mm(a, b)`` (``b [G, K, N]``) runs here: CPU, one dtype, rows of ``a``, ``b``
    and the output 16-byte aligned (its CPU kernel raises otherwise)."""
    es = a.element_size()
    return (
        hasattr(F, "grouped_mm")
        and a.device.type == "cpu"
        and a.dtype == b.dtype
        and a.is_contiguous()
        and max(b.stride(-2), b.stride(-1)) * es % 16 == 0
        and a.shape[1] * es % 16 == 0
        and b.shape[-1] * es % 16 == 0
        and a.data_ptr() % 16 == 0
        and b.data_ptr() % 16 == 0
    )


def _offsets(counts: Tensor) -> Tensor:
    return counts.cumsum(0).to(torch.int32)


@torch.library.custom_op("lorafx::grouped_linear", mutates_args=())
def grouped_linear(x: Tensor, W: Tensor, counts: Tensor) -> Tensor:
    """Row block ``g`` of ``x`` (``counts[g]`` rows, in order) times ``W[g]ᵀ``; ``[N, d_out]`` in x's dtype."""
    Wt = W.transpose(-2, -1)
    if _native(x, Wt):
        return F.grouped_mm(x, Wt, offs=_offsets(counts))
    y = x.new_zeros((x.shape[0], W.shape[1]))
    for g, a, b in _bounds(counts):
        y[a:b] = (x[a:b].to(W.dtype) @ W[g].t()).to(y.dtype)
    return y


@grouped_linear.register_fake
def _(x, W, counts):
    return x.new_empty((x.shape[0], W.shape[1]))


@torch.library.custom_op("lorafx::grouped_linear_backward", mutates_args=())
def grouped_linear_backward(
    dy: Tensor, x: Tensor, W: Tensor, counts: Tensor, need_dx: bool, need_dW: bool
) -> tuple[Tensor, Tensor]:
    """``(dx, dW)`` of :func:`grouped_linear` (each empty unless asked for: a frozen expert tensor costs
    no ``[E, d_out, d_in]`` gradient)."""
    dx = torch.zeros_like(x) if need_dx else x.new_empty(0)
    dW = torch.zeros_like(W) if need_dW else W.new_empty(0)
    fast_dx = need_dx and _native(dy, W) and dy.dtype == x.dtype
    if fast_dx:
        dx = F.grouped_mm(dy, W, offs=_offsets(counts))
    for g, a, b in _bounds(counts) if need_dW or (need_dx and not fast_dx) else ():
        dyg = dy[a:b].to(W.dtype)
        if need_dx and not fast_dx:
            dx[a:b] = (dyg @ W[g]).to(x.dtype)
        if need_dW:
            dW[g] = dyg.t() @ x[a:b].to(W.dtype)
    return dx, dW


@grouped_linear_backward.register_fake
def _(dy, x, W, counts, need_dx, need_dW):
    return (torch.empty_like(x) if need_dx else x.new_empty(0)), (torch.empty_like(W) if need_dW else W.new_empty(0))


def _setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy):
    x, W, counts = ctx.saved_tensors
    need_dx, need_dW = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_dx or need_dW):
        return None, None, None
    dx, dW = grouped_linear_backward(dy, x, W, counts, need_dx, need_dW)
    return dx if need_dx else None, dW if need_dW else None, None


grouped_linear.register_autograd(_backward, setup_context=_setup)
