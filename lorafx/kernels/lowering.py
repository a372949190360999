"""Lower rewritten sites to the ``lorafx::`` op family (``kernels="triton"``) or back (``"reference"``).

A rewritten region calls ``lorafx.kernels.reference.lora_linear(x, W, b, low)``. This pass retargets
those call nodes, in place, to :func:`op_lora_linear`, which unpacks the :class:`~lorafx.Lowered`
into ``torch.ops.lorafx.lora_linear`` (Triton on CUDA, the composite on CPU). Sites whose lowering
carries a custom base matmul (CE-LoRA's approximated backward, ``Lowered.base``) keep the reference
path: the op has no slot for a Python callable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorafx import canonical as reference
from lorafx.adapter import Lowered
from lorafx.errors import SpecError
from lorafx.kernels import ops
from lorafx.regions import is_region


def op_lora_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, low: Lowered | None
) -> torch.Tensor:
    """Same contract as :func:`lorafx.kernels.reference.lora_linear`, through ``torch.ops.lorafx``."""
    if low is None:
        return F.linear(x, weight, bias)
    if low.base is not None:
        return reference.lora_linear(x, weight, bias, low)
    s = low.scale if isinstance(low.scale, torch.Tensor) else torch.tensor(float(low.scale), device=x.device)
    x_in = None if low.x is x else low.x
    op = ops.TRITON_OP if (x.is_cuda and ops.TRITON_OP is not None) else ops.lora_linear
    return op(x, weight, bias, low.A, low.B, s, low.gate, x_in)


_TARGETS = {"reference": reference.lora_linear, "triton": op_lora_linear}


def resolve(kernels: str, model: nn.Module) -> str:
    """``"auto"`` -> ``"triton"`` when the model is on CUDA and triton imports, else ``"reference"``."""
    if kernels not in ("auto", *_TARGETS):
        raise SpecError(f"kernels must be one of ['auto', 'triton', 'reference'], got {kernels!r}")
    if kernels != "auto":
        return kernels
    on_cuda = any(p.is_cuda for p in model.parameters())
    try:
        import triton  # noqa: F401
    except ImportError:
        return "reference"
    return "triton" if on_cuda else "reference"


def use_kernels(model: nn.Module, kernels: str = "auto") -> int:
    """Point every rewritten site of ``model`` at ``kernels``' implementation, in place.

    Returns the number of sites retargeted. Numerics are the same (the op's CPU kernel is the
    reference composite); what changes is that each site is one opaque op node in compiled graphs.
    """
    target = _TARGETS[resolve(kernels, model)]
    sources = set(_TARGETS.values())
    count = 0
    for region in [m for m in model.modules() if is_region(m)]:
        for node in region.graph.nodes:
            if node.op == "call_function" and node.target in sources:
                node.target = target
                count += 1
        region.recompile()
    return count
