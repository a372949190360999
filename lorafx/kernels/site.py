"""The ``"ops"`` site implementation: a rewritten site as one ``torch.ops.lorafx.lora_linear`` node.

Registered with :func:`lorafx.canonical.site_implementation`, so every pass that asks "is this node a
lorafx site?" (:func:`lorafx.canonical.is_site_call`) recognises op-lowered sites too. The pass that
points sites here is :func:`lorafx.passes.lower_to_ops.lower_to_ops`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lorafx import canonical
from lorafx.canonical import Lowered, site_implementation
from lorafx.kernels import lora_linear as op


@site_implementation("ops")
def op_lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, low: Lowered | None) -> Tensor:
    """Same contract as :func:`lorafx.canonical.lora_linear`, through ``torch.ops.lorafx.lora_linear``
    (Triton on CUDA, the canonical composite on CPU; same numbers either way up to kernel rounding).

    Sites whose lowering carries a custom base matmul (CE-LoRA's approximated backward,
    ``Lowered.base``) stay on the composite: the op has no slot for a Python callable. A precomputed
    shrink (``Lowered.h``, MoR) is recomputed by the op from ``A``: equal by contract, and it keeps
    every site one ``lora_linear`` node for ``fuse_shrinks`` and ``torch.export``.
    """
    if low is None:
        return F.linear(x, weight, bias)
    if low.rows is not None:  # per-row adapters (lorafx.rows): the segmented op, Triton on CUDA
        return torch.ops.lorafx.lora_linear_multi(x, weight, bias, low.A, low.B, low.scale, low.rows)
    if low.base is not None:
        return canonical.lora_linear(x, weight, bias, low)
    s = low.scale if isinstance(low.scale, Tensor) else torch.tensor(float(low.scale), device=x.device)
    x_in = None if low.x is x else low.x
    fn = op.cuda_op(low.A.shape[0]) if x.is_cuda else op.lora_linear
    return fn(x, weight, bias, low.A, low.B, s, low.gate, x_in)
