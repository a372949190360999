"""The ``lorafx::`` op family for the canonical form; :mod:`lorafx.canonical` is their CPU composite.

One op family per file, each registering its schema, fake kernel, autograd and (on CUDA with triton
installed) its Triton kernels:

* :mod:`~lorafx.kernels.lora_linear`: ``lorafx::lora_linear`` and ``lorafx::lora_linear_backward``;
* :mod:`~lorafx.kernels.lora_expand`: ``lorafx::lora_expand`` (a site with a precomputed shrink);
* :mod:`~lorafx.kernels.lora_linear_multi`: ``lorafx::lora_linear_multi`` and its backward op;
* :mod:`~lorafx.kernels.grouped_linear`: ``lorafx::grouped_linear`` (one linear per row group: MoE experts);
* :mod:`~lorafx.kernels.celora_input_grad`: ``lorafx::celora_input_grad``;
* :mod:`~lorafx.kernels.site`: the ``"ops"`` site implementation (a site as one op node);
* :mod:`~lorafx.kernels.lora_linear_4bit`: ``lorafx::lora_linear_4bit`` and its backward op
  (bitsandbytes NF4/FP4 base: fused dequant + GEMM + adapter expand on CUDA, forward and ∂x);
* :mod:`~lorafx.kernels.quantized_site`: the ``"ops"`` implementation of quantized sites.

The Triton kernels and launchers live in the private ``lorafx.kernels._triton``, the only importer
of triton in lorafx; it is imported only where CUDA is available. Importing this package registers
the ops (cheap: torch.library only) and never imports triton on a CPU machine.
"""

from lorafx.kernels import (
    celora_input_grad,
    grouped_linear,
    lora_expand,
    lora_linear,
    lora_linear_4bit,
    lora_linear_multi,
    quantized_site,
    site,
)
from lorafx.kernels._common import triton_on_cuda

__all__ = [
    "celora_input_grad",
    "grouped_linear",
    "lora_expand",
    "lora_linear",
    "lora_linear_4bit",
    "lora_linear_multi",
    "quantized_site",
    "site",
    "triton_on_cuda",
]
