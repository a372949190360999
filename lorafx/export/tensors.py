"""The adapter tensors of a site: what an unmerged or multi-adapter ONNX graph takes as inputs.

Each site is exported in one of two forms, chosen from the adapter itself:

* ``canonical`` — every gate-free variant (LoRA, DropLoRA and CE-LoRA at eval, CapaBoost, Uni-LoRA):
  the effective ``A [R, d_in]`` and ``B [d_out, R]`` from :meth:`Adapter.effective_weights`. The graph
  is the canonical subgraph ``y = x Wᵀ + b + s·(x Aᵀ) Bᵀ``, so any gate-free adapter of rank ≤ R fits
  it (zero rows of A and zero columns of B add nothing, exactly).
* ``params`` — gated variants (MoR): the adapter's own ``state_dict`` (parameters and persistent buffers). The graph runs
  the variant's own :meth:`Adapter.lower` on them (``torch.func.functional_call``), so input-dependent
  parts such as MoR's router become graph ops whose weights are inputs.

Adapters with another alpha fit too: in the ``params`` form the scale ``s`` is an input (shape
``[1]``); in the ``canonical`` form the graph's ``B`` input is ``s·B`` (no Mul node per site, see
:attr:`lorafx.export.layout.SiteLayout.scale_in_b`). :func:`site_tensors` and the adapter files keep
``s`` apart in both forms; :func:`lorafx.export.layout.make_feed` folds it when feeding.
A variant can choose its own tensors by giving its ``Adapter`` two methods, ``export_tensors(self) ->
dict[str, Tensor]`` and ``lower_from(self, x, tensors) -> Lowered``; that form is called ``custom``.
"""

from __future__ import annotations

import torch
from torch import nn

from lorafx.adapter import Adapter, Lowered
from lorafx.errors import AdapterFileError

SCALE = "scale"


def form_of(adapter: Adapter) -> str:
    """``"custom"``, ``"canonical"`` or ``"params"`` (see the module docstring)."""
    if callable(getattr(adapter, "export_tensors", None)) and callable(getattr(adapter, "lower_from", None)):
        return "custom"
    return "canonical" if adapter.config.mergeable() else "params"


@torch.no_grad()
def site_tensors(adapter: Adapter) -> dict[str, torch.Tensor]:
    """Key -> tensor fed to the graph for ``adapter`` (fp32, detached), the scale included."""
    form = form_of(adapter)
    if form == "custom":
        out = dict(adapter.export_tensors())
    elif form == "canonical":
        A, B, _ = adapter.effective_weights()
        out = {"A": A, "B": B}
    else:
        out = dict(adapter.state_dict())  # parameters and persistent buffers, as in adapter files
    out = {k: v.detach().float().contiguous().cpu() for k, v in out.items()}
    out[SCALE] = torch.tensor([float(_scale(adapter, form))], dtype=torch.float32)
    return out


def _scale(adapter: Adapter, form: str) -> float:
    if form == "canonical":
        return float(adapter.effective_weights()[2])
    was = adapter.training
    adapter.eval()
    try:
        return float(adapter.lower(torch.zeros(1, adapter.in_features)).scale)
    finally:
        adapter.train(was)


class _Lower(nn.Module):
    """Calls ``adapter.lower`` as ``forward`` so ``functional_call`` can swap its tensors."""

    def __init__(self, adapter: Adapter):
        super().__init__()
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> Lowered:
        return self.adapter.lower(x)


def lower_from(adapter: Adapter, x: torch.Tensor, tensors: dict[str, torch.Tensor]) -> Lowered:
    """The site's :class:`Lowered` computed from fed ``tensors`` (scale left at 1; the caller applies it)."""
    form = form_of(adapter)
    if form == "custom":
        low = adapter.lower_from(x, {k: v for k, v in tensors.items() if k != SCALE})
    elif form == "canonical":
        return Lowered(x, tensors["A"], tensors["B"], 1.0)
    else:
        params = {f"adapter.{k}": v for k, v in tensors.items() if k != SCALE}
        low = torch.func.functional_call(_Lower(adapter), params, (x,))  # non-persistent buffers stay as they are
    return low._replace(x=x, scale=1.0, base=None)  # eval forward: dropout off, the plain frozen term


def pad_to(t: torch.Tensor, shape: list[int], where: str) -> torch.Tensor:
    """Zero-pad ``t`` at the end of each axis up to ``shape``; larger or wrong-rank is an error naming ``where``.

    Zero padding is exact for the rank axes of every lowering in lorafx: a zero row of A (or of MoR's
    shared A) makes its rank slot zero, whatever B, the gate or the scaling vectors hold there.
    """
    if t.dim() != len(shape) or any(a > b for a, b in zip(t.shape, shape, strict=False)):
        raise AdapterFileError(
            f"{where}: shape {list(t.shape)} does not fit the exported shape {list(shape)} (each axis must be <= it)"
        )
    if list(t.shape) == list(shape):
        return t
    pad = []
    for a, b in zip(reversed(t.shape), reversed(shape), strict=False):
        pad += [0, b - a]
    return torch.nn.functional.pad(t, pad)
