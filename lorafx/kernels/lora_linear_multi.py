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
from lorafx.kernels._common import MAX_KERNEL_RANK, base_grads, flat, needs, out_like, save_all_but_bias, triton_on_cuda


@torch.library.custom_op("lorafx::lora_linear_multi", mutates_args=())
def lora_linear_multi(x: Tensor, W: Tensor, b: Tensor | None, A: Tensor, B: Tensor, s: Tensor, idx: Tensor) -> Tensor:
    """Row ``t`` gets adapter ``idx[t]``: ``x Wᵀ + b + s[i]·(x A[i]ᵀ) B[i]ᵀ``; ``idx`` < 0 means base only."""
    return multi_forward_composite(x, W, b, A, B, s, idx)


def segments(idx: Tensor, tokens: int) -> list[tuple[int, int, Tensor]] | None:
    """``(start, end, adapter)`` of each run of equal consecutive indices in ``idx`` (adapter >= 0
    only), or None when the runs are short (fewer than :data:`MIN_RUN` tokens on average).

    Per-row batches (``lorafx.using_adapter(model, names)``) are batch-major, so each row's tokens are
    one run: the adapter products then run on slices (views) of x and y, in place, with no gather.
    On the benchmark Llama (2048 tokens, d_out 2816, 2 CPU cores) ``index_select``/``index_copy_`` of
    the rows cost ~1.3× the base GEMM itself; slices cost nothing. Interleaved rows keep the gathers.
    """
    values, counts = torch.unique_consecutive(idx, return_counts=True)
    if values.numel() * MIN_RUN > tokens:
        return None
    out, start = [], 0
    for v, c in zip(values.tolist(), counts.tolist(), strict=True):
        if v >= 0:
            out.append((start, start + c, v))
        start += c
    return out


MIN_RUN = 16  # tokens per run, on average, for the slice path (a run costs ~4 small op launches)


def row_adapters(x: Tensor, rows: Tensor) -> Tensor | None:
    """The adapter of each leading row of ``x`` ``[batch, seq.., d]`` when every row's tokens share one
    adapter, every row has one (no base-only rows) and rows are at least :data:`MIN_RUN` tokens; else
    None. That is the per-row batch of ``lorafx.using_adapter(model, names)``."""
    if x.dim() < 3 or rows.numel() < MIN_RUN * x.shape[0]:
        return None
    by_row = rows.view(x.shape[0], -1)
    first = by_row[:, 0].contiguous()  # a strided index makes index_select ~700x slower (222 ms vs 0.3 ms)
    if not bool(((by_row == first[:, None]).all() & (first >= 0).all()).item()):
        return None
    return first


def _gather(stack: Tensor, first: Tensor) -> Tensor:
    """``stack[first]`` for a ``[n, a, b]`` stack, through a 2-D ``index_select`` (one contiguous copy per
    row): the 3-D ``index_select`` took 492 ms for a [16, 2816, 16] stack here, the 2-D one 0.3 ms."""
    return stack.reshape(stack.shape[0], -1).index_select(0, first).view(first.shape[0], *stack.shape[1:])


def _add_per_row(x: Tensor, y: Tensor, A: Tensor, B: Tensor, s: Tensor, first: Tensor) -> Tensor:
    """``y[i] += s[a]·(x[i] A[a]ᵀ) B[a]ᵀ`` with ``a = first[i]``, for all rows in one ``bmm`` and one
    in-place ``baddbmm_``: a fixed handful of ops whatever the number of rows or adapters. Under CPU
    contention every op launch waits for its threads (~30 ms each measured with 8 jobs on 2 cores), so
    one launch per row (the slice path) cost 3.1× the single-adapter site at 16 adapters; this, ~1.0×."""
    rows = x.shape[0]
    x3 = x.reshape(rows, -1, x.shape[-1]).to(A.dtype)
    h = torch.bmm(x3, _gather(A, first).transpose(1, 2))
    h = h * s.index_select(0, first).to(h.dtype).view(rows, 1, 1)
    Bt = _gather(B, first).transpose(1, 2)
    y3 = y.view(rows, -1, y.shape[-1])
    if y.dtype == B.dtype:
        y3.baddbmm_(h, Bt)
    else:
        y3 += torch.bmm(h.to(B.dtype), Bt).to(y.dtype)
    return y


def multi_forward_composite(x: Tensor, W: Tensor, b: Tensor | None, A: Tensor, B: Tensor, s: Tensor, idx: Tensor):
    """The CPU kernel of :func:`lora_linear_multi`: one shrink/expand pair per adapter, over its rows.

    Contiguous runs of one adapter (:func:`segments`) add into slices of the output in place. Otherwise
    each segment's rows are gathered, expanded by the canonical evaluator and written back
    (``index_copy_``; rows of one segment are distinct): per adapter that is one extra
    ``[rows, d_out]`` gather next to the ``[rows, d_out]`` delta the expand makes anyway.
    """
    y = F.linear(x, W, b)
    x2, y2, rows = flat(x), y.view(-1, y.shape[-1]), idx.reshape(-1)
    per_row = row_adapters(x, rows)
    if per_row is not None:
        return _add_per_row(x, y, A, B, s, per_row)
    runs = segments(rows, rows.numel())
    if runs is not None:
        for start, end, i in runs:
            ys = y2[start:end]
            out = canonical.expand(ys, canonical.shrink(x2[start:end], A[i]), B[i], s[i], inplace=True)
            if out is not ys:  # dtypes differ: the expand made a new tensor
                ys.copy_(out)
        return y
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
    runs = segments(rows, rows.numel())
    if runs is None:  # interleaved rows: gather each adapter's rows
        parts = [(i, (rows == i).nonzero().squeeze(1)) for i in range(A.shape[0])]
        parts = [(i, sel) for i, sel in parts if sel.numel()]
    else:  # contiguous runs (per-row batches): slices, no gather
        parts = [(i, slice(start, end)) for start, end, i in runs]
    for i, sel in parts:
        gather = isinstance(sel, Tensor)
        xs = (x2.index_select(0, sel) if gather else x2[sel]).to(A.dtype)
        dys = (dy2.index_select(0, sel) if gather else dy2[sel]).to(B.dtype)
        h = canonical.shrink(xs, A[i])
        dh = (dys @ B[i]) * s[i].to(A.dtype)
        dA[i] += dh.t() @ xs
        dB[i] += (dys.t() @ h) * s[i].to(B.dtype)
        if dx2 is not None:
            if gather:
                dx2.index_add_(0, sel, (dh @ A[i]).to(x.dtype))
            else:
                dx2[sel] += (dh @ A[i]).to(x.dtype)
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


def _forward_on_cuda(x, W, b, A, B, s, idx):
    """CUDA kernel of the forward op: the segmented Triton kernels up to ``MAX_KERNEL_RANK``, the
    composite above (the kernels spill there)."""
    if A.shape[1] > MAX_KERNEL_RANK:
        return multi_forward_composite(x, W, b, A, B, s, idx)
    from lorafx.kernels._triton import launchers

    return launchers.lora_linear_multi(x, W, b, A, B, s, idx)


def _backward_on_cuda(dy, x, W, A, B, s, idx, need_dx: bool):
    """CUDA kernel of the backward op: dx by the segmented Triton kernels (one accumulator for
    ``dY W + (s[i]·dY B[i]) A[i]``), dA and dB per adapter as in the composite."""
    if A.shape[1] > MAX_KERNEL_RANK:  # the kernels spill there: the composite, dx included
        return multi_backward_composite(dy, x, W, A, B, s, idx, need_dx)
    from lorafx.kernels._triton import launchers

    _, dA, dB = multi_backward_composite(dy, x, W, A, B, s, idx, False)
    if not need_dx:
        return x.new_empty(0), dA, dB
    return launchers.lora_linear_multi_dx(dy, W, A, B, s, idx).to(x.dtype).reshape(x.shape), dA, dB


def register_triton() -> None:
    """Register the segmented Triton kernels for CUDA (runs at import on CUDA + triton)."""
    lora_linear_multi.register_kernel("cuda")(_forward_on_cuda)
    lora_linear_multi_backward.register_kernel("cuda")(_backward_on_cuda)


if triton_on_cuda():
    register_triton()
