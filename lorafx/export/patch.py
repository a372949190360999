"""Temporary export-time wiring of a live adapted model, undone exactly in ``finally``.

While exporting, each rewritten site computes its adapter from tensors the export wrapper feeds
(graph inputs) instead of from the model's own parameters:

* every ``SiteAdapters`` gets an instance ``forward`` that returns the fed tensors, lowered;
* every ``lora_linear`` node of every rewritten region is retargeted to :func:`export_linear`, which
  takes a tensor scale and, for multi-adapter graphs, per-row ``A [b, R, d_in]`` and ``B [b, d_out, R]``
  (batched MatMul after a Gather on the adapter index).

Nothing else is touched: parameters, buffers and adapters are shared, never written. Restoring
deletes the instance ``forward`` and puts the original node targets back (then ``recompile``), so
the model's generated code is the same string as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import fx, nn

from lorafx.adapter import Lowered, SiteAdapters
from lorafx.canonical import lora_linear
from lorafx.regions import is_region
from lorafx.state import iter_sites


def export_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, low: Lowered | None
) -> torch.Tensor:
    """``x Wᵀ + b + ((x_in Aᵀ) ⊙ g · s) Bᵀ`` in plain ops that export to standard ONNX.

    ``low.scale`` is a tensor: ``[1]`` for one adapter, ``[b]`` per row when ``A`` is ``[b, R, d_in]``.
    The scale multiplies the ``[T, R]`` hidden (R ≪ d_out) rather than the ``[T, d_out]`` delta.
    """
    y = F.linear(x, weight, bias)
    if low is None:
        return y
    xin, A, B, scale = (
        low.x,
        low.A.to(y.dtype),
        low.B.to(y.dtype),
        low.scale.to(y.dtype),
    )  # fed fp32; no-op for fp32 models
    gate = None if low.gate is None else low.gate.to(y.dtype)
    h = getattr(low, "h", None)  # x_in Aᵉᵀ precomputed a cheaper, equal way (MoR's one shared shrink)
    if A.dim() == 2:
        h = F.linear(xin, A) if h is None else h.to(y.dtype)
        if gate is not None:
            h = h * gate
        return y + F.linear(h * scale, B)
    rows = A.shape[0]
    xr = xin.reshape(rows, -1, xin.shape[-1])
    if h is None:
        h = torch.bmm(xr, A.transpose(1, 2))  # [b, T, R]; bmm exports to one MatMul, matmul adds Expand/Reshape
    else:
        h = h.to(y.dtype).reshape(rows, -1, A.shape[1])
    if gate is not None:
        h = h * gate.reshape(h.shape)
    h = h * scale.reshape(rows, 1, 1)
    return y + torch.bmm(h, B.transpose(1, 2)).reshape(y.shape)


def _regions(model: nn.Module) -> list[fx.GraphModule]:
    return [m for m in model.modules() if is_region(m)]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode (dropout, DropLoRA's mask off); each one's flag restored after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def fed_sites(model: nn.Module, lowered_for: Callable[[SiteAdapters, torch.Tensor], Lowered | None]) -> Iterator[None]:
    """Route every site through ``lowered_for(site_adapters, x)`` and :func:`export_linear`; undo after."""
    retargeted: list[tuple[fx.GraphModule, fx.Node]] = []
    patched: list[SiteAdapters] = []
    try:
        for gm in _regions(model):
            nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is lora_linear]
            for n in nodes:
                n.target = export_linear
                retargeted.append((gm, n))
            if nodes:
                gm.recompile()
        for sa in iter_sites(model).values():
            sa.forward = _bind(lowered_for, sa)
            patched.append(sa)
        yield
    finally:
        for sa in patched:
            sa.__dict__.pop("forward", None)
        touched = []
        for gm, n in retargeted:
            n.target = lora_linear
            if all(gm is not t for t in touched):
                touched.append(gm)
        for gm in touched:
            gm.recompile()


def _bind(fn: Callable, sa: SiteAdapters) -> Callable:
    def forward(x: torch.Tensor) -> Lowered | None:
        return fn(sa, x)

    return forward
