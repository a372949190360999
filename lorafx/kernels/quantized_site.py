"""The ``"ops"`` implementation of a quantized (bitsandbytes) site: the fused 4-bit kernel on CUDA.

Registered in :data:`lorafx.canonical.QUANTIZED_SITE_IMPLEMENTATIONS` under ``"ops"``, so
``lorafx.compile(kernels="ops"/"auto")`` and :func:`lorafx.use_kernels` point quantized sites here as
they point dense sites at :mod:`lorafx.kernels.site`. A site runs ``lorafx::lora_linear_4bit`` (decode,
GEMM and adapter expand in one accumulator) when all of these hold, else the composite
:func:`lorafx.canonical.quantized_lora_linear` (the module's own forward + the adapter), same numbers
up to kernel rounding:

* the input is on CUDA and the op's Triton kernel is registered (triton installed);
* the base is a bitsandbytes ``Linear4bit`` (nf4 or fp4, double quant or not) in bitsandbytes'
  standard packed layout (not the CPU-repacked one), and an adapter is active and unmerged;
* the adapter is the plain canonical form: no custom base matmul (``Lowered.base``) and no per-row
  stacks. A precomputed shrink (``Lowered.h``) is recomputed from ``A``: equal by contract.

bitsandbytes' own ``Linear4bit.forward`` casts the input to ``compute_dtype``, computes there and casts
the output back to the input's dtype; this does the same.
"""

from __future__ import annotations

import torch
from torch import Tensor, fx

from lorafx import canonical
from lorafx.kernels import lora_linear_4bit as op

_KINDS = ("bnb-nf4", "bnb-fp4")


def _quant_state(base):
    qs = getattr(base.weight, "quant_state", None)
    return qs if qs is not None else getattr(base, "quant_state", None)


def fused_operands(base) -> tuple | None:
    """``(qweight, absmax, code, absmax2, code2, offset, N, blocksize, blocksize2)`` of a bitsandbytes
    4-bit module in the standard packed layout, or None (CPU-repacked, or no quant state)."""
    qs = _quant_state(base)
    if qs is None or getattr(qs, "packing_format_for_cpu", False):
        return None
    nested = qs.state2 is not None
    return (
        base.weight.data,
        qs.absmax,
        qs.code,
        qs.state2.absmax if nested else None,
        qs.state2.code if nested else None,
        # a tensor, never float(): that would sync the device and break a compiled graph
        torch.as_tensor(qs.offset, dtype=torch.float32, device=qs.absmax.device).reshape(()) if nested else None,
        int(qs.shape[0]),
        int(qs.blocksize),
        int(qs.state2.blocksize) if nested else 256,
    )


def _eligible(x: Tensor, sites, low) -> bool:
    return (
        low is not None
        and low.base is None
        and low.A.dim() == 2
        and sites.quantized in _KINDS
        and op.has_fused_kernel(x.device)
    )


def quantized_op_lora_linear(x: Tensor, sites, low) -> Tensor:
    """Same contract as :func:`lorafx.canonical.quantized_lora_linear`, through the fused 4-bit op
    where the module docstring's conditions hold."""
    if isinstance(x, fx.Proxy):  # re-tracing (unpickling): one node, as for the other site calls
        return x.tracer.create_proxy("call_function", quantized_op_lora_linear, (x, sites, low), {})
    operands = fused_operands(sites.base) if _eligible(x, sites, low) else None
    if operands is None:
        return canonical.quantized_lora_linear(x, sites, low)
    base = sites.base
    dtype = base.compute_dtype if isinstance(base.compute_dtype, torch.dtype) else x.dtype
    bias = None if base.bias is None else base.bias.to(dtype)
    s = low.scale if isinstance(low.scale, Tensor) else torch.tensor(float(low.scale), device=x.device)
    x_in = None if low.x is x else low.x.to(dtype)
    gate = low.gate
    y = op.lora_linear_4bit(x.to(dtype), *operands, bias, low.A, low.B, s, gate, x_in)
    return y.to(x.dtype)


canonical.QUANTIZED_SITE_IMPLEMENTATIONS["ops"] = quantized_op_lora_linear
